"""Redis with a password (`redis-server --requirepass`, REDIS_URL=redis://:PASSWORD@host:port/0):
a job runs end to end through it, and the password shows in no response and no log line of any
process (Celery masks it as `**`; renderq's own start-up errors as `***`)."""
from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.conftest import BASE_DATABASE_URL, Stack, png_bytes
from tests.support import (
    BIN,
    PrivateRedis,
    Process,
    create_database,
    drop_database,
    free_port,
    wait_for_health,
)

PASSWORD = "pw-" + secrets.token_hex(12)


class PasswordSystem:
    def __init__(self, env: dict, web_url: str, log_dir: Path):
        self.env, self.web_url, self.log_dir = env, web_url, log_dir
        self.responses: list[requests.Response] = []

    def call(self, method: str, path: str, **options: object) -> requests.Response:
        response = requests.request(method, self.web_url + path, timeout=30, **options)
        self.responses.append(response)
        return response


@pytest.fixture(scope="module")
def system(stack_env, tmp_path_factory) -> Iterator[PasswordSystem]:
    from flask_migrate import upgrade

    from webapp import create_app

    log_dir = tmp_path_factory.mktemp("password-logs")
    server = PrivateRedis(tmp_path_factory.mktemp("password-redis"), log_dir, password=PASSWORD).start()
    assert server.url == "redis://:%s@127.0.0.1:%d/0" % (PASSWORD, server.port)
    database = create_database(BASE_DATABASE_URL, "renderq_password")
    env = {**stack_env, "DATABASE_URL": database, "REDIS_URL": server.url}
    with create_app(env).app_context():
        upgrade()
    stack = Stack(env, log_dir).start()
    web_url = "http://127.0.0.1:%d" % free_port()
    web = Process("web", [str(BIN / "gunicorn"), "--bind", web_url[7:], "--workers", "1", "--threads", "4",
                          "webapp:create_app()"], env, log_dir).start()
    try:
        wait_for_health(web_url, timeout=30, what="gunicorn")
        yield PasswordSystem(env, web_url, log_dir)
    finally:
        web.terminate()
        stack.stop()
        web.stop()
        drop_database(database)
        server.process.kill()


def _new_user(env: dict) -> str:
    from webapp import create_app

    result = create_app(env).test_cli_runner().invoke(
        args=["users", "create", "--email", "u%d@example.com" % time.monotonic_ns(), "--balance", "10"])
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


def test_a_job_runs_through_a_redis_with_a_password_that_shows_nowhere(system):
    import redis

    with pytest.raises(redis.AuthenticationError):  # the server does ask for it
        redis.Redis.from_url(system.env["REDIS_URL"].replace(":%s@" % PASSWORD, "")).ping()
    auth = {"Authorization": "Bearer " + _new_user(system.env)}
    # Prefer: wait listens on Redis's pub/sub, with the password too
    submitted = system.call("POST", "/api/photos", headers={**auth, "Prefer": "wait=20"},
                            files={"file": ("photo.png", png_bytes(), "image/png")}, data={"style": "sepia"})
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()
    assert (job["status"], job["outcome"]) == ("completed", "succeeded")
    assert system.call("GET", "/api/jobs/%s/result" % job["id"], headers=auth).content.startswith(b"\x89PNG")
    assert system.call("GET", "/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
    assert system.call("GET", "/api/queue/stats", headers=auth).json()["broker_queue_depth"] == 0
    assert "renderq_background_processor_runs_total" in system.call("GET", "/metrics").text
    assert system.call("GET", "/api/jobs/%s" % ("0" * 32), headers=auth).status_code == 404

    for response in system.responses:
        assert PASSWORD not in response.text and PASSWORD not in str(response.headers), response.url
    logs = {path.name: path.read_text(errors="replace") for path in system.log_dir.glob("*.log")}
    assert {"worker.log", "maintenance.log", "webhooks.log", "beat.log", "web.log"} <= set(logs)
    for name, text in logs.items():
        assert PASSWORD not in text, "%s shows the Redis password" % name
    assert "redis://:**@127.0.0.1" in logs["worker.log"]  # Celery names the broker, masked
