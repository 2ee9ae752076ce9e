"""The lease of a running attempt: renewed while the attempt runs (renderq.workers), so the
reconciler can tell a dead worker (lease expired) from a slow generator (lease renewed)."""
from __future__ import annotations

import time

from sqlalchemy import and_, func, select

from renderq.db import db
from renderq.enums import Status
from renderq.jobs.lifecycle import CLAIM_COLUMNS, Claim, claim_from
from renderq.models import Job


def expired_claims() -> list[Claim]:
    """Attempts whose worker stopped renewing the lease: the worker died, hung or was cut off."""
    rows = db.session.execute(
        select(Job.id, Job.lease_token, *CLAIM_COLUMNS)
        .where(Job.status == Status.PROCESSING, Job.lease_token.is_not(None), Job.lease_expires_at < func.now())
        .limit(500)
    ).all()
    db.session.rollback()
    return [claim_from(row, row.lease_token) for row in rows]


def still_held(claim: Claim) -> bool:
    """Whether the claim is still this attempt's and its lease has not run out."""
    held = db.session.execute(select(Job.id).where(Job.id == claim.job_id, claim.holds(),
                                                   Job.lease_expires_at > func.now())).first() is not None
    db.session.rollback()
    return held


def surely_held(claim: Claim, lease_seconds: float) -> bool:
    """Whether the attempt may still call the generator. Right after the claim the lease cannot
    have run out, so no query is needed; a process that stalled (SIGSTOP, swapping) for half the
    lease may have been recovered meanwhile and must ask, or its call would belong to no attempt."""
    return time.monotonic() - claim.taken_at < lease_seconds / 2 or still_held(claim)


def still_expired(claim: Claim) -> object:
    """SQL: the claim is still this attempt's and its lease has still not been renewed."""
    return and_(claim.holds(), Job.lease_expires_at < func.now())
