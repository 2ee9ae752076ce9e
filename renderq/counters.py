"""Counts and counters in constant time, whatever the number of jobs kept.

- Jobs by kind, status, outcome and retry_count: the folded counts plus the deltas that
  triggers append with every change of the jobs table (see the migration "counters kept as
  jobs move"). Exact at every moment, also under concurrent transitions and after cleanup.
- Attempts: all-time totals and duration buckets (Prometheus counters, which never go down)
  and per-minute buckets (percentiles of the last hour), folded from job_attempts past a
  watermark, plus the few rows past it.

`fold()` runs with the reconciler; a read never waits for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from sqlalchemy import text

from renderq.db import db

DURATION_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)
FOLD_LOCK = 7240003
MINUTES_KEPT = timedelta(hours=2)
_BUCKETS = "ARRAY[%s]" % ", ".join(str(bound) for bound in DURATION_BUCKETS_MS)
_BUCKET_OF = "coalesce((SELECT min(b) FROM unnest(%s) AS b WHERE a.duration_ms <= b), -1)" % _BUCKETS

_FOLD = text("""
    WITH moved AS (DELETE FROM job_count_deltas RETURNING kind, status, outcome, retry_count, delta)
    INSERT INTO job_counts AS c (kind, status, outcome, retry_count, count)
    SELECT kind, status, outcome, retry_count, sum(delta) FROM moved GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
    ON CONFLICT (kind, status, outcome, retry_count) DO UPDATE SET count = c.count + excluded.count;

    CREATE TEMPORARY TABLE new_attempts ON COMMIT DROP AS
    SELECT a.kind, a.tier, a.outcome, a.number > 1 AS retry, a.duration_ms, a.started_at, %(bucket)s AS le_ms
      FROM job_attempts a
     WHERE a.id > (SELECT last_id FROM counter_watermarks WHERE name = 'job_attempts')
       AND a.id <= (SELECT max(id) FROM job_attempts);

    UPDATE counter_watermarks SET last_id = greatest(last_id, (SELECT coalesce(max(id), 0) FROM job_attempts))
     WHERE name = 'job_attempts';

    INSERT INTO attempt_totals AS t (kind, tier, outcome, retry, count, duration_ms)
    SELECT kind, tier, outcome, retry, count(*), sum(duration_ms) FROM new_attempts GROUP BY 1, 2, 3, 4
    ON CONFLICT (kind, tier, outcome, retry) DO UPDATE
       SET count = t.count + excluded.count, duration_ms = t.duration_ms + excluded.duration_ms;

    INSERT INTO attempt_buckets AS b (kind, le_ms, count)
    SELECT kind, le_ms, count(*) FROM new_attempts WHERE outcome <> 'lost' GROUP BY 1, 2
    ON CONFLICT (kind, le_ms) DO UPDATE SET count = b.count + excluded.count;

    INSERT INTO attempt_minutes AS m (minute, kind, le_ms, count)
    SELECT date_trunc('minute', started_at), kind, le_ms, count(*) FROM new_attempts WHERE outcome <> 'lost'
     GROUP BY 1, 2, 3
    ON CONFLICT (minute, kind, le_ms) DO UPDATE SET count = m.count + excluded.count;

    DELETE FROM attempt_minutes WHERE minute < now() - interval '%(kept)d seconds';
""" % {"bucket": _BUCKET_OF, "kept": MINUTES_KEPT.total_seconds()})


def fold() -> bool:
    """Fold the deltas and the new attempts into the counters; False if another fold runs."""
    if not db.session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": FOLD_LOCK}).scalar():
        db.session.rollback()
        return False
    db.session.execute(_FOLD)
    db.session.commit()
    return True


_JOB_COUNTS = text("""
    SELECT kind, status, outcome, retry_count, sum(count) AS count FROM (
        SELECT kind, status, outcome, retry_count, count FROM job_counts
        UNION ALL SELECT kind, status, outcome, retry_count, delta FROM job_count_deltas) AS counted
     GROUP BY 1, 2, 3, 4 HAVING sum(count) <> 0
""")


@dataclass(frozen=True)
class JobCountRow:
    kind: str
    status: str
    outcome: str
    retry_count: int
    count: int


def job_counts() -> list[JobCountRow]:
    return [JobCountRow(row.kind, row.status, row.outcome, row.retry_count, int(row.count))
            for row in db.session.execute(_JOB_COUNTS)]


# The attempts past the watermark are read with the watermark as a value, so that the plan is a
# short range of the primary key (as a subquery the planner guesses a third of the table, and
# at a million attempts scans them). Each read also returns the watermark its snapshot saw: if a
# fold moved it in between, the read is repeated, so that no attempt is counted twice.
_PAST_WATERMARK = "a.id > :last_id"
_WATERMARK = "SELECT last_id FROM counter_watermarks WHERE name = 'job_attempts'"
_ATTEMPT_TOTALS = text("""
    SELECT kind, tier, outcome, retry, sum(count) AS count, sum(duration_ms) AS duration_ms,
           (%s) AS watermark FROM (
        SELECT kind, tier, outcome, retry, count, duration_ms FROM attempt_totals
        UNION ALL
        SELECT a.kind, a.tier, a.outcome, a.number > 1, 1, a.duration_ms FROM job_attempts a WHERE %s) AS counted
     GROUP BY 1, 2, 3, 4
""" % (_WATERMARK, _PAST_WATERMARK))
_ATTEMPT_BUCKETS = text("""
    SELECT kind, le_ms, sum(count) AS count, (%s) AS watermark FROM (
        SELECT kind, le_ms, count FROM attempt_buckets
        UNION ALL
        SELECT a.kind, %s, 1 FROM job_attempts a WHERE a.outcome <> 'lost' AND %s) AS counted
     GROUP BY 1, 2
""" % (_WATERMARK, _BUCKET_OF, _PAST_WATERMARK))
_LAST_HOUR = text("""
    SELECT le_ms, sum(count) AS count, (%s) AS watermark FROM (
        SELECT le_ms, count FROM attempt_minutes WHERE minute >= date_trunc('minute', now() - interval '1 hour')
        UNION ALL
        SELECT %s, 1 FROM job_attempts a
         WHERE a.outcome <> 'lost' AND a.started_at > now() - interval '1 hour' AND %s) AS counted
     GROUP BY 1
""" % (_WATERMARK, _BUCKET_OF, _PAST_WATERMARK))


def _past_the_watermark(query: Any) -> list:
    """The rows of `query`, folded counters plus the attempts not folded yet, from one snapshot."""
    last_id = db.session.execute(text(_WATERMARK)).scalar_one()
    while True:
        rows = db.session.execute(query, {"last_id": last_id}).all()
        seen = rows[0].watermark if rows else last_id
        if seen == last_id:
            return rows
        last_id = seen


def attempt_totals() -> list:
    return _past_the_watermark(_ATTEMPT_TOTALS)


def attempt_buckets() -> dict[str, dict[int, int]]:
    """kind → {upper bound in ms (-1: past the last): attempts in that bucket}, all time."""
    buckets: dict[str, dict[int, int]] = {}
    for row in _past_the_watermark(_ATTEMPT_BUCKETS):
        buckets.setdefault(row.kind, {})[row.le_ms] = int(row.count)
    return buckets


def last_hour_percentiles(*quantiles: float) -> tuple[int, list[Optional[int]]]:
    """(attempts in the last hour, each quantile's duration in ms): interpolated within the
    bucket it falls in, so exact to a bucket's width."""
    counts = {row.le_ms: int(row.count) for row in _past_the_watermark(_LAST_HOUR)}
    total = sum(counts.values())
    return total, [_quantile(counts, total, quantile) for quantile in quantiles]


def _quantile(counts: dict[int, int], total: int, quantile: float) -> Optional[int]:
    if not total:
        return None
    rank, seen, lower = quantile * total, 0, 0
    for bound in (*DURATION_BUCKETS_MS, -1):
        inside = counts.get(bound, 0)
        if inside and seen + inside >= rank:
            upper = bound if bound > 0 else lower * 2 or DURATION_BUCKETS_MS[-1]
            return int(round(lower + (upper - lower) * (rank - seen) / inside))
        seen += inside
        lower = bound if bound > 0 else lower
    return lower
