"""The one place where generator failures are classified.

transient (connection errors, timeouts, 5xx, 429, GENERATOR_BUSY) → retry;
safety block (the three codes below) → completed/blocked, no charge;
permanent (any other 4xx, e.g. INVALID_INPUT) → failed, no retry.
"""
from __future__ import annotations

from typing import Optional

import requests
from celery.exceptions import SoftTimeLimitExceeded

from renderq.enums import AttemptOutcome

SAFETY_BLOCK_CODES = frozenset({"CONTENT_SAFETY_VIOLATION", "COPYRIGHT_VIOLATION", "SAFETY_AGREEMENT_REQUIRED"})
TRANSIENT_CODES = frozenset({"GENERATOR_BUSY"})


class GeneratorFailure(Exception):
    """A classified failure of one generator call; `outcome` is how its attempt is recorded."""
    outcome: AttemptOutcome

    def __init__(self, code: str, detail: str):
        super().__init__("%s: %s" % (code, detail))
        self.code = code
        self.detail = detail


class TransientFailure(GeneratorFailure):
    outcome = AttemptOutcome.TRANSIENT

    def __init__(self, code: str, detail: str, retry_after: float = 0):
        super().__init__(code, detail)
        self.retry_after = retry_after


class SafetyBlock(GeneratorFailure):
    outcome = AttemptOutcome.BLOCKED


class PermanentFailure(GeneratorFailure):
    outcome = AttemptOutcome.FAILED


def _retry_after_seconds(response: requests.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "0")))
    except ValueError:  # an HTTP date; the ladder's own delay applies
        return 0.0


def _error_code(response: requests.Response) -> Optional[str]:
    try:
        body = response.json()
    except ValueError:
        return None
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) else None


def classify_response(response: requests.Response) -> GeneratorFailure:
    """The failure a non-200 generator response stands for."""
    code = _error_code(response)
    detail = "generator answered HTTP %d %s" % (response.status_code, code or response.text[:200])
    if code in SAFETY_BLOCK_CODES:
        return SafetyBlock(code, detail)
    if response.status_code == 429:
        return TransientFailure(code or "RATE_LIMITED", detail, _retry_after_seconds(response))
    if response.status_code >= 500 or code in TRANSIENT_CODES:
        return TransientFailure(code or "HTTP_%d" % response.status_code, detail)
    return PermanentFailure(code or "HTTP_%d" % response.status_code, detail)


def classify_exception(error: BaseException) -> Optional[GeneratorFailure]:
    """The failure an exception raised during an attempt stands for; None if it is not the generator's."""
    if isinstance(error, GeneratorFailure):
        return error
    if isinstance(error, SoftTimeLimitExceeded):
        return TransientFailure("TIME_LIMIT", "the attempt reached its kind's soft time limit")
    if isinstance(error, requests.Timeout):
        return TransientFailure("GENERATOR_TIMEOUT", "generator timed out: %s" % error)
    if isinstance(error, requests.ConnectionError):
        return TransientFailure("GENERATOR_UNREACHABLE", "generator connection failed: %s" % error)
    return None
