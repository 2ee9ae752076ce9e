"""A throwaway renderq stack for benchmarks: its own database and Redis index, real processes.

The stack runs the reference generator, the web (gunicorn, the Procfile's 2 workers and 16
threads unless told otherwise), beat and the maintenance and webhooks consumers. The attempts
worker starts with the stack unless `attempts_worker=False`: a benchmark that needs a backlog
first, or a worker of another size, starts and stops it with start_worker() / stop_worker().
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import psutil
import psycopg
import redis
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support import (
    BIN,
    Process,
    free_port,
    side_processes,
    wait_for,
    wait_for_health,
    worker_command,
)

# The Procfile's web line: `gunicorn --workers 2 --threads 16`.
WEB_WORKERS = 2
WEB_THREADS = 16


class BenchStack:
    # Redis index 12 by default: the test suite's isolated stacks take 13 (tests/isolated.py),
    # and a bench worker there would take their attempt messages (and they ours).
    def __init__(self, settings: dict, generator_env: dict, concurrency: int = 3, redis_db: int = 12,
                 attempts_worker: bool = True, generator_threads: int = 32):
        self.work = Path(tempfile.mkdtemp(prefix="renderq-bench-"))
        base_db = os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
        base_redis = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        self.db_name = f"renderq_bench_{uuid.uuid4().hex[:8]}"
        base = make_url(base_db)
        self.admin_dsn = base.set(drivername="postgresql", database="postgres").render_as_string(False)
        self.database_url = base.set(drivername="postgresql+psycopg", database=self.db_name).render_as_string(False)
        self.dsn = make_url(self.database_url).set(drivername="postgresql").render_as_string(False)
        self.redis_url = f"{base_redis.rsplit('/', 1)[0]}/{redis_db}"
        self.env = {**os.environ, **settings, "DATABASE_URL": self.database_url, "REDIS_URL": self.redis_url,
                    "MEDIA_ROOT": str(self.work / "media")}
        self.generator_env = {**self.env, **generator_env}
        self.generator_threads = generator_threads
        self.concurrency = concurrency
        self.attempts_worker = attempts_worker
        self.processes: list[Process] = []
        self.workers: list[Process] = []  # the attempts worker's processes (start_worker)

    def __enter__(self) -> Self:
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {self.db_name}")
        # One connection for the benchmark's own polling: a new connection per poll would fork a
        # server process each time, load that neither side of a comparison should pay for.
        self._db = psycopg.connect(self.dsn, autocommit=True)
        self._db_lock = threading.Lock()
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        redis.Redis.from_url(self.redis_url).flushdb()
        self.generator_url = f"http://127.0.0.1:{free_port()}"
        # The generator's gthread pool must be wider than the calls it is to take at once.
        self.processes.append(Process("generator", [
            str(BIN / "gunicorn"), "--bind", self.generator_url[7:], "--workers", "1", "--worker-class", "gthread",
            "--threads", str(self.generator_threads), "generator:create_app()"], self.generator_env, self.work).start())
        wait_for_health(self.generator_url, timeout=20, what="the generator to answer /healthz")
        self.env["GENERATOR_URL"] = self.generator_url
        subprocess.run([str(BIN / "flask"), "--app", "webapp", "db", "upgrade"], env=self.env, check=True,
                       capture_output=True)
        self.web_url = f"http://127.0.0.1:{free_port()}"
        self.processes.append(Process("web", [
            str(BIN / "gunicorn"), "--bind", self.web_url[7:], "--workers", str(WEB_WORKERS),
            "--threads", str(WEB_THREADS), "webapp:create_app()"], self.env, self.work).start())
        self.processes += [process.start() for process in side_processes(self.env, self.work)]
        wait_for_health(self.web_url, timeout=30, what="the web process")
        if self.attempts_worker:
            self.start_worker(self.concurrency)

    @property
    def worker(self) -> Process | None:
        return self.workers[0] if self.workers else None

    def start_worker(self, concurrency: int, settings: dict | None = None, processes: int = 1) -> Process:
        """The attempts worker as the Procfile runs it (WORKER_POOL: threads unless set), with
        `concurrency` slots, as `processes` worker processes of an equal share of them (the
        Procfile's `worker` line run that many times on one host); returns once they have
        announced their slots."""
        self.stop_worker()
        env = {**self.env, **(settings or {})}
        for number in range(processes):
            command = worker_command(concurrency // processes)
            command[command.index("--hostname") + 1] += f"-{number}"
            self.workers.append(Process(f"worker-{number}" if number else "worker", command, env, self.work).start())
        wait_for(lambda: self.scalar("SELECT count(*) FROM worker_hosts WHERE expires_at > now()") >= processes
                 or any(worker.popen.poll() is not None for worker in self.workers),
                 timeout=60, what="the attempts worker to announce its slots")
        for worker in self.workers:
            if worker.popen.poll() is not None:
                raise RuntimeError("the attempts worker exited:\n" + worker.log_tail())
        return self.workers[0]

    def stop_worker(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []
        self.execute("DELETE FROM worker_hosts")  # a stopped worker withdraws its slots; make sure

    def database_connections_by_process(self) -> dict[str, list[int]]:
        """TCP connections to PostgreSQL's port held by each OS process of each of the stack's
        processes (a gunicorn master and its workers, say), by name: where a growing
        pg_stat_activity count comes from."""
        port = make_url(self.database_url).port or 5432
        counts = {}
        for process in [*self.processes, *self.workers]:
            if process.popen is None or process.popen.poll() is not None:
                continue
            main = psutil.Process(process.popen.pid)
            counts[process.name] = [sum(1 for connection in member.net_connections("tcp")
                                        if connection.raddr and connection.raddr.port == port)
                                    for member in [main, *main.children(recursive=True)]]
        return counts

    def worker_processes(self) -> list[psutil.Process]:
        """The attempts worker's main processes and every child they have."""
        mains = [psutil.Process(worker.popen.pid) for worker in self.workers if worker.popen.poll() is None]
        return [member for main in mains for member in [main, *main.children(recursive=True)]]

    def create_users(self, count: int, balance: int) -> list[str]:
        """`count` users with `balance` credits each (a top-up in the ledger, as `flask users
        create` writes it); their tokens. Straight in SQL: the CLI takes seconds a user."""
        tokens = [f"bench-{uuid.uuid4().hex}" for _ in range(count)]
        with psycopg.connect(self.dsn) as connection:
            for token in tokens:
                user_id = connection.execute(
                    "INSERT INTO users (email, token_hash, is_admin, balance, held) VALUES (%s, %s, false, %s, 0) "
                    "RETURNING id", (f"{token}@example.com", hashlib.sha256(token.encode()).hexdigest(), balance),
                ).fetchone()[0]
                connection.execute("INSERT INTO ledger_entries (user_id, entry_type, amount) VALUES (%s, 'topup', %s)",
                                   (user_id, balance))
        return tokens

    def create_user(self, balance: int, admin: bool = False) -> str:
        output = subprocess.run([str(BIN / "flask"), "--app", "webapp", "users", "create", "--email",
                                 f"bench-{uuid.uuid4().hex[:8]}@example.com", "--balance", str(balance)]
                                + (["--admin"] if admin else []),
                                env=self.env, check=True, capture_output=True, text=True).stdout
        return output.strip().splitlines()[-1]

    def query(self, sql: str, params: Sequence | Mapping | None = None) -> list[tuple]:
        """Rows of `sql` (psycopg placeholders; without `params`, a % is just a %)."""
        with self._db_lock:
            return self._db.execute(sql, params).fetchall()

    def scalar(self, sql: str, params: Sequence | Mapping | None = None) -> Any:
        return self.query(sql, params)[0][0]

    def execute(self, sql: str, params: Sequence | Mapping | None = None) -> None:
        with self._db_lock:
            self._db.execute(sql, params)

    def connections(self) -> int:
        """Server connections open to this stack's database, the caller's own excluded."""
        return self.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND pid <> pg_backend_pid()")

    def __exit__(self, *exc_info: object) -> None:
        for worker in self.workers:
            worker.stop()
        for process in reversed(self.processes):
            process.stop()
        redis.Redis.from_url(self.redis_url).flushdb()
        self._db.close()
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (self.db_name,))
            admin.execute(f"DROP DATABASE IF EXISTS {self.db_name}")
