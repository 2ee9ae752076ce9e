"""A throwaway renderq stack for benchmarks: its own database and Redis index, real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import BIN, Process, free_port, side_processes, start_generator, wait_for, worker_command  # noqa: E402


class BenchStack:
    def __init__(self, settings: dict, generator_env: dict, concurrency: int = 3, redis_db: int = 13):
        self.work = Path(tempfile.mkdtemp(prefix="renderq-bench-"))
        base_db = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
        base_redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        self.db_name = "renderq_bench_%s" % uuid.uuid4().hex[:8]
        self.admin_dsn = make_url(base_db).set(drivername="postgresql", database="postgres").render_as_string(False)
        self.database_url = make_url(base_db).set(drivername="postgresql+psycopg", database=self.db_name).render_as_string(False)
        self.dsn = make_url(self.database_url).set(drivername="postgresql").render_as_string(False)
        self.redis_url = base_redis.rsplit("/", 1)[0] + "/%d" % redis_db
        self.env = {**os.environ, **settings, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
                    "MEDIA_ROOT": str(self.work / "media")}
        self.generator_env = {**self.env, **generator_env}
        self.concurrency = concurrency
        self.processes: list[Process] = []

    def __enter__(self) -> "BenchStack":
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute("CREATE DATABASE %s" % self.db_name)
        redis.Redis.from_url(self.redis_url).flushdb()
        generator, self.generator_url = start_generator(self.generator_env, self.work)
        self.processes.append(generator)
        self.env["GENERATOR_URL"] = self.generator_url
        subprocess.run([str(BIN / "flask"), "--app", "webapp", "db", "upgrade"], env=self.env, check=True,
                       capture_output=True)
        self.web_url = "http://127.0.0.1:%d" % free_port()
        self.processes.append(Process("web", [str(BIN / "gunicorn"), "--bind", self.web_url[7:], "--workers", "2",
                                              "--threads", "8", "webapp:create_app()"], self.env, self.work).start())
        self.processes.append(Process("worker", worker_command(self.concurrency), self.env, self.work).start())
        self.processes += [process.start() for process in side_processes(self.env, self.work)]
        import requests
        wait_for(lambda: _ok(requests, self.web_url + "/healthz"), timeout=30, what="the web process")
        return self

    def create_user(self, balance: int, admin: bool = False) -> str:
        output = subprocess.run([str(BIN / "flask"), "--app", "webapp", "users", "create", "--email",
                                 "bench-%s@example.com" % uuid.uuid4().hex[:8], "--balance", str(balance)]
                                + (["--admin"] if admin else []),
                                env=self.env, check=True, capture_output=True, text=True).stdout
        return output.strip().splitlines()[-1]

    def query(self, sql: str) -> list[tuple]:
        with psycopg.connect(self.dsn) as connection:
            return connection.execute(sql).fetchall()

    def __exit__(self, *exc_info: object) -> None:
        for process in reversed(self.processes):
            process.stop()
        redis.Redis.from_url(self.redis_url).flushdb()
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (self.db_name,))
            admin.execute("DROP DATABASE IF EXISTS %s" % self.db_name)


def _ok(requests, url: str) -> bool:
    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False
