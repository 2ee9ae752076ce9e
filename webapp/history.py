"""The attempt history: one row per generator call, for stats, metrics and the admin views."""
from __future__ import annotations

from datetime import datetime, timezone

from webapp.extensions import db
from webapp.lifecycle import Claim
from webapp.models import JobAttempt


def record_attempt(claim: Claim, outcome: str, error_code: str | None, started_at: datetime,
                   duration_seconds: float) -> None:
    db.session.add(JobAttempt(job_id=claim.job_id, number=claim.attempts, kind=claim.kind,
                              tier="background" if claim.retry_count else "fast", outcome=outcome,
                              error_code=error_code, started_at=started_at,
                              duration_ms=int(duration_seconds * 1000)))
    db.session.commit()


def now() -> datetime:
    return datetime.now(timezone.utc)
