"""The guarantees of docs/lifecycle.md, each proved by provoking the fault against the real processes
(Redis and PostgreSQL themselves going away: test_server_restarts.py)."""
from __future__ import annotations

import time

import pytest

from tests.conftest import generator_calls, job_json, upload, wait_terminal
from tests.support import unreachable, wait_for


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
    # the broker in use refuses (Redis or RabbitMQ), everything else answers
    refused = create_app({**stack_env, "BROKER_URL": unreachable(stack_env.get("BROKER_URL", stack_env["REDIS_URL"]))})
    started = time.monotonic()
    response = upload(refused.test_client(), token)
    assert response.status_code == 202
    assert time.monotonic() - started < 5  # the client is not kept waiting on the broker
    # (the job may already be running: any process may send a waiting job's message)
    job = wait_terminal(client, token, response.get_json()["id"])
    assert (job["status"], job["attempts"]) == ("completed", 1)


def test_a_database_error_that_is_a_bug_is_not_retried_in_place(app, client, user, stack, generator):
    """Recording the first attempt's answer hits an error that waiting cannot cure (here a
    trigger that raises, as a bug or a broken migration would): the attempt gives up at once
    instead of retrying it, its lease lapses, and the job is recovered and run again, charged once."""
    from sqlalchemy import text

    from renderq.db import db

    marker = "probe-%d" % time.monotonic_ns()
    with app.app_context():
        db.session.execute(text("""
            CREATE FUNCTION refuse_first_answer() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.number = 1 AND NEW.outcome <> 'lost' AND EXISTS (SELECT 1 FROM jobs WHERE id = NEW.job_id
                                              AND params->>'prompt' = '%s') THEN
                    RAISE EXCEPTION 'refused by the test';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_first_answer BEFORE INSERT ON job_attempts
                FOR EACH ROW EXECUTE FUNCTION refuse_first_answer();""" % marker))
        db.session.commit()
    try:
        _, token = user
        before = client.get("/api/me", headers={"Authorization": "Bearer " + token}).get_json()["balance"]
        job_id = upload(client, token, prompt=marker).get_json()["id"]
        job = wait_terminal(client, token, job_id, timeout=30)
    finally:
        with app.app_context():
            db.session.execute(text("DROP TRIGGER refuse_first_answer ON job_attempts; "
                                    "DROP FUNCTION refuse_first_answer()"))
            db.session.commit()
    assert (job["status"], job["outcome"], job["attempts"]) == ("completed", "succeeded", 2)
    assert generator_calls(generator, job_id)["calls"] == 2
    me = client.get("/api/me", headers={"Authorization": "Bearer " + token}).get_json()
    assert before - me["balance"] == job["price"] and me["balance"] == me["available"]
    assert "refused by the test" in stack.worker.log_path.read_text(errors="replace")
