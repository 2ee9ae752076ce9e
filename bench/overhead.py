"""Throughput of renderq's pipeline against bare Celery making the same generator calls.

    .venv/bin/python bench/overhead.py --jobs 300 --concurrency 3

Both run in the same session, against one reference generator with no faults: first
the bare Celery task, then renderq end to end (HTTP submit, row, claim, call, ledger,
notification). Prints jobs per second for each and renderq's ratio to the baseline.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.failure_run import photo  # noqa: E402
from bench.stack import BenchStack  # noqa: E402
from tests.support import BIN, Process, wait_for  # noqa: E402


def raw_celery(stack: BenchStack, jobs: int, concurrency: int, image_path: str) -> float:
    broker = stack.redis_url.rsplit("/", 1)[0] + "/10"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    env = {**stack.env, "RAW_BROKER_URL": broker}
    worker = Process("raw-worker", [str(BIN / "celery"), "-A", "bench.raw_celery", "worker", "--concurrency",
                                    str(concurrency), "--without-gossip", "--without-mingle"], env, stack.work).start()
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import os
        os.environ["RAW_BROKER_URL"] = broker
        from bench.raw_celery import render

        render.delay(image_path, stack.generator_url)  # warm-up: the worker is up and connected
        wait_for(lambda: client.get("raw:done"), timeout=60, what="the raw worker")
        client.set("raw:done", 0)
        started = time.monotonic()
        for _ in range(jobs):
            render.delay(image_path, stack.generator_url)
        wait_for(lambda: int(client.get("raw:done") or 0) >= jobs, timeout=600, interval=0.02, what="raw jobs")
        return time.monotonic() - started
    finally:
        worker.stop()
        client.flushdb()


def renderq(stack: BenchStack, jobs: int, image: bytes) -> float:
    token = stack.create_user(balance=10 * jobs)

    def submit(_: int) -> None:
        requests.post(stack.web_url + "/api/photos", headers={"Authorization": "Bearer " + token},
                      files={"file": ("p.jpg", image)}, data={"style": "sepia"}, timeout=30).raise_for_status()

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(submit, range(jobs)))
    print("renderq: all %d accepted over HTTP after %.1f s" % (jobs, time.monotonic() - started))
    wait_for(lambda: stack.query("SELECT count(*) FROM jobs WHERE status = 'completed'")[0][0] >= jobs,
             timeout=600, interval=0.05, what="renderq jobs")
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--generator-latency-ms", type=int, default=0,
                        help="how long each generator call takes (real generators take seconds)")
    args = parser.parse_args()
    image = photo()
    image_path = tempfile.mktemp(suffix=".jpg")
    Path(image_path).write_bytes(image)
    generator_env = {"GENERATOR_LATENCY_MS": str(args.generator_latency_ms)}
    with BenchStack({"CONCURRENT_JOBS": str(args.concurrency)}, generator_env, args.concurrency) as stack:
        raw_seconds = raw_celery(stack, args.jobs, args.concurrency, image_path)
        renderq_seconds = renderq(stack, args.jobs, image)
    print("jobs: %d, worker processes: %d each, generator latency %d ms"
          % (args.jobs, args.concurrency, args.generator_latency_ms))
    print("bare Celery:  %.1f s, %.1f jobs/s" % (raw_seconds, args.jobs / raw_seconds))
    print("renderq:      %.1f s, %.1f jobs/s (HTTP submit included)" % (renderq_seconds, args.jobs / renderq_seconds))
    print("renderq / bare Celery throughput: %.2f" % (raw_seconds / renderq_seconds))


if __name__ == "__main__":
    main()
