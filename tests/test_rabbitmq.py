"""The fault tests with RabbitMQ as the broker (BROKER_URL=amqp://...): the same promises as on Redis.

A stack of its own: a database, a private Redis for what is not the broker (`Prefer: wait`,
counters), and a private RabbitMQ node (Debian's rabbitmq-server, with a node name, ports and
data directory of the test's own), so that a test can SIGKILL the node and start it again, on
its data or without it. The fault tests of test_faults.py and test_load_faults.py are imported
below: pytest collects them as tests of this module too, so they run again here, with this
module's `stack_env`, `app` and `stack`.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis

from tests.conftest import (
    BASE_DATABASE_URL,
    Stack,
    check_for_leaks,
    generator_calls,
    png_bytes,
    upload,
    wait_terminal,
)
from tests.support import (
    PrivateRabbitMQ,
    PrivateRedis,
    attempts_worker,
    create_database,
    drop_database,
    purge_attempts_queue,
    unreachable,
    wait_for,
)
from tests.test_faults import (  # noqa: F401  (collected again, on RabbitMQ)
    test_a_message_delivered_twice_runs_the_attempt_once,
    test_a_publish_that_fails_leaves_the_job_pending_for_the_reconciler,
    test_worker_killed_mid_attempt_the_job_still_completes_once,
)
from tests.test_load_faults import (  # noqa: F401  (collected again, on RabbitMQ)
    test_a_dead_workers_attempts_are_recovered_on_time_behind_a_backlog,
    test_messages_lost_while_the_broker_lives_on_are_published_again,
)


@pytest.fixture(scope="module")
def rabbit_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rabbitmq-stack-logs")


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory, rabbit_logs) -> Iterator[PrivateRabbitMQ]:
    node = PrivateRabbitMQ(tmp_path_factory.mktemp("rabbitmq-node"), rabbit_logs).start()  # boots meanwhile
    yield node
    node.kill()  # nothing in it is worth a graceful stop


@pytest.fixture(scope="module")
def side_redis(tmp_path_factory, rabbit_logs) -> Iterator[PrivateRedis]:
    """The Redis beside the broker (REDIS_URL): `Prefer: wait`, counters."""
    server = PrivateRedis(tmp_path_factory.mktemp("rabbitmq-stack-redis"), rabbit_logs).start()
    yield server
    server.process.kill()


@pytest.fixture(scope="module")
def stack_env(stack_env, rabbitmq, side_redis) -> Iterator[dict]:
    database = create_database(BASE_DATABASE_URL, "renderq_rabbitmq")
    yield {**stack_env, "DATABASE_URL": database, "REDIS_URL": side_redis.url, "BROKER_URL": rabbitmq.url}
    drop_database(database)


@pytest.fixture(scope="module")
def app(stack_env, rabbitmq):
    from flask_migrate import upgrade

    from webapp import create_app

    app = create_app(stack_env)
    app.after_request(check_for_leaks)
    with app.app_context():
        upgrade()
    rabbitmq.wait_ready()
    return app


@pytest.fixture(scope="module")
def stack(app, stack_env, rabbit_logs) -> Iterator[Stack]:
    running = Stack(stack_env, rabbit_logs).start()
    yield running
    running.stop()


@pytest.fixture()
def user(make_user, stack):
    return make_user(balance=500)


def _auth(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def test_readyz_checks_rabbitmq_and_redis_beside_it(app, client, stack_env, stack):
    from webapp import create_app

    assert client.get("/readyz").get_json()["checks"] == {"database": "ok", "broker": "ok", "redis": "ok"}
    no_broker = create_app({**stack_env, "BROKER_URL": unreachable(stack_env["BROKER_URL"])}).test_client()
    answer = no_broker.get("/readyz")
    assert answer.status_code == 503
    assert answer.get_json()["checks"] == {"database": "ok", "broker": "unreachable", "redis": "ok"}
    no_redis = create_app({**stack_env, "REDIS_URL": unreachable(stack_env["REDIS_URL"])}).test_client()
    assert no_redis.get("/readyz").get_json()["checks"] == {"database": "ok", "broker": "ok", "redis": "unreachable"}
    # the messages go through RabbitMQ: Redis holds no Celery queue nor kombu's bindings
    keys = redis.Redis.from_url(stack_env["REDIS_URL"]).keys("*")
    assert not [key for key in keys if key == b"celery" or key.startswith((b"_kombu", b"unacked"))], keys


def test_with_redis_away_jobs_are_still_accepted_and_run(client, user, side_redis, stack, generator):
    _, token = user
    side_redis.process.kill()  # every process loses Redis; RabbitMQ and PostgreSQL stay
    try:
        started = time.monotonic()
        response = client.post("/api/photos", headers={**_auth(token), "Prefer": "wait=20"},
                               data={"file": (io.BytesIO(png_bytes()), "photo.png"), "prompt": "[slow:3000]"},
                               content_type="multipart/form-data")
        assert response.status_code == 202 and time.monotonic() - started < 3  # Prefer: wait cannot listen
        assert client.get("/readyz").get_json()["checks"] == {"database": "ok", "broker": "ok", "redis": "unreachable"}
        job = wait_terminal(client, token, response.get_json()["id"])
        assert (job["status"], job["attempts"], generator_calls(generator, job["id"])["calls"]) == ("completed", 1, 1)
    finally:
        side_redis.start()


def _all_succeed_once(client, token: str, job_ids: list[str], generator: str, most_calls: int) -> None:
    attempts = calls = 0
    for job_id in job_ids:
        job = wait_terminal(client, token, job_id, timeout=90)
        assert (job["status"], job["outcome"]) == ("completed", "succeeded"), job
        assert 1 <= generator_calls(generator, job_id)["calls"] <= job["attempts"] <= most_calls
        attempts, calls = attempts + job["attempts"], calls + generator_calls(generator, job_id)["calls"]
    print("%d jobs succeeded: %d attempts, %d generator calls" % (len(job_ids), attempts, calls))
    time.sleep(1.5)  # a late redelivery would show up as another call or a second charge
    me = client.get("/api/me", headers=_auth(token)).get_json()
    assert me["balance"] == me["available"] == 100 - len(job_ids)  # each charged exactly once
    notified = client.get("/api/me/notifications", headers=_auth(token)).get_json()["items"]
    assert sorted(n["job_id"] for n in notified) == sorted(job_ids)  # each notified once


def test_rabbitmq_killed_and_restarted_under_running_and_queued_jobs_loses_no_job(
        client, make_user, stack, rabbitmq, generator):
    _, token = make_user(balance=100)
    running = [upload(client, token, prompt="[slow:1500]").get_json()["id"] for _ in range(2)]
    wait_for(lambda: all(generator_calls(generator, job_id)["in_flight"] for job_id in running),
             what="both worker processes to be calling the generator")
    queued = [upload(client, token).get_json()["id"] for _ in range(4)]

    took = rabbitmq.restart(keep_data=True)  # SIGKILL, then start on its data: durable queues come back
    print("RabbitMQ restarted on its data in %.1f s" % took)

    _all_succeed_once(client, token, running + queued, generator, most_calls=2)
    assert all(generator_calls(generator, job_id)["calls"] == 1 for job_id in queued)
    # monitoring reads the restarted node again (a pooled connection may fail once first)
    stats = wait_for(lambda: (lambda stats: stats if stats["workers_online"] and stats["broker_queue_depth"] == 0
                              else None)(client.get("/api/queue/stats", headers=_auth(token)).get_json()),
                     timeout=20, what="/api/queue/stats to read the restarted RabbitMQ")
    assert stats["workers_online"] == 3  # the attempts, maintenance and webhooks workers, all reconnected


def test_rabbitmq_restarting_without_its_data_under_sent_messages_loses_no_job(
        app, client, make_user, stack, rabbitmq, generator):
    from renderq import broker

    _, token = make_user(balance=100)
    celery = app.extensions["celery"]
    # the worker stays up (its slots count) but takes nothing from the queue for a while
    assert celery.control.cancel_consumer("celery", destination=[attempts_worker(celery)], reply=True)
    try:
        purge_attempts_queue(celery)  # what earlier tests left behind (stale messages that would step aside)
        job_ids = [upload(client, token).get_json()["id"] for _ in range(5)]
        with app.app_context():
            # the scheduler sent messages for the worker's two free slots; three jobs wait in PostgreSQL
            wait_for(lambda: broker.queue_depth() == 2, timeout=10, what="two attempt messages in RabbitMQ")
            took = rabbitmq.restart(keep_data=False)  # a node that lost its disk: no queue, no message
            print("RabbitMQ restarted empty in %.1f s" % took)
            assert broker.queue_depth() == 0
    finally:  # a fresh worker: add_consumer would not survive the worker's next reconnect
        stack.worker.kill()  # it holds no message, and a warm shutdown would wait for the broker
        stack.restart_worker()
    _all_succeed_once(client, token, job_ids, generator, most_calls=1)
    assert all(generator_calls(generator, job_id)["calls"] == 1 for job_id in job_ids)
