"""GENERATOR_MAX_INFLIGHT across worker processes, and fairness between users.

An isolated stack of its own (database, Redis database, generator, a 4-process worker,
beat) with the cap set to 2, so the cap is what limits the calls, not the worker count.
"""
from __future__ import annotations

import time

import pytest
import redis
import requests

from tests.conftest import (
    BASE_DATABASE_URL,
    BASE_REDIS_URL,
    FAST_TIMINGS,
    TEST_REDIS_DB,
    WEBHOOK_SECRET,
    upload,
    wait_terminal,
)
from tests.support import (
    Process,
    create_database,
    drop_database,
    redis_database,
    side_processes,
    start_generator,
    worker_command,
)

LIMIT = 2


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    from flask_migrate import upgrade

    from webapp import create_app

    work = tmp_path_factory.mktemp("capped")
    database_url, redis_url = create_database(BASE_DATABASE_URL), redis_database(BASE_REDIS_URL, TEST_REDIS_DB - 3)
    redis.Redis.from_url(redis_url).flushdb()
    env = {**{k: v for k, v in __import__("os").environ.items() if not k.startswith("GENERATOR_")},
           **FAST_TIMINGS, "DATABASE_URL": database_url, "REDIS_URL": redis_url, "APP_ENV": "production",
           "WEBHOOK_SECRET": WEBHOOK_SECRET, "MEDIA_ROOT": str(work / "media"), "GENERATOR_MAX_INFLIGHT": str(LIMIT)}
    generator, generator_url = start_generator(env, work)
    env["GENERATOR_URL"] = generator_url
    app = create_app(env)
    with app.app_context():
        upgrade()
    processes = [process.start() for process in
                 [Process("worker", worker_command(concurrency=4), env, work), *side_processes(env, work)]]
    yield app, generator_url
    for process in processes + [generator]:
        process.stop()
    redis.Redis.from_url(redis_url).flushdb()
    drop_database(database_url)


def make_user(app) -> str:
    result = app.test_cli_runner().invoke(args=["users", "create", "--email", "c%s@example.com" % time.time_ns(),
                                                "--balance", "100"])
    return result.output.strip().splitlines()[-1]


def test_no_more_than_the_cap_in_flight_and_a_burst_does_not_starve_others(capped):
    app, generator_url = capped
    client = app.test_client()
    burst_token, other_token = make_user(app), make_user(app)
    burst = [upload(client, burst_token, prompt="[slow:600]").get_json()["id"] for _ in range(8)]
    time.sleep(0.3)  # the burst is queued first
    other = upload(client, other_token, prompt="[slow:600]").get_json()["id"]

    other_done = wait_terminal(client, other_token, other, timeout=60)
    finished_burst = [wait_terminal(client, burst_token, job_id, timeout=60) for job_id in burst]
    assert other_done["outcome"] == "succeeded" and other_done["attempts"] == 1
    # the other user's job did not wait for the whole burst to drain
    last_burst = max(job["completed_at"] for job in finished_burst)
    assert other_done["completed_at"] < last_burst
    assert all(job["outcome"] == "succeeded" and job["attempts"] == 1 for job in finished_burst)
    stats = requests.get(generator_url + "/v1/stats", timeout=5).json()
    assert stats["calls"] == 9 and stats["max_in_flight"] == LIMIT
