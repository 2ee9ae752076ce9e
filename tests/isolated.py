"""A whole renderq of a test's own (database, Redis database, generator, workers, beat) for
settings the shared stack does not run with, or faults that would disturb it."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import redis

from tests.conftest import (
    BASE_DATABASE_URL,
    BASE_REDIS_URL,
    FAST_TIMINGS,
    TEST_REDIS_DB,
    WEBHOOK_SECRET,
    check_for_leaks,
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

# Isolated stacks take turns on this Redis database (one test process runs its modules one after another).
ISOLATED_REDIS_DB = TEST_REDIS_DB - 1


class IsolatedStack:
    def __init__(self, work: Path, settings: dict, generator_settings: Optional[dict] = None, concurrency: int = 2):
        self.work = work
        self.database_url = create_database(BASE_DATABASE_URL)
        self.redis_url = redis_database(BASE_REDIS_URL, ISOLATED_REDIS_DB)
        self.env = {**{key: value for key, value in os.environ.items() if not key.startswith("GENERATOR_")},
                    **FAST_TIMINGS, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
                    "APP_ENV": "production", "WEBHOOK_SECRET": WEBHOOK_SECRET, "MEDIA_ROOT": str(work / "media"),
                    "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8", **settings}
        self.generator_settings = generator_settings or {}
        self.concurrency = concurrency
        self.processes: list[Process] = []

    def start(self) -> "IsolatedStack":
        from flask_migrate import upgrade

        from webapp import create_app

        redis.Redis.from_url(self.redis_url).flushdb()
        self.generator, self.generator_url = start_generator({**self.env, **self.generator_settings}, self.work)
        self.env["GENERATOR_URL"] = self.generator_url
        self.app = create_app(self.env)
        self.app.after_request(check_for_leaks)
        with self.app.app_context():
            upgrade()
        self.worker = Process("worker", worker_command(self.concurrency), self.env, self.work).start()
        self.processes = [process.start() for process in side_processes(self.env, self.work)]
        self.client = self.app.test_client()
        return self

    def restart_worker(self) -> None:
        self.worker = Process("worker", worker_command(self.concurrency), self.env, self.work).start()

    def restart_generator(self) -> None:
        self.generator.stop()
        self.generator, url = start_generator({**self.env, **self.generator_settings}, self.work,
                                              port=int(self.generator_url.rsplit(":", 1)[1]))
        assert url == self.generator_url

    def new_user(self, balance: int = 100, locale: Optional[str] = None) -> str:
        arguments = ["users", "create", "--email", "i%d@example.com" % time.monotonic_ns(), "--balance", str(balance)]
        result = self.app.test_cli_runner().invoke(args=arguments + (["--locale", locale] if locale else []))
        assert result.exit_code == 0, result.output
        return result.output.strip().splitlines()[-1]

    def stop(self) -> None:
        for process in [self.worker, *self.processes, self.generator]:
            process.stop()
        redis.Redis.from_url(self.redis_url).flushdb()
        drop_database(self.database_url)
