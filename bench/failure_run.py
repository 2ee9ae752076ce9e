"""Submit N photos against a generator that fails a fraction of calls; print where they ended.

    .venv/bin/python bench/failure_run.py --jobs 200 --failure-rate 0.3

Prints the wall time until every job is terminal, the count per terminal status and
outcome, the attempts histogram, and the API's answer latency (and, with --metrics, what
GET /metrics says afterwards).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stack import BenchStack  # noqa: E402


def photo() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 192), "purple").save(buffer, "JPEG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--failure-rate", type=float, default=0.3)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--retry-delays", default="1,5,15,60,300")
    parser.add_argument("--background-interval-ms", default="30000")
    parser.add_argument("--prompts", default="", help="comma-separated prompts to cycle through")
    parser.add_argument("--metrics", action="store_true", help="print GET /metrics at the end")
    args = parser.parse_args()

    settings = {"RETRY_DELAYS": args.retry_delays, "BACKGROUND_PROCESSING_INTERVAL": args.background_interval_ms,
                "CONCURRENT_JOBS": str(args.concurrency)}
    with BenchStack(settings, {"GENERATOR_FAILURE_RATE": str(args.failure_rate)}, args.concurrency) as stack:
        token = stack.create_user(balance=10 * args.jobs)
        image = photo()
        prompts = args.prompts.split(",") if args.prompts else [""]
        latencies: list[float] = []

        def submit(index: int) -> int:
            started = time.monotonic()
            response = requests.post(stack.web_url + "/api/photos", headers={"Authorization": "Bearer " + token},
                                     files={"file": ("p.jpg", image)},
                                     data={"style": "sepia", "prompt": prompts[index % len(prompts)]}, timeout=30)
            latencies.append(time.monotonic() - started)
            return response.status_code

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            codes = Counter(pool.map(submit, range(args.jobs)))
        while stack.query("SELECT count(*) FROM jobs WHERE status NOT IN ('completed', 'failed', 'canceled')")[0][0]:
            time.sleep(0.5)
        wall = time.monotonic() - started

        print("jobs submitted: %d  answers: %s" % (args.jobs, dict(codes)))
        print("wall time until all terminal: %.1f s" % wall)
        print("API answer latency: p50 %.0f ms, p95 %.0f ms" % (
            statistics.median(latencies) * 1000, statistics.quantiles(latencies, n=20)[18] * 1000))
        for status, outcome, count in stack.query(
                "SELECT status, coalesce(outcome, '-'), count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1, 2"):
            print("  %-10s %-10s %d" % (status, outcome, count))
        print("attempts histogram (attempts: jobs):")
        for attempts, count in stack.query("SELECT attempts, count(*) FROM jobs GROUP BY 1 ORDER BY 1"):
            print("  %d: %d" % (attempts, count))
        (charged,), = stack.query("SELECT coalesce(sum(amount), 0) FROM ledger_entries WHERE entry_type = 'capture'")
        (delivered,), = stack.query("SELECT coalesce(sum(price), 0) FROM jobs WHERE outcome = 'succeeded'")
        (notified,), = stack.query("SELECT count(*) FROM notifications")
        (told,), = stack.query("SELECT count(*) FROM jobs WHERE outcome IN ('succeeded', 'blocked')")
        (open_holds,), = stack.query("SELECT coalesce(sum(held), 0) FROM users")
        print("credits charged: %d, price of renders delivered: %d, credits still on hold: %d"
              % (charged, delivered, open_holds))
        print("notifications: %d, succeeded + blocked jobs: %d" % (notified, told))
        calls = requests.get(stack.generator_url + "/v1/stats", timeout=5).json()["calls"]
        recorded = stack.query("SELECT sum(attempts) FROM jobs")[0][0]
        print("generator calls seen by the generator: %d, attempts recorded in jobs: %d" % (calls, recorded))
        if args.metrics:
            print(requests.get(stack.web_url + "/metrics", timeout=5).text)


if __name__ == "__main__":
    main()
