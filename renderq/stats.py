"""Numbers for /api/queue/stats, the admin views and /metrics, in constant time (from
renderq.counters); only a view of one user's jobs reads that user's rows."""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

from sqlalchemy import func, select

from config.kinds import KINDS
from renderq import counters
from renderq.counters import JobCountRow
from renderq.db import db
from renderq.enums import Outcome, Status
from renderq.models import Job


def _rows(user_id: Optional[int]) -> list[JobCountRow]:
    if user_id is None:
        return counters.job_counts()
    query = (select(Job.kind, Job.status, func.coalesce(Job.outcome, ""), Job.retry_count, func.count())
             .where(Job.user_id == user_id).group_by(Job.kind, Job.status, Job.outcome, Job.retry_count))
    return [JobCountRow(*row) for row in db.session.execute(query)]


def _by_status_and_kind(rows: Iterable[JobCountRow]) -> tuple[dict, dict]:
    by_status = {status.value: 0 for status in Status}
    by_kind = {kind: {status.value: 0 for status in Status} for kind in KINDS}
    for row in rows:
        by_status[row.status] += row.count
        by_kind.setdefault(row.kind, {status.value: 0 for status in Status})[row.status] += row.count
    return by_status, by_kind


def counts(user_id: Optional[int] = None) -> tuple[dict, dict]:
    """(jobs by status, jobs by kind and status), every status and kind present."""
    return _by_status_and_kind(_rows(user_id))


def attempt_durations() -> dict:
    samples, (p50, p95) = counters.last_hour_percentiles(0.5, 0.95)
    return {"samples": samples, "p50_ms": p50, "p95_ms": p95}


def background(user_id: Optional[int]) -> dict:
    rows = _rows(user_id)
    by_status, by_kind = _by_status_and_kind(rows)
    histogram: Counter = Counter()
    for row in rows:
        histogram[row.retry_count] += row.count
    return {
        "pending_background_retry": by_status[Status.PENDING_BACKGROUND_RETRY],
        "processing": by_status[Status.PROCESSING],
        "failed": by_status[Status.FAILED],
        "completed": by_status[Status.COMPLETED],
        "blocked": sum(row.count for row in rows if row.outcome == Outcome.BLOCKED),
        "retry_count_histogram": {str(retries): histogram[retries] for retries in sorted(histogram)},
        "by_kind": {kind: sum(statuses.values()) for kind, statuses in by_kind.items()},
    }
