"""Rules of the lifecycle that need settings of their own: a short ladder into the background
tier, two background tries at once, kind time limits, failure notices and a Russian default.
Each proved end to end on a stack of the test's own."""
from __future__ import annotations

import os
import signal
import uuid
from itertools import combinations
from typing import Iterator

import pytest
from sqlalchemy import select

from renderq.db import db
from renderq.messages import BLOCK_MESSAGES, GENERATOR_UNAVAILABLE, INVALID_INPUT
from renderq.models import Job, JobAttempt
from tests.conftest import generator_calls, job_json, png_bytes, upload, wait_terminal
from tests.isolated import IsolatedStack
from tests.support import wait_for

SETTINGS = {
    "NOTIFY_ON_FAILURE": "true",
    "DEFAULT_LOCALE": "ru",
    "KIND_LIMITS": "image.generate=1/1.5/0.8",
    "MAX_RETRIES": "1",
    "RETRY_DELAYS": "0.2",
    "MAX_CONCURRENT_BACKGROUND_TASKS": "2",
    "BACKGROUND_PROCESSING_INTERVAL": "300",
}


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> Iterator[IsolatedStack]:
    stack = IsolatedStack(tmp_path_factory.mktemp("rules"), SETTINGS, concurrency=3).start()
    yield stack
    stack.stop()


def auth(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def internal(stack: IsolatedStack, job_id: str) -> Job:
    with stack.app.app_context():
        job = db.session.get(Job, uuid.UUID(job_id))
        db.session.expunge_all()
        return job


def attempts_of(stack: IsolatedStack, job_ids: list[str]) -> list[JobAttempt]:
    with stack.app.app_context():
        rows = list(db.session.execute(select(JobAttempt).where(
            JobAttempt.job_id.in_([uuid.UUID(job_id) for job_id in job_ids]))).scalars())
        db.session.expunge_all()
        return rows


def test_a_generator_that_refuses_connections_is_a_transient_failure(rules):
    token = rules.new_user()
    rules.generator.stop()
    try:
        job_id = upload(rules.client, token).get_json()["id"]
        waiting = wait_for(lambda: (lambda job: job if job.error_code else None)(internal(rules, job_id)),
                           timeout=20, what="the first attempt to fail")
        assert waiting.error_code == "GENERATOR_UNREACHABLE"
        assert waiting.status in ("retrying", "pending_background_retry", "processing")
        public = job_json(rules.client, token, job_id)["error"]
        assert public is None or public["message"] == GENERATOR_UNAVAILABLE["ru"]
    finally:
        rules.restart_generator()
    job = wait_terminal(rules.client, token, job_id, timeout=40)
    assert (job["status"], job["outcome"]) == ("completed", "succeeded") and job["attempts"] >= 2


def test_a_kinds_time_limit_cuts_an_attempt_and_counts_as_transient(rules):
    token = rules.new_user()
    response = rules.client.post("/api/jobs", headers=auth(token),
                                 json={"kind": "image.generate", "params": {"prompt": "[slow:5000] a slow one"}})
    job_id = response.get_json()["id"]
    try:
        first = wait_for(lambda: attempts_of(rules, [job_id]), timeout=20, what="the first attempt to end")[0]
        assert (first.outcome, first.error_code) in {("transient", "GENERATOR_TIMEOUT"), ("transient", "TIME_LIMIT")}
        assert first.duration_ms < 1500  # cut at the kind's 0.8 s generator timeout, not after the 5 s answer
        assert internal(rules, job_id).status in ("retrying", "pending_background_retry", "processing")
    finally:
        rules.client.post("/api/jobs/%s/cancel" % job_id, headers=auth(token))


def test_at_most_max_concurrent_background_tasks_run_at_once(rules):
    token = rules.new_user()
    maintenance = next(process for process in rules.processes if process.name == "maintenance")
    # The background processor is held until all five wait for it, so that it finds more than
    # its two slots at once however far apart a loaded machine spreads their ladders.
    os.killpg(maintenance.popen.pid, signal.SIGSTOP)
    try:
        job_ids = [upload(rules.client, token, prompt="[fail:99][slow:500]").get_json()["id"] for _ in range(5)]
        wait_for(lambda: all(job_json(rules.client, token, job_id)["status"] == "pending_background_retry"
                             for job_id in job_ids), timeout=60, what="all five jobs to wait for the background tier")
    finally:
        os.killpg(maintenance.popen.pid, signal.SIGCONT)
    jobs = [wait_terminal(rules.client, token, job_id, timeout=90) for job_id in job_ids]
    # the ladder (1 + MAX_RETRIES) then the background tier (MAX_RETRY_ATTEMPTS), then failed
    assert {(job["status"], job["attempts"], job["retry_count"]) for job in jobs} == {("failed", 5, 3)}
    assert all(generator_calls(rules.generator_url, job_id)["calls"] == 5 for job_id in job_ids)
    tries = [attempt for attempt in attempts_of(rules, job_ids) if attempt.tier == "background"]
    assert len(tries) == 15
    spans = [(attempt.started_at.timestamp(), attempt.started_at.timestamp() + attempt.duration_ms / 1000)
             for attempt in tries]
    most_at_once = max(sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans)
    assert most_at_once == 2, "background tries at once: %d (MAX_CONCURRENT_BACKGROUND_TASKS=2): %s" % (
        most_at_once, sorted((str(a.job_id)[:6], a.number, a.started_at.strftime("%S.%f"), a.duration_ms) for a in tries))
    assert not any(a.job_id == b.job_id and a.started_at < b.started_at + _duration(b) and
                   b.started_at < a.started_at + _duration(a) for a, b in combinations(tries, 2))


def _duration(attempt: JobAttempt):
    from datetime import timedelta

    return timedelta(milliseconds=attempt.duration_ms)


def notifications(stack: IsolatedStack, token: str) -> list[dict]:
    return stack.client.get("/api/me/notifications", headers=auth(token)).get_json()["items"]


def test_failures_notify_with_notify_on_failure_but_a_cancel_never_does(rules):
    token = rules.new_user()
    failed = wait_terminal(rules.client, token, upload(rules.client, token, prompt="[invalid]").get_json()["id"])
    assert failed["status"] == "failed"
    waiting = upload(rules.client, token, prompt="[fail:99]").get_json()["id"]
    wait_for(lambda: job_json(rules.client, token, waiting)["attempts"] >= 1, what="the job to be tried once")
    canceled = rules.client.post("/api/jobs/%s/cancel" % waiting, headers=auth(token)).get_json()
    assert canceled["status"] == "canceled"
    told = wait_for(lambda: notifications(rules, token), what="the failure notice")
    assert [(item["job_id"], item["event"]) for item in told] == [(failed["id"], "failed")]
    assert told[0]["payload"]["error"] == {"code": "INVALID_INPUT", "message": INVALID_INPUT["ru"]}


def test_users_without_a_locale_are_told_in_default_locale(rules):
    for locale, expected in ((None, "ru"), ("en", "en")):
        token = rules.new_user(locale=locale)
        job = wait_terminal(rules.client, token, upload(rules.client, token,
                                                        prompt="[block:COPYRIGHT_VIOLATION]").get_json()["id"])
        assert job["message"] == BLOCK_MESSAGES["COPYRIGHT_VIOLATION"][expected]
        assert wait_for(lambda: notifications(rules, token))[0]["payload"]["message"] == job["message"]


def test_a_cancel_revokes_the_jobs_messages(rules):
    token = rules.new_user()
    job_id = upload(rules.client, token, prompt="[fail:99]", image=png_bytes()).get_json()["id"]
    wait_for(lambda: job_json(rules.client, token, job_id)["status"] == "retrying", what="the job to wait for a retry")
    assert rules.client.post("/api/jobs/%s/cancel" % job_id, headers=auth(token)).status_code == 200
    inspector = rules.app.extensions["celery"].control.inspect(timeout=2)
    wait_for(lambda: any(job_id in ids for ids in (inspector.revoked() or {}).values()),
             timeout=10, what="the workers to hold the job's messages revoked")
    calls = generator_calls(rules.generator_url, job_id)["calls"]
    assert job_json(rules.client, token, job_id)["status"] == "canceled"
    assert generator_calls(rules.generator_url, job_id)["calls"] == calls
