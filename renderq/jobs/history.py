"""The attempt history: one row per generator call, for stats, metrics and the admin views."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

from renderq.db import db
from renderq.enums import AttemptOutcome
from renderq.jobs.lifecycle import Claim
from renderq.jobs.policy import tier
from renderq.models import JobAttempt


def record_attempt(claim: Claim, outcome: AttemptOutcome, error_code: Optional[str], started_at: datetime,
                   duration_seconds: float) -> None:
    db.session.add(JobAttempt(job_id=claim.job_id, number=claim.attempts, kind=claim.kind,
                              tier=tier(claim.retry_count), outcome=outcome, error_code=error_code,
                              started_at=started_at, duration_ms=int(duration_seconds * 1000)))
    db.session.commit()


def now() -> datetime:
    return datetime.now(timezone.utc)
