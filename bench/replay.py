"""Fail N jobs for real, then replay them in one request; print what was replayed and skipped,
the request's wall time, and how the replayed jobs ended.

    .venv/bin/python bench/replay.py --jobs 500 --short-of 70

With MAX_RETRIES=0 and MAX_RETRY_ATTEMPTS=0 a `[fail:1]` job fails on its first call
(GENERATOR_BUSY) and its replay's call succeeds. One user owns most of the jobs and has the
credit for them; another owns 100 and has spent all but 100 − `--short-of` credits on
successful jobs since, so the replay skips `--short-of` of theirs (INSUFFICIENT_CREDITS).
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.stack import BenchStack  # noqa: E402

SHORT_USER_JOBS = 100


def photo() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buffer, "PNG")
    return buffer.getvalue()


def wait_until_settled(stack: BenchStack) -> None:
    while stack.query("SELECT count(*) FROM jobs WHERE status NOT IN ('completed', 'failed', 'canceled')")[0][0]:
        time.sleep(0.2)


def submit_all(stack: BenchStack, token: str, prompt: str, count: int) -> Counter:
    image = photo()

    def submit(_: int) -> int:
        return requests.post(stack.web_url + "/api/photos", headers={"Authorization": "Bearer " + token},
                             files={"file": ("p.png", image)}, data={"style": "sepia", "prompt": prompt},
                             timeout=60).status_code

    with ThreadPoolExecutor(8) as pool:
        return Counter(pool.map(submit, range(count)))


def replay(stack: BenchStack, admin: str, body: dict) -> tuple[dict, float]:
    started = time.monotonic()
    response = requests.post(stack.web_url + "/api/admin/jobs/retry", headers={"Authorization": "Bearer " + admin},
                             json=body, timeout=120)
    elapsed = time.monotonic() - started
    response.raise_for_status()
    return response.json(), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--short-of", type=int, default=70, help="jobs of the second user its credit cannot cover")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--redis-db", type=int, default=12)
    args = parser.parse_args()

    settings = {"MAX_RETRIES": "0", "MAX_RETRY_ATTEMPTS": "0", "CONCURRENT_JOBS": str(args.concurrency),
                "QUEUE_CHECK_INTERVAL": "1"}
    with BenchStack(settings, {}, args.concurrency, redis_db=args.redis_db) as stack:
        rich, short = stack.create_user(balance=10 * args.jobs), stack.create_user(balance=SHORT_USER_JOBS)
        admin = stack.create_user(balance=0, admin=True)
        started = time.monotonic()
        answers = submit_all(stack, rich, "[fail:1]", args.jobs - SHORT_USER_JOBS) + \
            submit_all(stack, short, "[fail:1]", SHORT_USER_JOBS)
        wait_until_settled(stack)
        print("failed for real: %s in %.1f s (answers %s)" % (dict(stack.query(
            "SELECT error_code, count(*) FROM jobs WHERE status = 'failed' GROUP BY 1")), time.monotonic() - started,
            dict(answers)))
        submit_all(stack, short, "", args.short_of)  # spends the second user's credits on jobs that succeed
        wait_until_settled(stack)

        body = {"error_code": "GENERATOR_UNAVAILABLE", "limit": 10_000}
        preview, preview_seconds = replay(stack, admin, {**body, "dry_run": True})
        print("dry run: would replay %d, skip %d %s; request %.0f ms (server %d ms)" % (
            preview["replayed"], preview["skipped"], preview["skipped_reasons"], preview_seconds * 1000,
            preview["duration_ms"]))
        answer, seconds = replay(stack, admin, body)
        print("replay %d: replayed %d, skipped %d %s, %d credits held; request %.0f ms (server %d ms)" % (
            answer["id"], answer["replayed"], answer["skipped"], answer["skipped_reasons"], answer["credits_held"],
            seconds * 1000, answer["duration_ms"]))
        started = time.monotonic()
        wait_until_settled(stack)
        print("replayed jobs all terminal %.1f s after the replay" % (time.monotonic() - started))
        for status, outcome, generation, count in stack.query(
                "SELECT status, coalesce(outcome, '-'), generation, count(*) FROM jobs GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"):
            print("  %-10s %-10s generation %d: %d" % (status, outcome, generation, count))
        for entry_type, generation, count, total in stack.query(
                "SELECT entry_type, generation, count(*), sum(amount) FROM ledger_entries GROUP BY 1, 2 ORDER BY 1, 2"):
            print("  ledger %-8s generation %d: %d rows, %d credits" % (entry_type, generation, count, total))
        books = stack.query("SELECT count(*) FROM users u WHERE u.balance <> (SELECT coalesce(sum(CASE entry_type "
                            "WHEN 'topup' THEN amount WHEN 'capture' THEN -amount ELSE 0 END), 0) FROM ledger_entries "
                            "l WHERE l.user_id = u.id) OR u.held <> 0")[0][0]
        print("users whose balance is not top-ups - captures, or with credits still held: %d" % books)


if __name__ == "__main__":
    main()
