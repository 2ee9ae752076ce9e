"""Faults under load: the same promises with a backlog queued and every worker process busy."""
from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import generator_calls, job_json, upload, wait_terminal
from tests.support import attempts_worker, purge_attempts_queue, wait_for


@pytest.fixture()
def user(make_user, stack):
    return make_user(balance=500)


def _cancel(client, token: str, job_ids: list[str]) -> None:
    """Drop what a test left queued, so that later tests get an idle stack."""
    for job_id in job_ids:
        client.post("/api/jobs/%s/cancel" % job_id, headers={"Authorization": "Bearer " + token})


def test_a_dead_workers_attempts_are_recovered_on_time_behind_a_backlog(client, user, stack, generator):
    _, token = user
    backlog = [upload(client, token, prompt="[slow:3000]").get_json()["id"] for _ in range(16)]
    try:
        running = wait_for(lambda: [job_id for job_id in backlog if generator_calls(generator, job_id)["in_flight"]]
                           if sum(generator_calls(generator, job_id)["in_flight"] for job_id in backlog) == 2 else None,
                           timeout=30, what="both worker processes to be busy")
        stack.worker.kill()
        killed_at = time.monotonic()
        stack.restart_worker()
        # lease (2 s) + two reconciler periods (0.5 s each) + a grace for a loaded machine
        for job_id in running:
            wait_for(lambda: job_json(client, token, job_id)["status"] != "processing"
                     or job_json(client, token, job_id)["attempts"] > 1,
                     timeout=10, what="job %s to be recovered behind the backlog" % job_id)
        assert time.monotonic() - killed_at < 10
    finally:
        _cancel(client, token, backlog)


def _dispatched(app, job_ids: list[str]) -> int:
    """How many of these jobs the scheduler has sent an attempt message for."""
    from sqlalchemy import func, select

    from renderq.db import db
    from renderq.models import Job

    with app.app_context():
        count = db.session.execute(select(func.count()).select_from(Job).where(
            Job.id.in_([uuid.UUID(job_id) for job_id in job_ids]), Job.dispatch_token.is_not(None))).scalar()
        db.session.rollback()
        return count


def test_messages_lost_while_the_broker_lives_on_are_published_again(app, client, user, stack, generator):
    _, token = user
    celery = app.extensions["celery"]

    def waiting_in_broker() -> int:  # as the API reads it, from the broker in use
        return client.get("/api/queue/stats", headers={"Authorization": "Bearer " + token}).get_json()["broker_queue_depth"]

    # the worker stays up (its slots count) but takes nothing from the queue for a while
    assert celery.control.cancel_consumer("celery", destination=[attempts_worker(celery)], reply=True)
    try:
        purge_attempts_queue(celery)  # what earlier tests' canceled jobs left behind (stale: they would step aside)
        jobs = [upload(client, token).get_json()["id"] for _ in range(3)]
        # messages for the worker's free slots wait in the broker, the rest of the jobs in PostgreSQL
        sent = wait_for(lambda: (lambda count: count if count and waiting_in_broker() == count else None)(
            _dispatched(app, jobs)), timeout=10, what="attempt messages waiting in the broker")
        assert purge_attempts_queue(celery) == sent  # the messages are lost; the broker lives on
        print("%d attempt messages purged under %d jobs" % (sent, len(jobs)))
        assert waiting_in_broker() == 0
    finally:  # a fresh worker: add_consumer would not survive the worker's next reconnect
        stack.worker.stop()
        stack.restart_worker()
    for job_id in jobs:
        job = wait_terminal(client, token, job_id, timeout=20)
        assert (job["status"], job["outcome"], job["attempts"]) == ("completed", "succeeded", 1)
        assert generator_calls(generator, job_id)["calls"] == 1
