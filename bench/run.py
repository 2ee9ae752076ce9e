"""renderq's performance goals, each measured against a baseline in the same run, as one table.

    .venv/bin/python bench/run.py                  # every goal, 3 runs of goals 1-3 (20-40 min)
    .venv/bin/python bench/run.py --quick          # tiny sizes, 1 run: a smoke test (~3 min)
    .venv/bin/python bench/run.py --goals 1,3 --runs 5
    .venv/bin/python bench/run.py --goals 1 --profile-worker /tmp/worker.txt   # py-spy, raw stacks

1. pipeline: renderq end to end (HTTP submit to completion; and from a queued backlog, first
   claim to last completion) against a bare Celery task making the same generator call and
   one PostgreSQL UPDATE; same pool, concurrency and reliability flags; instant generator.
2. submit: POST /api/photos and POST /api/jobs against a bare Flask endpoint on the same
   gunicorn that reads the same body, INSERTs a row and publishes a Celery message.
3. width: a generator taking 2 s a call and 64 at once; a 64-thread worker with
   GENERATOR_MAX_INFLIGHT=64 on a backlog: slots busy, the most calls in flight, worker RSS.
4. reads at scale: single requests against a warm web on 100,000 and 1,000,000 jobs, and
   EXPLAIN (ANALYZE, BUFFERS) of every statement of the reads and of beat's sweeps
   (bench/reads_at_scale.py).
5. steady: worker RSS, threads and the database's connections before and after many jobs.

Each goal starts a stack of its own (bench/stack.py: a database renderq_bench_*, Redis index
13; the baselines use index 12). The machine is shared and has 2 cores, so figures are
noisy: every goal is a ratio against a baseline measured in the same run, or a bound. No
figure is asserted: the last column says whether a target is met.
"""
from __future__ import annotations

import argparse
import io
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis
import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import reads_at_scale
from bench.figures import Row, median, percentile, say
from bench.stack import WEB_THREADS, WEB_WORKERS, BenchStack
from renderq.app import pool_size
from tests.support import BIN, Process, free_port, wait_for

CLIENT_THREADS = 8  # HTTP clients, each with its own keep-alive Session (and its own user)
SUBMIT_SLICES = 4  # goal 2: each side's time in a run, taken in this many turns
PIPELINE_CONCURRENCY = 3  # CONCURRENT_JOBS' default: the attempts worker's threads, and the bare worker's
# The stacks and the baselines share Redis index 12 (queues celery, raw and bare): index 13, the
# other one this bench may use, is also the test suite's (tests/isolated.py).
REDIS_DB = 12
POLL_SECONDS = 0.05
WIDTH_SLOTS = 64
# The attempts worker's layouts on the one host: one process of 64 threads, and two of 32 (one a
# core), whose threads take turns at two GILs instead of one.
WIDTH_PROCESSES = (1, 2)
WIDTH_LATENCY_MS = 2000
GIB = 1024 ** 3
MIB = 1024 ** 2
RENDERQ_POOL_SIZE = pool_size(PIPELINE_CONCURRENCY)  # the connections a renderq process keeps at most
# The baselines' tables (bench/raw_celery.py counts its tasks done in one row; bench/bare_web.py inserts).
CREATE_RAW_DONE = "CREATE TABLE raw_done (id int PRIMARY KEY, done bigint NOT NULL)"
CREATE_BARE_JOBS = ("CREATE TABLE bare_jobs (id uuid PRIMARY KEY, kind text NOT NULL, params json NOT NULL, "
                    "size integer, created_at timestamptz NOT NULL DEFAULT now())")


@dataclass(frozen=True)
class Sizes:
    pipeline_jobs: int  # goal 1: jobs per side and run
    submit_seconds: float  # goal 2: measured load per endpoint, side and run
    width_backlog: int  # goal 3: jobs queued before the worker starts
    seeded_rows: tuple[int, int]  # goal 4: the two table sizes
    seeded_pending: int
    seeded_users: int
    read_requests: int  # goal 4: requests per endpoint and size
    steady_jobs: int  # goal 5
    steady_warmup: int


FULL = Sizes(pipeline_jobs=600, submit_seconds=20, width_backlog=1000, seeded_rows=(100_000, 1_000_000),
             seeded_pending=10_000, seeded_users=500, read_requests=500, steady_jobs=10_000, steady_warmup=300)
QUICK = Sizes(pipeline_jobs=60, submit_seconds=3, width_backlog=320, seeded_rows=(2_000, 20_000),
              seeded_pending=1_000, seeded_users=50, read_requests=100, steady_jobs=300, steady_warmup=50)


def small_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 192), "purple").save(buffer, "PNG")
    return buffer.getvalue()


class Clients:
    """CLIENT_THREADS threads, each with its own requests.Session (keep-alive) and its own token."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.local = threading.local()
        self.numbers = itertools.count()

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            self.local.session.headers["Authorization"] = "Bearer " + self.tokens[next(self.numbers) % len(self.tokens)]
        return self.local.session

    def submit_photos(self, web_url: str, count: int, image: bytes) -> list[str]:
        """Submit `count` photos; the job ids."""
        def one(_: int) -> str:
            response = self.session().post(web_url + "/api/photos", files={"file": ("bench.png", image, "image/png")},
                                           data={"style": "sepia"}, timeout=60)
            response.raise_for_status()
            return response.json()["id"]

        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            return list(pool.map(one, range(count)))

    def load(self, send: Callable[[requests.Session], requests.Response], seconds: float) -> tuple[float, list[float]]:
        """Every thread sends requests back to back for `seconds`: (the seconds it took, latencies)."""
        deadline = time.monotonic() + seconds
        latencies: list[list[float]] = [[] for _ in range(CLIENT_THREADS)]

        def run(index: int) -> None:
            session = self.session()
            while time.monotonic() < deadline:
                started = time.perf_counter()
                response = send(session)
                latencies[index].append(time.perf_counter() - started)
                response.raise_for_status()

        started = time.monotonic()
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            list(pool.map(run, range(CLIENT_THREADS)))
        return time.monotonic() - started, [latency for thread in latencies for latency in thread]


def completed_count(stack: BenchStack, job_ids: list[str]) -> int:
    return stack.scalar("SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[]) AND status IN "
                        "('completed', 'failed', 'canceled')", (job_ids,))


def wait_terminal(stack: BenchStack, job_ids: list[str], timeout: float = 1800) -> None:
    wait_for(lambda: completed_count(stack, job_ids) >= len(job_ids), timeout=timeout, interval=POLL_SECONDS,
             what=f"{len(job_ids)} jobs to finish")
    unsucceeded = stack.scalar("SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[]) AND outcome IS DISTINCT FROM "
                               "'succeeded'", (job_ids,))
    if unsucceeded:
        say(f"  note: {unsucceeded} of {len(job_ids)} jobs did not succeed")


def rss_bytes(processes: list) -> int:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a child that exited between listing and reading
            continue
    return total


def thread_count(processes: list) -> int:
    return sum(process.num_threads() for process in processes)


# --- goal 1: pipeline --------------------------------------------------------------------------


class BareWorker:
    """bench/raw_celery.py's worker on a queue of its own (raw-<pool>), counting itself done in
    `raw_done`. Its Celery settings are renderq's for that pool (WORKER_POOL)."""

    def __init__(self, stack: BenchStack, pool: str, concurrency: int, image_path: str):
        self.stack, self.image_path, self.queue = stack, image_path, f"raw-{pool}"
        os.environ.update(RAW_BROKER_URL=stack.redis_url, RAW_DATABASE_URL=stack.database_url)
        from bench.raw_celery import render

        self.render = render
        env = {**stack.env, "RAW_BROKER_URL": stack.redis_url, "RAW_DATABASE_URL": stack.database_url,
               "WORKER_POOL": pool}
        self.process = Process(f"bare-worker-{pool}", [
            str(BIN / "celery"), "-A", "bench.raw_celery", "worker", "-Q", self.queue, "--concurrency",
            str(concurrency), "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
            "--hostname", f"{self.queue}-{os.getpid()}@%h"], env, stack.work).start()

    def jobs_per_second(self, jobs: int) -> float:
        """Publish `jobs` tasks and wait for their UPDATEs: throughput from the first publish."""
        self.stack.execute("UPDATE raw_done SET done = 0")
        started = time.monotonic()
        for _ in range(jobs):
            self.render.apply_async((self.image_path, self.stack.generator_url), queue=self.queue)
        wait_for(lambda: self.stack.scalar("SELECT done FROM raw_done") >= jobs, timeout=900,
                 interval=POLL_SECONDS, what="the bare tasks")
        return jobs / (time.monotonic() - started)

    def stop(self) -> None:
        self.process.stop()


def renderq_submitted(stack: BenchStack, clients: Clients, jobs: int, image: bytes) -> float:
    """Jobs per second from the first HTTP submission until every job is completed."""
    started = time.monotonic()
    job_ids = clients.submit_photos(stack.web_url, jobs, image)
    accepted = time.monotonic() - started
    wait_terminal(stack, job_ids)
    elapsed = time.monotonic() - started
    say(f"  renderq: {jobs} accepted over HTTP in {accepted:.1f} s, all completed after {elapsed:.1f} s")
    return jobs / elapsed


def renderq_queued(stack: BenchStack, clients: Clients, jobs: int, image: bytes, concurrency: int,
                   profile_output: str | None = None) -> float:
    """Jobs per second on a backlog submitted while no worker ran: from the first claim to the
    last completion (database clock), so the worker's start-up is not counted."""
    stack.stop_worker()
    job_ids = clients.submit_photos(stack.web_url, jobs, image)
    stack.start_worker(concurrency)
    profiler = Profiler(stack.worker.popen.pid, profile_output) if profile_output else None
    wait_terminal(stack, job_ids)
    if profiler:
        profiler.stop()
        say(f"  py-spy stacks of the attempts worker (GIL held): {profile_output}")
    seconds = stack.scalar("SELECT extract(epoch FROM max(completed_at) - min(started_at)) FROM jobs "
                           "WHERE id = ANY(%s::uuid[])", (job_ids,))
    return jobs / float(seconds)


class Profiler:
    """py-spy sampling the attempts worker while a thread holds the GIL (raw collapsed stacks:
    where its CPU goes) until stopped."""

    def __init__(self, pid: int, output: str):
        self.popen = subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(pid), "--subprocesses", "--gil",
                                       "--format", "raw", "--rate", "200", "--output", output],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1)  # py-spy attaches

    def stop(self) -> None:
        self.popen.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        self.popen.wait(60)


def goal_pipeline(sizes: Sizes, runs: int, profile_output: str | None) -> list[Row]:
    say(f"\n== 1. pipeline: {sizes.pipeline_jobs} jobs per side and run, {PIPELINE_CONCURRENCY} slots each, "
        "instant generator; renderq's worker on threads (the default WORKER_POOL), the bare task on threads "
        "and on prefork")
    image = small_png()
    image_path = tempfile.mktemp(suffix=".png")
    Path(image_path).write_bytes(image)
    rates: dict[str, list[float]] = {name: [] for name in ("bare threads", "bare prefork", "submitted", "queued")}
    settings = {"CONCURRENT_JOBS": str(PIPELINE_CONCURRENCY)}
    with BenchStack(settings, {}, redis_db=REDIS_DB, attempts_worker=False) as stack:
        clients = Clients(stack.create_users(CLIENT_THREADS, balance=10 * sizes.pipeline_jobs * (2 * runs + 1)))
        stack.execute(CREATE_RAW_DONE)
        stack.execute("INSERT INTO raw_done VALUES (1, 0)")
        bare = {pool: BareWorker(stack, pool, PIPELINE_CONCURRENCY, image_path) for pool in ("threads", "prefork")}
        try:
            stack.start_worker(PIPELINE_CONCURRENCY)
            for worker in bare.values():  # warm-up: every worker connected, its pools filled
                worker.jobs_per_second(12)
            wait_terminal(stack, clients.submit_photos(stack.web_url, 20, image))
            # As autovacuum leaves a database within its first minute: planned with statistics.
            stack.execute("ANALYZE")
            for run in range(1, runs + 1):
                for pool, worker in bare.items():
                    rates[f"bare {pool}"].append(worker.jobs_per_second(sizes.pipeline_jobs))
                rates["submitted"].append(renderq_submitted(stack, clients, sizes.pipeline_jobs, image))
                rates["queued"].append(renderq_queued(stack, clients, sizes.pipeline_jobs, image, PIPELINE_CONCURRENCY,
                                                      profile_output if run == 1 else None))
                say(f"  run {run}: " + ", ".join(f"{name} {values[-1]:.1f} jobs/s" for name, values in rates.items()))
        finally:
            for worker in bare.values():
                worker.stop()
    rows = []
    for pool in ("threads", "prefork"):
        baseline = median(rates[f"bare {pool}"])
        for measure, name in (("renderq jobs/s, HTTP submit to completion", "submitted"),
                              ("renderq jobs/s, queued, 1st claim to last completion", "queued")):
            ratio = median(rates[name]) / baseline
            rows.append(Row("1 pipeline", f"{measure} vs bare on {pool}", f"{median(rates[name]):.1f}",
                            f"{baseline:.1f} bare Celery, {pool}", ratio, ">= 0.6", ratio >= 0.6))
    return rows


# --- goal 2: submit ----------------------------------------------------------------------------


def goal_submit(sizes: Sizes, runs: int) -> list[Row]:
    say(f"\n== 2. submit: {CLIENT_THREADS} keep-alive clients, {sizes.submit_seconds:g} s per endpoint, side and run "
        f"(in {SUBMIT_SLICES} turns); gunicorn {WEB_WORKERS} workers x {WEB_THREADS} threads on both sides")
    image = small_png()
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with BenchStack({}, {}, redis_db=REDIS_DB, attempts_worker=False) as stack:
        broker_url = stack.redis_url
        stack.execute(CREATE_BARE_JOBS)
        bare_url = f"http://127.0.0.1:{free_port()}"
        bare_web = Process("bare-web", [
            str(BIN / "gunicorn"), "--bind", bare_url[7:], "--workers", str(WEB_WORKERS), "--threads",
            str(WEB_THREADS), "bench.bare_web:app"],
            {**stack.env, "RAW_BROKER_URL": broker_url, "RAW_DATABASE_URL": stack.database_url}, stack.work).start()
        # renderq publishes an attempt message only for a free slot: a worker row with room for
        # everything makes each submission publish, as the bare endpoint does, and no worker
        # process takes CPU from the web (the bare side has none either). A stand-in for fast
        # workers finishes what was sent twice a second, so the slots in use stay few.
        stack.execute("INSERT INTO worker_hosts (name, slots, pool, generator_cap, expires_at) "
                      "VALUES ('bench-no-consumer/0', 100000, 'threads', 0, now() + interval '1 day')")
        finisher = Finisher(stack)
        try:
            wait_for(lambda: _answers(bare_url + "/jobs"), timeout=30, what="the bare web")
            clients = Clients(stack.create_users(CLIENT_THREADS, balance=10 ** 12))
            photo_form = {"style": "sepia", "prompt": ""}
            job_body = {"kind": "image.generate", "params": {"style": "sepia", "prompt": ""}}
            senders = {
                ("POST /api/photos", "bare"): lambda s: s.post(bare_url + "/photos", data=photo_form, timeout=30,
                                                               files={"file": ("bench.png", image, "image/png")}),
                ("POST /api/photos", "renderq"): lambda s: s.post(stack.web_url + "/api/photos", data=photo_form,
                                                                  files={"file": ("bench.png", image, "image/png")},
                                                                  timeout=30),
                ("POST /api/jobs", "bare"): lambda s: s.post(bare_url + "/jobs", json=job_body, timeout=30),
                ("POST /api/jobs", "renderq"): lambda s: s.post(stack.web_url + "/api/jobs", json=job_body, timeout=30),
            }
            for send in senders.values():  # warm-up: connections, pools, first requests of each worker
                clients.load(send, 1.0)
            for run in range(1, runs + 1):
                # Each side's time is cut into slices taken in turn: the shared machine's speed
                # drifts over a minute, and that drift then falls on both sides alike.
                measured = {key: ([], []) for key in senders}  # (seconds of each slice, latencies)
                for _ in range(SUBMIT_SLICES):
                    for key, send in senders.items():
                        seconds, latencies = clients.load(send, sizes.submit_seconds / SUBMIT_SLICES)
                        measured[key][0].append(seconds)
                        measured[key][1].extend(latencies)
                        redis.Redis.from_url(broker_url).delete("bare")
                        redis.Redis.from_url(stack.redis_url).delete("celery")  # attempt messages nobody consumes
                for key, (seconds, latencies) in measured.items():
                    rate = len(latencies) / sum(seconds)
                    results.setdefault(key, []).append((rate, percentile(latencies, 0.5), percentile(latencies, 0.99)))
                    say(f"  run {run}: {key[0]:17} {key[1]:8} {rate:6.1f} req/s, p50 "
                        f"{percentile(latencies, 0.5) * 1000:.1f} ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms")
        finally:
            finisher.stop()
            bare_web.stop()
    rows = []
    for endpoint in ("POST /api/photos", "POST /api/jobs"):
        ours, theirs = results[(endpoint, "renderq")], results[(endpoint, "bare")]
        ratio = median([r[0] for r in ours]) / median([r[0] for r in theirs])
        rows.append(Row("2 submit", endpoint, _rate_and_latency(ours), _rate_and_latency(theirs) + " bare", ratio,
                        ">= 0.6", ratio >= 0.6))
    return rows


def _rate_and_latency(runs: list[tuple[float, float, float]]) -> str:
    return (f"{median([r[0] for r in runs]):.0f} req/s p50 {median([r[1] for r in runs]) * 1000:.0f} ms "
            f"p99 {median([r[2] for r in runs]) * 1000:.0f} ms")


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


class Finisher:
    """Marks dispatched jobs completed every half second, as workers that keep up would."""

    def __init__(self, stack: BenchStack):
        self.stack = stack
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.5):
            self.stack.execute("UPDATE jobs SET status = 'completed', outcome = 'succeeded', dispatch_token = NULL, "
                               "completed_at = now(), updated_at = now() "
                               "WHERE dispatch_token IS NOT NULL AND status = 'pending'")

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


# --- goal 3: width -----------------------------------------------------------------------------


@dataclass
class WidthSample:
    at: float
    in_flight: int
    waiting: int
    rss: int


def goal_width(sizes: Sizes, runs: int) -> list[Row]:
    say(f"\n== 3. width: backlog {sizes.width_backlog}, generator {WIDTH_LATENCY_MS} ms a call and "
        f"{WIDTH_SLOTS} at once, {WIDTH_SLOTS} worker threads on one host, GENERATOR_MAX_INFLIGHT={WIDTH_SLOTS}")
    settings = {"CONCURRENT_JOBS": str(WIDTH_SLOTS), "GENERATOR_MAX_INFLIGHT": str(WIDTH_SLOTS)}
    generator = {"GENERATOR_LATENCY_MS": str(WIDTH_LATENCY_MS), "GENERATOR_MAX_CONCURRENCY": str(WIDTH_SLOTS)}
    image = small_png()
    shares: dict[int, list[float]] = {processes: [] for processes in WIDTH_PROCESSES}
    rss_peaks: dict[int, list[int]] = {processes: [] for processes in WIDTH_PROCESSES}
    peaks = []
    with BenchStack(settings, generator, redis_db=REDIS_DB, attempts_worker=False,
                    generator_threads=2 * WIDTH_SLOTS) as stack:
        # One user may hold GENERATOR_MAX_INFLIGHT - 1 slots: several users can fill all 64.
        clients = Clients(stack.create_users(
            CLIENT_THREADS, balance=10 * sizes.width_backlog * runs * len(WIDTH_PROCESSES)))
        for run in range(1, runs + 1):
            for processes in WIDTH_PROCESSES:
                stack.stop_worker()
                job_ids = clients.submit_photos(stack.web_url, sizes.width_backlog, image)
                stack.start_worker(WIDTH_SLOTS, processes=processes)
                samples: list[WidthSample] = []
                stop = threading.Event()
                sampler = threading.Thread(target=_sample_width, args=(stack, samples, stop), daemon=True)
                sampler.start()
                wait_terminal(stack, job_ids)
                stop.set()
                sampler.join()
                share = _steady_share(samples)
                peak = requests.get(stack.generator_url + "/v1/stats", timeout=5).json()["max_in_flight"]
                rss_peak = max(sample.rss for sample in samples)
                shares[processes].append(share)
                peaks.append(peak)
                rss_peaks[processes].append(rss_peak)
                say(f"  run {run}, {_layout(processes)}: slots busy {share:.3f} in steady state, generator max in "
                    f"flight {peak}, worker RSS max {rss_peak / MIB:.0f} MiB, {len(samples)} samples")
    rows = []
    for processes in WIDTH_PROCESSES:
        share, rss_peak = median(shares[processes]), max(rss_peaks[processes])
        rows += [Row("3 width", f"share of {WIDTH_SLOTS} slots busy, steady state, {_layout(processes)}",
                     f"{share:.3f}", target=">= 0.95", met=share >= 0.95),
                 Row("3 width", f"attempts worker RSS, max (all its processes), {_layout(processes)}",
                     f"{rss_peak / MIB:.0f} MiB", target="< 1024 MiB", met=rss_peak < GIB)]
    peak = max(peaks)
    return [*rows, Row("3 width", "most calls in flight at the generator", str(peak), target=f"<= {WIDTH_SLOTS}",
                       met=peak <= WIDTH_SLOTS)]


def _layout(processes: int) -> str:
    return f"{processes} process{'es' if processes > 1 else ''} x {WIDTH_SLOTS // processes} threads"


def _sample_width(stack: BenchStack, samples: list[WidthSample], stop: threading.Event) -> None:
    stats_url = stack.generator_url + "/v1/stats"
    with requests.Session() as session:
        while not stop.wait(0.2):
            in_flight = session.get(stats_url, timeout=5).json()["in_flight"]
            waiting = stack.scalar("SELECT count(*) FROM jobs WHERE status = 'pending' AND dispatch_token IS NULL")
            samples.append(WidthSample(time.monotonic(), in_flight, waiting, rss_bytes(stack.worker_processes())))


def _steady_share(samples: list[WidthSample]) -> float:
    """The mean share of slots busy from two call latencies after the first call (the slots
    have filled) while jobs still wait for a slot (after that they can only empty)."""
    first_call = next(sample.at for sample in samples if sample.in_flight > 0)
    steady = [sample for sample in samples
              if sample.at >= first_call + 2 * WIDTH_LATENCY_MS / 1000 and sample.waiting > 0]
    if not steady:
        return float("nan")
    return statistics.mean(sample.in_flight for sample in steady) / WIDTH_SLOTS


# --- goal 5: steady ----------------------------------------------------------------------------


@dataclass
class WorkerState:
    """The attempts worker and the database's connections at an idle moment."""
    rss: int
    threads: int
    connections: int
    by_process: dict[str, list[int]]

    @classmethod
    def of(cls, stack: BenchStack) -> WorkerState:
        time.sleep(2)  # idle: finished attempts have given their connections back
        processes = stack.worker_processes()
        return cls(rss_bytes(processes), thread_count(processes), stack.connections(),
                   stack.database_connections_by_process())


def goal_steady(sizes: Sizes) -> list[Row]:
    say(f"\n== 5. steady: {sizes.steady_jobs} jobs in two halves after {sizes.steady_warmup} to warm up, "
        f"{PIPELINE_CONCURRENCY} worker threads, instant generator")
    image = small_png()
    with BenchStack({}, {}, PIPELINE_CONCURRENCY, redis_db=REDIS_DB) as stack:
        clients = Clients(stack.create_users(CLIENT_THREADS, balance=10 * (sizes.steady_jobs + sizes.steady_warmup)))
        wait_terminal(stack, clients.submit_photos(stack.web_url, sizes.steady_warmup, image))
        states = {"warm": WorkerState.of(stack)}
        started = time.monotonic()
        for half in ("half-way", "end"):
            wait_terminal(stack, clients.submit_photos(stack.web_url, sizes.steady_jobs // 2, image), timeout=3600)
            states[half] = WorkerState.of(stack)
        elapsed = time.monotonic() - started
    warm, middle, end = states["warm"], states["half-way"], states["end"]
    say(f"  {sizes.steady_jobs} jobs in {elapsed:.0f} s; warm -> half-way -> end: worker RSS "
        + " -> ".join(f"{state.rss / MIB:.1f}" for state in states.values()) + " MiB, worker threads "
        + " -> ".join(str(state.threads) for state in states.values()) + ", connections to the database "
        + " -> ".join(str(state.connections) for state in states.values()))
    say("  connections by process, warm -> half-way -> end: " + ", ".join(
        f"{name} " + " -> ".join(str(sum(state.by_process.get(name, [0]))) for state in states.values())
        for name in end.by_process))
    growth = end.rss / warm.rss
    # A pool fills up to its size as the load finds its shape, so a count may still rise a little
    # late in the run; a leak is an OS process holding more than its pool keeps.
    most_held = max(count for counts in end.by_process.values() for count in counts)
    return [Row("5 steady", f"worker RSS after {sizes.steady_jobs} jobs", f"{end.rss / MIB:.1f} MiB",
                f"{warm.rss / MIB:.1f} MiB warm", growth, "< 1.10", growth < 1.10),
            Row("5 steady", "connections to the bench database, end", str(end.connections),
                f"{middle.connections} half-way", end.connections / middle.connections,
                f"<= {RENDERQ_POOL_SIZE} a process (pool_size)", most_held <= RENDERQ_POOL_SIZE),
            Row("5 steady", "threads in the attempts worker, end", str(end.threads), f"{middle.threads} half-way",
                end.threads / middle.threads, "no growth", end.threads <= middle.threads)]


# --- the table ---------------------------------------------------------------------------------


def print_table(rows: list[Row], wall_seconds: float, quick: bool, runs: int) -> None:
    header = ("goal", "measure", "figure", "baseline", "ratio", "target", "met?")
    lines = [(row.goal, row.measure, row.figure, row.baseline, "-" if row.ratio is None else f"{row.ratio:.2f}",
              row.target, "-" if row.met is None else ("yes" if row.met else "no")) for row in rows]
    widths = [max(len(line[column]) for line in [header, *lines]) for column in range(len(header))]
    say(f"\n== results ({'quick' if quick else 'full'} sizes, {runs} run(s) of goals 1-3, medians; "
        f"wall time {wall_seconds / 60:.1f} min)")
    for line in [header, tuple("-" * width for width in widths), *lines]:
        say(" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 run: a smoke test of a few minutes")
    parser.add_argument("--goals", default="1,2,3,4,5", help="which goals, comma-separated (default: all)")
    parser.add_argument("--runs", type=int, default=None, help="runs of goals 1-3, the median reported "
                                                                "(default 3; 1 with --quick)")
    parser.add_argument("--profile-worker", metavar="FILE",
                        help="goal 1: record the attempts worker with py-spy (--gil) during the first queued "
                             "run (collapsed stacks; bench/profile_summary.py reads them)")
    args = parser.parse_args()
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: every stack stops its processes and
    # drops its database on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = QUICK if args.quick else FULL
    runs = args.runs or (1 if args.quick else 3)
    goals = {int(goal) for goal in args.goals.split(",")}
    started = time.monotonic()
    measured = {
        1: lambda: goal_pipeline(sizes, runs, args.profile_worker),
        2: lambda: goal_submit(sizes, runs),
        3: lambda: goal_width(sizes, runs),
        4: lambda: reads_at_scale.run(sizes.seeded_rows, sizes.seeded_pending, sizes.seeded_users,
                                      sizes.read_requests, REDIS_DB),
        5: lambda: goal_steady(sizes),
    }
    rows: list[Row] = []
    crashed = False
    for goal in sorted(goals):
        try:
            rows += measured[goal]()
        except Exception as error:  # noqa: BLE001 - one goal's failure still leaves the others' figures
            traceback.print_exc()
            rows.append(Row(str(goal), f"did not finish: {type(error).__name__}", str(error).splitlines()[0][:80],
                            met=False))
            crashed = True
    print_table(rows, time.monotonic() - started, args.quick, runs)
    if crashed:
        sys.exit(1)


if __name__ == "__main__":
    main()
