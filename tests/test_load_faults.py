"""Faults under load: the same promises with a backlog queued and every worker process busy."""
from __future__ import annotations

import time

import pytest
import redis

from tests.conftest import generator_calls, job_json, upload, wait_terminal
from tests.support import wait_for


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


def test_messages_lost_while_the_broker_lives_on_are_published_again(client, user, stack, stack_env):
    _, token = user
    stack.worker.stop()
    try:
        jobs = [upload(client, token).get_json()["id"] for _ in range(3)]
        broker = redis.Redis.from_url(stack_env["REDIS_URL"])
        broker.delete("celery")  # the queue key, with the three messages; the broker epoch survives
    finally:
        stack.restart_worker()
    for job_id in jobs:
        job = wait_terminal(client, token, job_id, timeout=20)
        assert (job["status"], job["outcome"], job["attempts"]) == ("completed", "succeeded", 1)
