"""The one classification of generator failures: every status code and error code."""
from __future__ import annotations

import pytest
import requests
from celery.exceptions import SoftTimeLimitExceeded

from renderq.enums import AttemptOutcome
from renderq.generator.errors import (
    SAFETY_BLOCK_CODES,
    PermanentFailure,
    SafetyBlock,
    TransientFailure,
    classify_exception,
    classify_response,
)


def response(status: int, body: object = None, headers: dict | None = None) -> requests.Response:
    answer = requests.Response()
    answer.status_code = status
    answer.headers.update(headers or {})
    answer._content = b"" if body is None else requests.compat.json.dumps(body).encode()
    return answer


@pytest.mark.parametrize("status", range(500, 600))
def test_every_5xx_is_transient(status):
    failure = classify_response(response(status, {"error": "GENERATOR_BUSY"}))
    assert isinstance(failure, TransientFailure) and failure.outcome == AttemptOutcome.TRANSIENT


@pytest.mark.parametrize("status", [status for status in range(400, 500) if status != 429])
def test_every_other_4xx_is_permanent(status):
    failure = classify_response(response(status, {"error": "INVALID_INPUT"}))
    assert isinstance(failure, PermanentFailure) and failure.outcome == AttemptOutcome.FAILED
    assert failure.code == "INVALID_INPUT"


@pytest.mark.parametrize("code", sorted(SAFETY_BLOCK_CODES))
@pytest.mark.parametrize("status", [400, 403, 422, 451, 500])
def test_safety_codes_block_whatever_the_status(code, status):
    failure = classify_response(response(status, {"error": code}))
    assert isinstance(failure, SafetyBlock) and failure.code == code and failure.outcome == AttemptOutcome.BLOCKED


def test_429_is_transient_and_keeps_retry_after():
    failure = classify_response(response(429, {"error": "RATE_LIMITED"}, {"Retry-After": "7"}))
    assert isinstance(failure, TransientFailure) and failure.retry_after == 7
    assert classify_response(response(429)).code == "RATE_LIMITED"
    # an HTTP date or nonsense: the ladder's own delay applies
    assert classify_response(response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})).retry_after == 0


def test_generator_busy_is_transient_even_on_a_4xx():
    assert isinstance(classify_response(response(409, {"error": "GENERATOR_BUSY"})), TransientFailure)


def test_a_body_that_is_not_json_still_classifies_by_status():
    broken = response(502)
    broken._content = b"<html>bad gateway</html>"
    assert isinstance(classify_response(broken), TransientFailure)
    broken.status_code = 400
    assert classify_response(broken).code == "HTTP_400"


@pytest.mark.parametrize("error, code", [
    (requests.ConnectionError("refused"), "GENERATOR_UNREACHABLE"),
    (requests.ConnectTimeout("slow connect"), "GENERATOR_TIMEOUT"),
    (requests.ReadTimeout("slow answer"), "GENERATOR_TIMEOUT"),
    (SoftTimeLimitExceeded(), "TIME_LIMIT"),
])
def test_connection_errors_and_timeouts_are_transient(error, code):
    failure = classify_exception(error)
    assert isinstance(failure, TransientFailure) and failure.code == code


def test_a_bug_is_not_the_generators():
    assert classify_exception(KeyError("oops")) is None
    assert classify_exception(ZeroDivisionError()) is None


def test_a_200_that_is_not_a_png_is_a_transient_failure():
    from renderq.generator.client import _png
    from tests.conftest import png_bytes

    good = png_bytes()
    assert _png(good) == good
    for garbage in (b"", b"<html>oops</html>", good[:40], b"\x89PNG\r\n\x1a\n" + b"\x00" * 100):
        with pytest.raises(TransientFailure) as failure:
            _png(garbage)
        assert failure.value.code == "GENERATOR_BAD_RESPONSE"
