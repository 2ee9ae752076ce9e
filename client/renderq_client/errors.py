"""Errors the client raises: one class per status a caller can act on, all RenderqError.

The server answers every refusal with `{"error": {"code", "message", "request_id"}}`; the
exception carries those fields, so `except InsufficientCredits` and `error.code` both work.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import requests

    from renderq_client.models import Job


class RenderqError(Exception):
    """A request the API refused or could not answer. `status` is the HTTP status (None when
    no answer came back), `code` the API's stable error code, `message` what to do about it,
    `request_id` what to quote when reporting it."""

    def __init__(self, message: str, *, status: Optional[int] = None, code: str = "ERROR",
                 request_id: Optional[str] = None, retry_after: Optional[float] = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = " (HTTP %d, %s)" % (self.status, self.code) if self.status is not None else " (%s)" % self.code
        quote = "; request id %s" % self.request_id if self.request_id else ""
        return self.message + where + quote


class Unauthorized(RenderqError):
    """401: no token, or a token the server does not know."""


class InsufficientCredits(RenderqError):
    """402: the job costs more credits than the account has available; nothing was stored."""


class Forbidden(RenderqError):
    """403: the job, photo or user belongs to somebody else."""


class NotFound(RenderqError):
    """404: no such job, photo or user."""


class Conflict(RenderqError):
    """409: the job is in a state that does not allow this (canceling a finished job, asking
    for the result of a job that has not succeeded)."""


class TooLarge(RenderqError):
    """413: the photo is larger than the server accepts."""


class NetworkError(RenderqError):
    """No HTTP answer at all: the server could not be reached, or the connection broke."""


class WaitTimeout(RenderqError, TimeoutError):
    """`Client.wait` gave up before the job finished; `job` is the last state seen (the job
    itself carries on on the server)."""

    def __init__(self, message: str, job: Optional["Job"]) -> None:
        super().__init__(message, code="WAIT_TIMEOUT")
        self.job = job


ERROR_FOR_STATUS: dict[int, type[RenderqError]] = {
    401: Unauthorized,
    402: InsufficientCredits,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
}


def error_from_response(response: "requests.Response") -> RenderqError:
    """The typed error for a refused request. Bodies that are not the API's JSON (a proxy's HTML
    page, say) still give an error naming the status."""
    error_class = ERROR_FOR_STATUS.get(response.status_code, RenderqError)
    details: Any = None
    try:
        details = response.json().get("error")
    except (ValueError, AttributeError):
        pass
    retry_after = _seconds(response.headers.get("Retry-After"))
    if isinstance(details, dict) and isinstance(details.get("message"), str):
        return error_class(details["message"], status=response.status_code,
                           code=str(details.get("code") or "HTTP_%d" % response.status_code),
                           request_id=details.get("request_id") or response.headers.get("X-Request-Id"),
                           retry_after=retry_after)
    text = " ".join(response.text.split())[:200] if response.text else ""
    return error_class("%s %s%s" % (response.status_code, response.reason or "", ": " + text if text else ""),
                       status=response.status_code, code="HTTP_%d" % response.status_code,
                       request_id=response.headers.get("X-Request-Id"), retry_after=retry_after)


def _seconds(header: Optional[str]) -> Optional[float]:
    try:
        return float(header) if header else None
    except ValueError:
        return None  # an HTTP date: rare enough that the caller's own back-off will do
