"""The job pipeline end to end: real API app, real worker and beat, real generator, real PG and Redis."""
from __future__ import annotations

import io
import time
import uuid

import pytest
from PIL import Image
from sqlalchemy import text

from renderq.db import db
from tests.conftest import (
    FAST_TIMINGS,
    generator_calls,
    job_json,
    upload,
    wait_terminal,
)
from tests.support import wait_for

LADDER = [float(delay) for delay in FAST_TIMINGS["RETRY_DELAYS"].split(",")]

# Every status change a poller may see (it may miss intermediate ones, never reverse).
ALLOWED = {
    "pending": {"processing", "canceled"},
    "processing": {"completed", "failed", "retrying", "pending_background_retry", "canceled"},
    "retrying": {"processing", "canceled"},
    "pending_background_retry": {"processing", "failed", "canceled"},
}


def reachable(start: str) -> set[str]:
    seen, frontier = set(), [start]
    while frontier:
        for following in ALLOWED.get(frontier.pop(), ()):
            if following not in seen:
                seen.add(following)
                frontier.append(following)
    return seen


def submit_and_watch(client, token: str, prompt: str = "", timeout: float = 60, **upload_args) -> list[dict]:
    """Submit a photo and poll its job until terminal: the distinct snapshots, starting with the 202's."""
    response = upload(client, token, prompt=prompt, **upload_args)
    assert response.status_code == 202, response.get_json()
    accepted = response.get_json()
    return watch(client, token, accepted["id"], timeout, first=accepted)


def watch(client, token: str, job_id: str, timeout: float = 60, first: dict | None = None) -> list[dict]:
    """Poll the job until it is terminal; the distinct snapshots, in order."""
    history: list[dict] = [first] if first else []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_json(client, token, job_id)
        if not history or (job["status"], job["attempts"], job["retry_count"]) != (
                history[-1]["status"], history[-1]["attempts"], history[-1]["retry_count"]):
            history.append(job)
        if job["status"] in ("completed", "failed", "canceled"):
            return history
        time.sleep(0.02)
    raise AssertionError("job %s did not finish: %r" % (job_id, [h["status"] for h in history]))


def assert_valid_path(history: list[dict]) -> None:
    statuses = [job["status"] for job in history]
    assert statuses[0] in ("pending", "processing"), statuses
    for before, after in zip(statuses, statuses[1:]):
        assert after == before or after in reachable(before), statuses


@pytest.fixture()
def user(make_user, stack):
    return make_user()


def test_success_renders_a_png_of_the_input_size(client, user, generator):
    user_id, token = user
    history = submit_and_watch(client, token, size=(123, 77))
    assert_valid_path(history)
    assert history[0]["user_id"] == user_id
    job = history[-1]
    assert (job["status"], job["outcome"], job["attempts"], job["retry_count"]) == ("completed", "succeeded", 1, 0)
    assert job["error"] is None and job["message"] is None
    # the job's own result, whatever later jobs of the same photo do
    assert job["result_url"] == "/api/jobs/%s/result" % job["id"]

    status = client.get("/api/photos/%s/status" % job["photo_id"], headers={"Authorization": "Bearer " + token})
    assert status.get_json()["id"] == job["id"]
    for url in (job["result_url"], "/api/photos/%s/result" % job["photo_id"]):
        result = client.get(url, headers={"Authorization": "Bearer " + token})
        assert result.status_code == 200 and result.mimetype == "image/png"
        assert Image.open(io.BytesIO(result.data)).size == (123, 77)
    assert generator_calls(generator, job["id"])["calls"] == 1


def test_job_resource_has_every_field_of_the_spec(client, user):
    _, token = user
    job = upload(client, token).get_json()
    assert set(job) == {
        "id", "photo_id", "user_id", "kind", "status", "outcome", "block_reason", "attempts", "retry_count",
        "next_retry_at", "error", "message", "result_url", "price", "queue_position", "created_at",
        "started_at", "completed_at", "updated_at"}
    assert job["created_at"].endswith("Z")
    wait_terminal(client, token, job["id"])


def test_transient_failures_retry_on_the_ladder(client, user, generator):
    _, token = user
    history = submit_and_watch(client, token, prompt="[fail:2]")
    job_id = history[0]["id"]
    assert_valid_path(history)
    assert "retrying" in [job["status"] for job in history]
    job = history[-1]
    assert (job["status"], job["outcome"], job["attempts"]) == ("completed", "succeeded", 3)
    started = generator_calls(generator, job_id)["started_at"]
    assert len(started) == 3
    gaps = [later - earlier for earlier, later in zip(started, started[1:])]
    for gap, delay in zip(gaps, LADDER):
        assert delay <= gap < delay + 1.5, (gaps, LADDER)


def test_exhausted_ladder_goes_to_background_then_fails_after_three_tries(client, user, generator):
    _, token = user
    history = submit_and_watch(client, token, prompt="[fail:999]", timeout=90)
    job_id = history[0]["id"]
    assert_valid_path(history)
    statuses = [job["status"] for job in history]
    assert "pending_background_retry" in statuses
    ladder_part = [job for job in history if job["retry_count"] == 0]
    assert max(job["attempts"] for job in ladder_part) == 6
    assert {job["retry_count"] for job in history} == {0, 1, 2, 3}
    job = history[-1]
    assert (job["status"], job["attempts"], job["retry_count"]) == ("failed", 9, 3)
    assert job["error"] == {"code": "GENERATOR_UNAVAILABLE", "message": "Sorry, the generation server is unavailable"}
    time.sleep(3 * int(FAST_TIMINGS["BACKGROUND_PROCESSING_INTERVAL"]) / 1000)  # three more sweeps
    assert generator_calls(generator, job_id)["calls"] == 9
    assert job_json(client, token, job_id)["attempts"] == 9


def test_a_job_past_the_age_limit_is_failed_by_the_sweep_without_an_attempt(app, client, user, generator):
    _, token = user
    job_id = upload(client, token, prompt="[fail:999]").get_json()["id"]
    wait_for(lambda: job_json(client, token, job_id)["status"] == "retrying", what="first retry")
    with app.app_context():  # as if the job had been accepted two days ago and left the ladder
        db.session.execute(text(
            "UPDATE jobs SET created_at = now() - interval '2 days', status = 'pending_background_retry', "
            "next_retry_at = NULL WHERE id = :id AND status = 'retrying'"), {"id": job_id})
        db.session.commit()
    calls_before = generator_calls(generator, job_id)["calls"]
    job = wait_terminal(client, token, job_id)
    assert (job["status"], job["retry_count"]) == ("failed", 0)
    time.sleep(1)
    assert generator_calls(generator, job_id)["calls"] == calls_before


@pytest.mark.parametrize("code", ["CONTENT_SAFETY_VIOLATION", "COPYRIGHT_VIOLATION", "SAFETY_AGREEMENT_REQUIRED"])
def test_safety_blocks_complete_with_an_explanation_after_one_attempt(client, user, generator, code):
    _, token = user
    job_id = upload(client, token, prompt="[block:%s]" % code).get_json()["id"]
    job = wait_terminal(client, token, job_id)
    assert (job["status"], job["outcome"], job["block_reason"], job["attempts"]) == ("completed", "blocked", code, 1)
    assert job["message"].startswith("🚫") and job["result_url"] is None
    assert generator_calls(generator, job_id)["calls"] == 1


def test_invalid_input_fails_at_once(client, user, generator):
    _, token = user
    job_id = upload(client, token, prompt="[invalid]").get_json()["id"]
    job = wait_terminal(client, token, job_id)
    assert (job["status"], job["attempts"], job["outcome"]) == ("failed", 1, None)
    assert job["error"]["code"] == "INVALID_INPUT"
    time.sleep(1)
    assert generator_calls(generator, job_id)["calls"] == 1


def test_image_generate_needs_no_photo(client, user):
    _, token = user
    response = client.post("/api/jobs", json={"kind": "image.generate", "params": {"style": "pixelate", "prompt": "a cat"}},
                           headers={"Authorization": "Bearer " + token})
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    job = wait_terminal(client, token, job_id)
    assert (job["status"], job["outcome"], job["result_url"]) == ("completed", "succeeded", "/api/jobs/%s/result" % job_id)
    result = client.get(job["result_url"], headers={"Authorization": "Bearer " + token})
    assert Image.open(io.BytesIO(result.data)).size == (512, 512)


def test_a_429s_retry_after_is_waited_out_and_capped_at_the_ladders_longest_step(client, user, generator):
    _, token = user
    waited = submit_and_watch(client, token, prompt="[ratelimit:1]")[-1]  # longer than the first step (0.3 s)
    far = submit_and_watch(client, token, prompt="[ratelimit:3600]")[-1]  # one header must not park a job for an hour
    for job, least, most in ((waited, 1.0, 2.5), (far, max(LADDER), max(LADDER) + 1.5)):
        assert (job["status"], job["outcome"], job["attempts"]) == ("completed", "succeeded", 2)
        first, second = generator_calls(generator, job["id"])["started_at"]
        assert least <= second - first < most, (job["id"], second - first)


def test_a_200_that_is_not_an_image_is_a_transient_failure(app, client, user, generator):
    from renderq.models import JobAttempt

    _, token = user
    job = submit_and_watch(client, token, prompt="[garbage]")[-1]
    assert (job["status"], job["outcome"], job["attempts"]) == ("completed", "succeeded", 2)
    result = client.get(job["result_url"], headers={"Authorization": "Bearer " + token})
    assert Image.open(io.BytesIO(result.data)).format == "PNG"  # the real render, not the garbage
    with app.app_context():
        first = db.session.execute(db.select(JobAttempt).where(JobAttempt.job_id == uuid.UUID(job["id"]),
                                                               JobAttempt.number == 1)).scalar_one()
        assert (first.outcome, first.error_code) == ("transient", "GENERATOR_BAD_RESPONSE")
