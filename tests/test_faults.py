"""SPEC §11 guarantees, each proved by provoking the fault against the real processes."""
from __future__ import annotations

import time

import pytest
import redis

from tests.conftest import generator_calls, job_json, upload, wait_terminal
from tests.support import wait_for


@pytest.fixture()
def user(make_user, stack):
    return make_user()


def test_worker_killed_mid_attempt_the_job_still_completes_once(client, user, stack, generator):
    _, token = user
    job_id = upload(client, token, prompt="[slow:3000]").get_json()["id"]
    wait_for(lambda: generator_calls(generator, job_id)["in_flight"] == 1, what="the slow attempt to start")
    assert job_json(client, token, job_id)["status"] == "processing"

    stack.worker.kill()  # SIGKILL, parent and pool: nobody acknowledges or requeues anything
    stack.restart_worker()

    job = wait_terminal(client, token, job_id, timeout=60)
    assert (job["status"], job["outcome"]) == ("completed", "succeeded")
    assert job["attempts"] == 2  # the killed attempt counts as a transient failure
    time.sleep(2)  # anything redelivered late would show up as a third call
    assert generator_calls(generator, job_id)["calls"] == 2
    assert job_json(client, token, job_id)["attempts"] == 2


def test_redis_losing_everything_loses_no_job(client, user, stack, redis_url, generator):
    _, token = user
    stack.worker.stop()  # so the accepted jobs sit in Redis when it loses them
    job_ids = [upload(client, token).get_json()["id"] for _ in range(5)]
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen("celery") >= 5
    # FLUSHDB of the tests' own database index: everything renderq keeps in Redis, as a
    # restart without persistence loses it (FLUSHALL would wipe the machine's other databases).
    broker.flushdb()
    assert broker.llen("celery") == 0
    stack.restart_worker()
    for job_id in job_ids:
        job = wait_terminal(client, token, job_id, timeout=60)
        assert (job["status"], job["outcome"], job["attempts"]) == ("completed", "succeeded", 1)
        assert generator_calls(generator, job_id)["calls"] == 1


def test_a_message_delivered_twice_runs_the_attempt_once(app, client, user, generator):
    _, token = user
    job_id = upload(client, token, prompt="[slow:800]").get_json()["id"]
    with app.app_context():  # the same task message, published again as a redelivery would
        app.extensions["celery"].send_task("renderq.jobs.attempt", args=[job_id])
        app.extensions["celery"].send_task("renderq.jobs.attempt", args=[job_id])
    job = wait_terminal(client, token, job_id)
    assert (job["status"], job["attempts"]) == ("completed", 1)
    time.sleep(1)
    calls = generator_calls(generator, job_id)
    assert (calls["calls"], calls["max_in_flight"]) == (1, 1)


def test_a_publish_that_fails_leaves_the_job_pending_for_the_reconciler(app, client, user, stack_env, generator):
    from webapp import create_app

    _, token = user
    unreachable = create_app({**stack_env, "REDIS_URL": "redis://127.0.0.1:1/0"})  # a broker that refuses
    started = time.monotonic()
    response = upload(unreachable.test_client(), token)
    assert response.status_code == 202
    assert time.monotonic() - started < 5  # the client is not kept waiting on the broker
    job = response.get_json()
    assert job["status"] == "pending"
    job = wait_terminal(client, token, job["id"])
    assert (job["status"], job["attempts"]) == ("completed", 1)


def test_database_connections_dropped_mid_attempt_every_job_still_ends_once(app, client, user, generator):
    """What clients see of a PostgreSQL restart: every open connection dies at once."""
    from sqlalchemy import text

    from webapp.extensions import db

    _, token = user
    job_ids = [upload(client, token, prompt="[slow:1200]").get_json()["id"] for _ in range(3)]
    wait_for(lambda: any(generator_calls(generator, job_id)["in_flight"] for job_id in job_ids),
             what="attempts to be running")
    with app.app_context():
        killed = db.session.execute(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        db.session.rollback()
    assert killed >= 1
    for job_id in job_ids:
        job = wait_terminal(client, token, job_id, timeout=90)
        assert (job["status"], job["outcome"]) == ("completed", "succeeded")
        # an attempt cut off before it reached the generator still counts (SPEC §11: recovered = transient)
        assert 1 <= generator_calls(generator, job_id)["calls"] <= job["attempts"] <= 2
    me = client.get("/api/me", headers={"Authorization": "Bearer " + token}).get_json()
    assert me["balance"] == me["available"] == 1000 - len(job_ids)  # each charged exactly once
