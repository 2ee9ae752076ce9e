"""Every error response is JSON: {"error": {"code", "message", "request_id"}}.

Domain errors (renderq.errors) get their status code here, and only here. Production never
shows a stack trace, exception class, SQL or host name; development adds a `detail` field.
Unexpected errors are logged with the full details beside the request id.
"""
from __future__ import annotations

import logging
import uuid

from flask import Flask, Response, g, jsonify, request
from sqlalchemy.exc import OperationalError
from werkzeug.exceptions import HTTPException

from renderq import errors as domain
from renderq.logs import current_request_id
from renderq.runtime import settings
from renderq.storage import StorageUnavailable

log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_SECONDS = 5


STATUS_OF = {
    domain.InvalidInput: 400,
    domain.InsufficientCredits: 402,
    domain.Forbidden: 403,
    domain.NotFound: 404,
    domain.Conflict: 409,
    domain.TooLarge: 413,
    domain.IdempotencyKeyReused: 422,
}


class ApiError(Exception):
    """An HTTP-level refusal (no token, a body that is not JSON): status, stable code and a
    message that says what to fix. Refusals of the domain are renderq.errors."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def request_id() -> str:
    if "request_id" not in g:
        g.request_id = request.headers.get("X-Request-Id", "")[:64] or uuid.uuid4().hex
    return g.request_id


def error_response(status: int, code: str, message: str, detail: str | None = None) -> Response:
    body = {"code": code, "message": message, "request_id": request_id()}
    if detail is not None and not settings().production:
        body["detail"] = detail
    response = jsonify({"error": body})
    response.status_code = status
    return response


def _code_for(http_error: HTTPException) -> str:
    return (http_error.name or "error").upper().replace(" ", "_").replace("'", "")


def register(app: Flask) -> None:
    @app.before_request
    def _stamp_request_id() -> None:
        current_request_id.set(request_id())

    @app.after_request
    def _echo_request_id(response: Response) -> Response:
        response.headers["X-Request-Id"] = request_id()
        return response

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError) -> Response:
        return error_response(error.status, error.code, error.message)

    @app.errorhandler(domain.DomainError)
    def _domain_error(error: domain.DomainError) -> Response:
        return error_response(STATUS_OF[type(error)], error.code, error.message)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        if error.code == 413:
            limit = settings().max_upload_bytes
            return error_response(413, "PAYLOAD_TOO_LARGE", "The upload is larger than MAX_UPLOAD_BYTES (%d bytes)." % limit)
        return error_response(error.code or 500, _code_for(error), error.description or error.name)

    @app.errorhandler(OperationalError)
    def _database_unavailable(error: OperationalError) -> Response:
        # PostgreSQL restarting or out of connections: a client's retry is what helps (and an
        # Idempotency-Key makes retrying a submission safe), so say so instead of a bare 500.
        log.error("❌ [ERROR_HANDLER] database unavailable in %s %s: %s", request.method, request.path, error)
        response = error_response(503, "SERVICE_UNAVAILABLE", "The service is briefly unavailable; try again in "
                                  "a few seconds.", detail=str(error.orig))
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response

    @app.errorhandler(StorageUnavailable)
    def _storage_unavailable(error: StorageUnavailable) -> Response:
        # The bucket (STORAGE_BACKEND=s3) did not answer or refused: as with the database, a
        # retry is what helps.
        log.error("❌ [ERROR_HANDLER] storage unavailable in %s %s: %s", request.method, request.path, error)
        response = error_response(503, "SERVICE_UNAVAILABLE", "The service is briefly unavailable; try again in "
                                  "a few seconds.", detail=str(error))
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.exception("❌ [ERROR_HANDLER] unhandled error in %s %s", request.method, request.path)
        return error_response(500, "INTERNAL_ERROR", "Something went wrong on our side; quote the request_id "
                              "when you report it.", detail="%s: %s" % (type(error).__name__, error))
