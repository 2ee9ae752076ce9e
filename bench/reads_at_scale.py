"""Goal 4 of bench/run.py: reads and beat's sweeps on a jobs table of 100,000 and 1,000,000 rows.

The rows are seeded in SQL (INSERT ... SELECT generate_series): most terminal, spread over the
last 20 hours (inside COMPLETED_JOB_TTL), with a backlog of pending jobs across many users, a
few jobs processing, retrying and waiting for a background try, and one attempt row per
finished job; at the larger size also 600 jobs past the TTL, so that cleanup has one batch and
a bit to purge. One finished job in ten has the Idempotency-Key row it was submitted with. No
photos, blobs, ledger rows or notifications are seeded. The jobs table's triggers count every row as it goes in, and the counters are
folded as the reconciler folds them, then checked against count(*).

Then, with the stack's warm web (gunicorn), one keep-alive client times GET /api/jobs/{id},
GET /api/queue/stats, GET /metrics and a user's job list at each size. Last, in this process,
the real code paths run with a SQLAlchemy listener that, before each statement, runs it under
EXPLAIN (ANALYZE, BUFFERS) in a savepoint it rolls back, then lets the statement itself run:
the plans are those of the statements renderq sends, with their parameters, on the data as
it is at that moment.
"""
from __future__ import annotations

import logging
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import requests
from sqlalchemy import event

from bench.figures import Row, percentile, say
from bench.stack import BenchStack
from tests.support import wait_for

TERMINAL_SPREAD = "20 hours"  # inside the default COMPLETED_JOB_TTL (24 h): cleanup keeps them
PAST_TTL_JOBS = 600
SEED_BATCH = 100_000
# Tables whose size grows with the jobs kept: a sequential scan of one is what the plans must not have.
GROWING_TABLES = {"jobs", "job_attempts", "ledger_entries", "notifications", "blobs", "photos", "idempotency_keys"}
SWEEP_TARGET_MS = 5.0
SEQ_SCAN_ROWS = 1000  # a sequential scan that reads fewer rows than this is no cost, whatever the table

_SEED_USERS = """
    INSERT INTO users (email, token_hash, is_admin, balance, held, fair_tag)
    SELECT 'seed-' || i || '@example.com', encode(sha256(('seed-token-' || i)::bytea), 'hex'), false, 1000000000, 0, 0
      FROM generate_series(1, %(users)s::int) AS i
"""
# The backlog: in fair-tag order, round robin over the users, the newest jobs of each user.
_SEED_PENDING = """
    INSERT INTO jobs (id, user_id, kind, params, price, status, attempts, retry_count, fair_tag, created_at, updated_at)
    SELECT gen_random_uuid(), %(first_user)s + i %% %(users)s, 'image.generate', '{"style": "sepia", "prompt": ""}',
           2, 'pending', 0, 0, i::bigint * 1000000, now() - (%(pending)s - i) * interval '10 ms', now()
      FROM generate_series(1, %(pending)s::int) AS i
"""
# A few of every other active status, so that the sweeps' queries have something to find.
_SEED_ACTIVE = """
    INSERT INTO jobs (id, user_id, kind, params, price, status, attempts, retry_count, fair_tag, created_at, updated_at,
                      started_at, attempt_started_at, lease_token, lease_expires_at, next_retry_at, error_code)
    SELECT gen_random_uuid(), %(first_user)s + i %% %(users)s, 'photo.render', '{"style": "sepia", "prompt": ""}', 1,
           s.status, 1, s.retry_count, 0, now() - interval '5 minutes', now() - interval '1 minute',
           now() - interval '4 minutes', now() - interval '10 seconds',
           CASE WHEN s.status = 'processing' THEN gen_random_uuid() END,
           CASE WHEN s.status = 'processing' THEN now() + interval '1 day' END,
           CASE WHEN s.status = 'retrying' THEN now() + interval '1 day' END,
           CASE WHEN s.status <> 'processing' THEN 'GENERATOR_BUSY' END
      FROM (VALUES ('processing', 0, 50), ('retrying', 0, 100), ('pending_background_retry', 1, 100))
           AS s (status, retry_count, how_many),
           generate_series(1, s.how_many) AS i
"""
# Finished jobs, their attempt rows and, for one job in ten, the Idempotency-Key it was
# submitted with: 85 % succeeded, 5 % blocked, 7 % failed, 3 % canceled.
_SEED_FINISHED = """
    WITH finished AS (
        INSERT INTO jobs (id, user_id, kind, params, price, status, outcome, block_reason, error_code, attempts,
                          retry_count, fair_tag, created_at, started_at, attempt_started_at, completed_at, updated_at,
                          result_path, worker_host)
        SELECT id, %(first_user)s + i %% %(users)s, kind, '{"style": "sepia", "prompt": ""}', 1, status, outcome,
               CASE WHEN outcome = 'blocked' THEN 'CONTENT_SAFETY_VIOLATION' END,
               CASE WHEN status = 'failed' THEN 'GENERATOR_BUSY' END, 1, 0, 0, created, created + interval '1 second',
               created + interval '1 second', created + interval '3 seconds', created + interval '3 seconds',
               CASE WHEN outcome = 'succeeded' THEN 'results/' || id || '.png' END, 'attempts@seed/1'
          FROM (SELECT i, gen_random_uuid() AS id,
                       CASE WHEN i %% 4 = 0 THEN 'photo.render' ELSE 'image.generate' END AS kind,
                       CASE WHEN i %% 100 < 90 THEN 'completed' WHEN i %% 100 < 97 THEN 'failed' ELSE 'canceled' END
                           AS status,
                       CASE WHEN i %% 100 < 85 THEN 'succeeded' WHEN i %% 100 < 90 THEN 'blocked' END AS outcome,
                       now() - %(age)s::interval - random() * %(spread)s::interval AS created
                  FROM generate_series(%(start)s::int, %(stop)s::int) AS i) AS seeded
        RETURNING id, user_id, kind, status, outcome, error_code, created_at, started_at),
    keyed AS (
        INSERT INTO idempotency_keys (user_id, key, fingerprint, job_id, created_at)
        SELECT user_id, 'seed-' || id, md5(id::text), id, created_at FROM finished WHERE random() < 0.1)
    INSERT INTO job_attempts (job_id, number, tier, kind, outcome, error_code, started_at, duration_ms)
    SELECT id, 1, 'fast', kind, CASE WHEN status = 'failed' THEN 'failed' ELSE outcome END, error_code, started_at,
           100 + (random() * 2900)::int
      FROM finished WHERE status <> 'canceled'
"""
_COUNTERS_WRONG = """
    SELECT count(*) FROM (
        SELECT kind, status, coalesce(outcome, '') AS outcome, retry_count, count(*) AS n FROM jobs GROUP BY 1, 2, 3, 4
    ) AS actual FULL JOIN (
        SELECT kind, status, outcome, retry_count, sum(count) AS n FROM (
            SELECT kind, status, outcome, retry_count, count FROM job_counts
            UNION ALL SELECT kind, status, outcome, retry_count, delta FROM job_count_deltas) AS counted
         GROUP BY 1, 2, 3, 4 HAVING sum(count) <> 0
    ) AS counted USING (kind, status, outcome, retry_count)
     WHERE actual.n IS DISTINCT FROM counted.n
"""


def token_of(user_id: int, first_user: int) -> str:
    return f"seed-token-{user_id - first_user + 1}"


class Seeder:
    def __init__(self, stack: BenchStack, pending: int, users: int):
        self.stack, self.pending, self.users = stack, pending, users
        self.seeded = 0

    def first(self) -> None:
        self.stack.execute(_SEED_USERS, {"users": self.users})
        self.first_user = self.stack.scalar("SELECT min(id) FROM users WHERE email LIKE 'seed-%'")
        params = {"first_user": self.first_user, "users": self.users, "pending": self.pending}
        self.stack.execute(_SEED_PENDING, params)
        self.stack.execute(_SEED_ACTIVE, params)
        self.stack.execute("UPDATE users SET fair_tag = coalesce((SELECT max(fair_tag) FROM jobs "
                           "WHERE jobs.user_id = users.id), 0)")
        self.seeded = self.stack.scalar("SELECT count(*) FROM jobs")

    def finished(self, count: int, age: str = "10 minutes", spread: str = TERMINAL_SPREAD) -> None:
        for start in range(self.seeded + 1, self.seeded + count + 1, SEED_BATCH):
            stop = min(start + SEED_BATCH - 1, self.seeded + count)
            self.stack.execute(_SEED_FINISHED, {"first_user": self.first_user, "users": self.users, "start": start,
                                                "stop": stop, "age": age, "spread": spread})
        self.seeded += count

    def grow_to(self, total: int, past_ttl: int = 0) -> None:
        """Seed finished jobs up to `total` rows (`past_ttl` of them finished two days ago), then
        vacuum and analyze as autovacuum would, and fold the counters as the reconciler does."""
        started = time.monotonic()
        if past_ttl:
            self.finished(past_ttl, age="2 days", spread="1 hour")
        self.finished(total - self.seeded)
        for table in ("jobs", "job_attempts", "users", "idempotency_keys"):
            self.stack.execute(f"VACUUM (ANALYZE) {table}")
        say(f"  seeded {self.seeded} jobs in {time.monotonic() - started:.0f} s (vacuumed and analyzed)")

    def fold(self, app: Any) -> None:
        from renderq import counters
        from renderq.db import db

        newest = self.stack.scalar("SELECT coalesce(max(id), 0) FROM job_attempts")
        with app.app_context():
            def folded() -> bool:
                counters.fold()
                db.session.remove()
                return self.stack.scalar("SELECT last_id FROM counter_watermarks WHERE name = 'job_attempts'") >= newest
            wait_for(folded, timeout=600, interval=0.5, what="the counters to be folded")
        wrong = self.stack.scalar(_COUNTERS_WRONG)
        say(f"  counters folded; job counts that disagree with count(*): {wrong}")


@dataclass
class Timings:
    """p99 in ms of each read, at one table size."""
    rows: int
    p99: dict[str, float] = field(default_factory=dict)


READS = ("GET /api/jobs/{id} (pending: with queue_position)", "GET /api/jobs/{id} (finished)",
         "GET /api/queue/stats", "GET /metrics", "GET /api/users/{id}/jobs (first page)")


def time_reads(stack: BenchStack, first_user: int, users: int, count: int) -> Timings:
    pending = stack.query("SELECT id, user_id FROM jobs WHERE status = 'pending' ORDER BY random() LIMIT %s", (count,))
    finished = stack.query("SELECT id, user_id FROM jobs WHERE status = 'completed' ORDER BY random() LIMIT %s",
                           (count,))
    random_users = [first_user + random.randrange(users) for _ in range(count)]
    plans = {
        READS[0]: [(f"/api/jobs/{job}", token_of(user, first_user)) for job, user in pending],
        READS[1]: [(f"/api/jobs/{job}", token_of(user, first_user)) for job, user in finished],
        READS[2]: [("/api/queue/stats", token_of(user, first_user)) for user in random_users],
        READS[3]: [("/metrics", "") for _ in range(count)],
        READS[4]: [(f"/api/users/{user}/jobs", token_of(user, first_user)) for user in random_users],
    }
    timings = Timings(stack.scalar("SELECT count(*) FROM jobs"))
    with requests.Session() as session:
        for read, calls in plans.items():
            for path, token in calls[:max(10, count // 10)]:  # warm-up: both gunicorn workers, their pools
                _get(session, stack.web_url + path, token)
            latencies = [_get(session, stack.web_url + path, token) for path, token in calls]
            timings.p99[read] = percentile(latencies, 0.99) * 1000
            say(f"  {timings.rows:>9} rows  {read:50} p50 {percentile(latencies, 0.5) * 1000:6.1f} ms  "
                f"p99 {timings.p99[read]:6.1f} ms  ({len(latencies)} requests)")
    return timings


def _get(session: requests.Session, url: str, token: str) -> float:
    started = time.perf_counter()
    response = session.get(url, headers={"Authorization": "Bearer " + token} if token else {}, timeout=30)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


# --- EXPLAIN of the real statements ------------------------------------------------------------


@dataclass
class Explained:
    label: str
    statement: str
    plans: list[dict]
    error: str | None = None
    real_ms: float = 0.0

    @property
    def execution_ms(self) -> float:
        return sum(plan["Execution Time"] for plan in self.plans)

    @property
    def jit_ms(self) -> float:
        """Time PostgreSQL spent compiling the statement with JIT (counted in execution_ms)."""
        return sum(plan.get("JIT", {}).get("Timing", {}).get("Total", 0.0) for plan in self.plans)

    def nodes(self) -> list[tuple[int, dict]]:
        found: list[tuple[int, dict]] = []

        def walk(node: dict, depth: int) -> None:
            found.append((depth, node))
            for child in node.get("Plans", []):
                walk(child, depth + 1)

        for plan in self.plans:
            walk(plan["Plan"], 0)
        return found

    def seq_scans_of_growing_tables(self) -> list[str]:
        """Sequential scans that read many rows of a table that grows with the jobs kept (one of
        an empty table, which the seed leaves blobs and photos, says nothing)."""
        return [node["Relation Name"] for _, node in self.nodes()
                if node["Node Type"] == "Seq Scan" and node.get("Relation Name") in GROWING_TABLES
                and node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0) >= SEQ_SCAN_ROWS]

    def scans(self) -> str:
        """The scan nodes, e.g. 'Index Only Scan ix_jobs_fair_queue'."""
        return ", ".join(sorted({f"{node['Node Type']} {node.get('Index Name') or node.get('Relation Name', '')}"
                                 .strip() for _, node in self.nodes() if "Scan" in node["Node Type"]})) or "no scan"


class ExplainingRecorder:
    """Runs every statement under EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) in a savepoint that it
    rolls back, just before the statement itself runs; only while `label` is set."""

    def __init__(self, engine: Any):
        self.label: str | None = None
        self.records: list[Explained] = []
        self._current: Explained | None = None
        event.listen(engine, "before_cursor_execute", self._before)
        event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        self._current = None
        if self.label is None or executemany or statement.lstrip().upper().startswith(("SAVEPOINT", "RELEASE")):
            return
        raw = cursor.connection
        # Several statements in one execute (the counters' fold) are explained one by one.
        pieces = [statement] if parameters else [piece for piece in statement.split(";") if piece.strip()]
        explained = Explained(self.label, statement, [])
        # EXPLAIN ANALYZE runs the statement: what it changes is rolled back, inside the caller's
        # transaction or, for a statement run alone (autocommit), in one of its own.
        alone = raw.autocommit
        raw.execute("BEGIN" if alone else "SAVEPOINT bench_explain")
        try:
            for piece in pieces:
                explained.plans.append(raw.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + piece,
                                                   parameters or None).fetchone()[0][0])
        except Exception as error:  # noqa: BLE001 - a statement EXPLAIN cannot take is reported, not fatal
            explained.error = str(error).splitlines()[0]
        finally:
            if alone:
                raw.execute("ROLLBACK")
            else:
                raw.execute("ROLLBACK TO SAVEPOINT bench_explain")
                raw.execute("RELEASE SAVEPOINT bench_explain")
        self._current = explained
        conn.info["bench_started"] = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if self._current is not None:
            self._current.real_ms = (time.perf_counter() - conn.info.pop("bench_started")) * 1000
            self.records.append(self._current)
            self._current = None

    def under(self, label: str, action: Any) -> list[Explained]:
        first = len(self.records)
        self.label = label
        try:
            action()
        finally:
            self.label = None
        return self.records[first:]


def _short(statement: str, width: int = 150) -> str:
    flat = re.sub(r"\s+", " ", statement).strip()
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def print_plans(label: str, records: list[Explained]) -> None:
    """Each distinct statement once (with how often it ran), its slowest run's plan as a tree."""
    say(f"\n  -- EXPLAIN (ANALYZE, BUFFERS): {label}: {len(records)} statement(s)")
    by_statement: dict[str, list[Explained]] = {}
    for record in records:
        by_statement.setdefault(record.statement, []).append(record)
    for statement, runs in by_statement.items():
        slowest = max(runs, key=lambda record: record.execution_ms)
        say(f"  * {_short(statement)}")
        if slowest.error:
            say(f"      (not explained: {slowest.error})")
            continue
        say(f"      ran {len(runs)}x; execution {slowest.execution_ms:.3f} ms (slowest), planning "
            f"{sum(plan['Planning Time'] for plan in slowest.plans):.3f} ms; the statement itself "
            f"{slowest.real_ms:.2f} ms")
        for depth, node in slowest.nodes():
            target = node.get("Index Name") or node.get("Relation Name")
            say(f"      {'  ' * depth}{node['Node Type']}{' ' + target if target else ''}: "
                f"{node.get('Actual Total Time', 0):.3f} ms, rows {node.get('Actual Rows')} x{node.get('Actual Loops')}, "
                f"buffers hit {node.get('Shared Hit Blocks', 0)} read {node.get('Shared Read Blocks', 0)}")
        if slowest.jit_ms:
            say(f"      JIT: {slowest.jit_ms:.3f} ms compiling "
                f"{sum(plan.get('JIT', {}).get('Functions', 0) for plan in slowest.plans)} function(s)")
        for plan in slowest.plans:
            for trigger in plan.get("Triggers", []):
                say(f"      trigger {trigger['Trigger Name']}: {trigger['Time']:.3f} ms x{trigger['Calls']}")


def explain_code_paths(stack: BenchStack, app: Any, first_user: int) -> list[Row]:
    from flask import Flask

    from renderq import workers
    from renderq.db import db
    from renderq.jobs import maintenance, scheduler
    from renderq.models import Job

    assert isinstance(app, Flask)
    with app.app_context():
        recorder = ExplainingRecorder(db.engine)
    client = app.test_client()
    last_pending = stack.query("SELECT id, user_id FROM jobs WHERE status = 'pending' AND dispatch_token IS NULL "
                               "ORDER BY fair_tag DESC, id DESC LIMIT 1")[0]
    owner = token_of(last_pending[1], first_user)
    leases = [row[0] for row in stack.query("SELECT lease_token FROM jobs WHERE status = 'processing'")]

    def in_app(action: Any) -> Any:
        def run() -> None:
            with app.app_context():
                action()
                db.session.remove()
        return run

    def queue_position() -> None:
        job = db.session.get(Job, last_pending[0])
        scheduler.queue_position(job)

    def get(path: str, token: str = "") -> Any:
        def run() -> None:
            response = client.get(path, headers={"Authorization": "Bearer " + token} if token else {})
            assert response.status_code == 200, (path, response.status_code, response.get_data()[:200])
        return run

    def submit() -> None:
        response = client.post("/api/jobs", json={"kind": "image.generate", "params": {"style": "sepia", "prompt": ""}},
                               headers={"Authorization": "Bearer " + owner})
        assert response.status_code == 202, (response.status_code, response.get_data()[:200])

    def renew_leases() -> None:
        keeper = workers.ProcessKeeper(app, f"bench-explain/{uuid.uuid4().hex[:6]}", 0, "none")
        keeper.leases.update(leases)
        keeper.beat()
        keeper.stop()

    paths = {
        "queue_position of the last pending job": in_app(queue_position),
        "GET /api/users/{id}/jobs (first page)": get(f"/api/users/{last_pending[1]}/jobs", owner),
        "GET /api/jobs/{id} (pending)": get(f"/api/jobs/{last_pending[0]}", owner),
        "GET /api/queue/stats": get("/api/queue/stats", owner),
        "GET /metrics": get("/metrics"),
        "POST /api/jobs (a submission; no worker slots, so nothing is dispatched)": submit,
        "background processor": in_app(maintenance.process_background),
        "reconciler": in_app(maintenance.reconcile),
        "cleanup": in_app(maintenance.cleanup),
        "lease renewal (a worker's keeper)": renew_leases,
    }
    explained = {label: recorder.under(label, action) for label, action in paths.items()}
    for label, records in explained.items():
        print_plans(label, records)

    rows = []
    position = explained["queue_position of the last pending job"]
    listing = [record for record in explained["GET /api/users/{id}/jobs (first page)"]
               if "ORDER BY jobs.created_at DESC" in record.statement]
    for measure, records in (("EXPLAIN queue_position (last pending job)", position),
                             ("EXPLAIN user job list query", listing)):
        indexed = all(("Index" in record.scans()) and not record.seq_scans_of_growing_tables() for record in records)
        slowest = max(records, key=lambda record: record.execution_ms)
        rows.append(Row("4 reads", measure, f"{slowest.execution_ms:.2f} ms: {slowest.scans()}",
                        target="index(-only) scan", met=bool(records) and indexed))
    positions_in_list = sum(1 for record in explained["GET /api/users/{id}/jobs (first page)"]
                            if "count(*)" in record.statement and "fair_tag" in record.statement)
    say(f"\n  the job list page ran {len(explained['GET /api/users/{id}/jobs (first page)'])} statements, "
        f"{positions_in_list} of them queue_position counts (one per pending job on the page)")
    for label in ("GET /api/jobs/{id} (pending)", "GET /api/queue/stats", "GET /metrics"):
        records = [record for record in explained[label] if not record.error]
        slowest = max(records, key=lambda record: record.execution_ms)
        jit = sum(record.jit_ms for record in records)
        rows.append(Row("4 reads", f"EXPLAIN {label}: {len(records)} statements",
                        f"{sum(record.execution_ms for record in records):.2f} ms in all"
                        + (f" ({jit:.1f} ms of it JIT)" if jit else "")
                        + f"; slowest {slowest.execution_ms:.2f} ms: {_short(slowest.statement, 40)}",
                        target="(none set)"))
    for label in ("background processor", "reconciler", "cleanup", "lease renewal (a worker's keeper)"):
        records = [record for record in explained[label] if not record.error]
        if not records:
            rows.append(Row("4 reads", f"EXPLAIN {label}", "no statement explained", met=False))
            continue
        slowest = max(records, key=lambda record: record.execution_ms)
        seq = sorted({table for record in records for table in record.seq_scans_of_growing_tables()})
        met = slowest.execution_ms < SWEEP_TARGET_MS and not seq
        rows.append(Row("4 reads", f"EXPLAIN {label}: slowest of {len(records)}",
                        f"{slowest.execution_ms:.2f} ms: {_short(slowest.statement, 40)}"
                        + (f"; seq scan of {', '.join(seq)}" if seq else ""),
                        target=f"< {SWEEP_TARGET_MS:g} ms, index scans", met=met))
        unexplained = [record for record in explained[label] if record.error]
        if unexplained:
            say(f"  {label}: {len(unexplained)} statement(s) not explained: {unexplained[0].error}")
    return rows


def run(sizes: tuple[int, int], pending: int, users: int, requests_per_read: int, redis_db: int) -> list[Row]:
    small, large = sizes
    say(f"\n== 4. reads at scale: {small} then {large} jobs, {pending} pending across {users} users; "
        f"{requests_per_read} requests per read and size, one keep-alive client")
    with BenchStack({}, {}, redis_db=redis_db, attempts_worker=False) as stack:
        from webapp import create_app

        app = create_app({"DATABASE_URL": stack.database_url, "REDIS_URL": stack.redis_url,
                          "MEDIA_ROOT": str(stack.work / "media")})
        logging.getLogger().setLevel(logging.WARNING)  # the sweeps' INFO lines would drown the plans
        seeder = Seeder(stack, pending, users)
        seeder.first()
        seeder.grow_to(small)
        seeder.fold(app)
        at_small = time_reads(stack, seeder.first_user, users, requests_per_read)
        seeder.grow_to(large, past_ttl=PAST_TTL_JOBS)
        seeder.fold(app)
        at_large = time_reads(stack, seeder.first_user, users, requests_per_read)
        rows = []
        for read in READS:
            bound = 10.0 if read.startswith("GET /api/jobs/{id}") else 20.0 if "stats" in read or "metrics" in read \
                else None
            both = (at_small.p99[read], at_large.p99[read])
            rows.append(Row("4 reads", f"{read} p99 @{at_large.rows:,}", f"{both[1]:.1f} ms",
                            f"{both[0]:.1f} ms @{at_small.rows:,}", both[1] / both[0],
                            f"< {bound:g} ms at both" if bound else "(none set)",
                            max(both) < bound if bound else None))
        rows += explain_code_paths(stack, app, seeder.first_user)
    return rows
