"""Read-only numbers for /api/queue/stats and the admin monitoring views."""
from __future__ import annotations

from typing import Optional

from sqlalchemy import func, select, text

from config.kinds import KINDS
from renderq.db import db
from renderq.enums import AttemptOutcome, Outcome, Status
from renderq.models import Job

_DURATIONS = text("""
    SELECT count(*) AS samples,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95
      FROM job_attempts
     WHERE started_at > now() - interval '1 hour' AND outcome <> :lost
""").bindparams(lost=AttemptOutcome.LOST)


def counts(user_id: Optional[int] = None) -> tuple[dict, dict]:
    """(jobs by status, jobs by kind and status), every status and kind present."""
    query = select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    if user_id is not None:
        query = query.where(Job.user_id == user_id)
    by_status = {status.value: 0 for status in Status}
    by_kind = {kind: {status.value: 0 for status in Status} for kind in KINDS}
    for kind, status, count in db.session.execute(query):
        by_status[status] += count
        by_kind.setdefault(kind, {status.value: 0 for status in Status})[status] += count
    return by_status, by_kind


def attempt_durations() -> dict:
    row = db.session.execute(_DURATIONS).one()
    as_int = lambda value: None if value is None else int(round(value))  # noqa: E731
    return {"samples": row.samples, "p50_ms": as_int(row.p50), "p95_ms": as_int(row.p95)}


def background(user_id: Optional[int]) -> dict:
    scope = [] if user_id is None else [Job.user_id == user_id]
    by_status, by_kind = counts(user_id)
    blocked = db.session.execute(select(func.count()).select_from(Job).where(Job.outcome == Outcome.BLOCKED, *scope)).scalar()
    histogram = {str(retries): count for retries, count in db.session.execute(
        select(Job.retry_count, func.count()).where(*scope).group_by(Job.retry_count).order_by(Job.retry_count))}
    return {
        "pending_background_retry": by_status[Status.PENDING_BACKGROUND_RETRY],
        "processing": by_status[Status.PROCESSING],
        "failed": by_status[Status.FAILED],
        "completed": by_status[Status.COMPLETED],
        "blocked": blocked,
        "retry_count_histogram": histogram,
        "by_kind": {kind: sum(statuses.values()) for kind, statuses in by_kind.items()},
    }

