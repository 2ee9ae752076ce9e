"""The real stack for the tests: a database of their own on DATABASE_URL's server, a Redis
database index of their own on REDIS_URL's server, the reference generator over HTTP, and
real Celery worker and beat processes. Everything is removed at the end of the session.
"""
from __future__ import annotations

import base64
import io
import os
import re
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import redis
import requests
from PIL import Image

from tests.support import (
    BIN,
    Process,
    create_database,
    drop_database,
    free_port,
    redis_database,
    side_processes,
    start_generator,
    wait_for,
    wait_for_health,
    worker_command,
)

# pytest-xdist runs test files in parallel processes named gw0, gw1, ...: each takes Redis
# databases of its own (this one, TEST_REDIS_DB - 1 for the isolated stacks, - 3 for the throttle's).
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
TEST_REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "14")) - 4 * XDIST_WORKER

# The files that take longest start first, so that the parallel processes finish together.
LONGEST_FILES = ("test_chaos_smoke.py", "test_rabbitmq.py", "test_multihost.py", "test_rules.py",
                 "test_production_timings.py", "test_server_restarts.py")


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the order within a file and among the others stays

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"renderq-tests-webhook-secret-24").decode()

# Scaled-down timings: the same ladder shape as production, in tenths of a second.
FAST_TIMINGS = {
    "RETRY_DELAYS": "0.3,0.6,0.9,1.2,1.5",
    "QUEUE_CHECK_INTERVAL": "0.5",
    "BACKGROUND_PROCESSING_INTERVAL": "700",
    "JOB_LEASE_SECONDS": "2",
    "WEBHOOK_RETRY_DELAYS": "0.3,0.6,0.9",
    "EVENT_HEARTBEAT_SECONDS": "1",
}

# The tests' webhook receivers listen on loopback, which renderq refuses unless allow-listed.
WEBHOOK_ALLOWED_NETWORKS = "127.0.0.0/8"


BASE_DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
BASE_REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = create_database(BASE_DATABASE_URL)
    yield url
    drop_database(url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = redis_database(BASE_REDIS_URL, TEST_REDIS_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def base_env(database_url, redis_url, tmp_path_factory) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GENERATOR_")}
    env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, APP_ENV="production", WEBHOOK_SECRET=WEBHOOK_SECRET,
               WEBHOOK_ALLOWED_NETWORKS=WEBHOOK_ALLOWED_NETWORKS, MEDIA_ROOT=str(tmp_path_factory.mktemp("media")), **FAST_TIMINGS)
    return env


@pytest.fixture(scope="session")
def generator(base_env, log_dir) -> Iterator[str]:
    process, url = start_generator(base_env, log_dir)
    yield url
    process.stop()


@pytest.fixture(scope="session")
def stack_env(base_env, generator) -> dict:
    return {**base_env, "GENERATOR_URL": generator}


# What a production response must never show (docs/api.md, errors): stack traces, exception classes,
# SQL, file paths, the addresses of internal services.
LEAKS = re.compile(r"Traceback|File \"|\b[A-Z][a-z]+[A-Za-z]*(?:Error|Exception)\b|\b(?:SELECT|INSERT INTO|UPDATE \w+ SET)\b"
                   r"|psycopg|sqlalchemy|site-packages|\.py\b|/work/|/tmp/|:5432|:6379")
LEAKED: list[str] = []


def check_for_leaks(response):
    if response.mimetype in ("application/json", "text/html", "text/plain") and not response.direct_passthrough:
        body = response.get_data(as_text=True)
        match = LEAKS.search(body)
        if match:
            LEAKED.append("%s: %r in %s" % (response.status, match.group(0), body[:300]))
    return response


@pytest.fixture(scope="session")
def app(stack_env):
    from flask_migrate import upgrade

    from webapp import create_app

    app = create_app(stack_env)
    app.after_request(check_for_leaks)
    with app.app_context():
        upgrade()
    return app


@pytest.fixture(autouse=True)
def no_leaks_in_responses():
    """Every response the suite receives from the app is checked, in production mode."""
    LEAKED.clear()
    yield
    assert not LEAKED, "responses leaked internals: %s" % LEAKED


class Stack:
    """The worker and beat processes, which fault tests kill and restart."""

    def __init__(self, env: dict, log_dir: Path):
        self.env = env
        self.log_dir = log_dir
        self.worker = Process("worker", worker_command(), env, log_dir)
        self.side = side_processes(env, log_dir)

    def start(self) -> "Stack":
        self.worker.start()
        for process in self.side:
            process.start()
        return self

    def restart_worker(self) -> None:
        self.worker = Process("worker", worker_command(), self.env, self.log_dir).start()

    def stop(self) -> None:
        processes = [*self.side, self.worker]
        for process in processes:  # all at once: each warm shutdown takes a second or two
            process.terminate()
        for process in processes:
            process.stop()


@pytest.fixture(scope="session")
def stack(app, stack_env, log_dir) -> Iterator[Stack]:
    running = Stack(stack_env, log_dir).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def web_url(stack, stack_env, log_dir) -> Iterator[str]:
    """The API served by a real gunicorn, for tests that need real HTTP or concurrency."""
    url = "http://127.0.0.1:%d" % free_port()
    process = Process("web", [str(BIN / "gunicorn"), "--bind", url[7:], "--workers", "2", "--threads", "8",
                              "webapp:create_app()"], stack_env, log_dir).start()
    wait_for_health(url, timeout=30, what="gunicorn")
    yield url
    process.stop()


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def make_user(app):
    def create(balance: int = 1000, admin: bool = False, locale: str | None = None) -> tuple[int, str]:
        arguments = ["users", "create", "--email", "u-%s@example.com" % uuid.uuid4().hex[:10],
                     "--balance", str(balance)] + (["--admin"] if admin else []) + (["--locale", locale] if locale else [])
        result = app.test_cli_runner().invoke(args=arguments)
        assert result.exit_code == 0, result.output
        token = result.output.strip().splitlines()[-1]
        user_id = int(result.output.split()[2])
        return user_id, token

    return create


def png_bytes(size: tuple[int, int] = (64, 48), color: str = "orange") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def upload(client, token: str, prompt: str = "", style: str = "sepia", image: bytes | None = None,
           size: tuple[int, int] = (64, 48)):
    data = {"file": (io.BytesIO(image or png_bytes(size)), "photo.png"), "style": style, "prompt": prompt}
    return client.post("/api/photos", data=data, headers={"Authorization": "Bearer " + token},
                       content_type="multipart/form-data")


def job_json(client, token: str, job_id: str) -> dict:
    response = client.get("/api/jobs/%s" % job_id, headers={"Authorization": "Bearer " + token})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def wait_terminal(client, token: str, job_id: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (lambda job: job if job["status"] in ("completed", "failed", "canceled") else None)(
        job_json(client, token, job_id)), timeout=timeout, what="job %s to finish" % job_id)


def generator_calls(generator_url: str, job_id: str) -> dict:
    return requests.get("%s/v1/calls/%s" % (generator_url, job_id), timeout=5).json()
