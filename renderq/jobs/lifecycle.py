"""The job row is the state machine: every status change is one guarded UPDATE here.

TRANSITIONS names each move with the statuses it may leave; each function below is one of
them and reports whether it won, so a redelivered message, a late attempt or a racing sweep
can never move a job twice or out of a terminal status. A running attempt is fenced by its
`lease_token`: once the reconciler has recovered the job, the old attempt's writes match no row.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from sqlalchemy import and_, func, or_, select, text, true, update

from config import Settings
from renderq import billing, notify
from renderq.db import db
from renderq.enums import ACTIVE_STATUSES, EntryKind, Outcome, Status
from renderq.jobs import policy
from renderq.models import Job


@dataclass(frozen=True)
class Transition:
    sources: frozenset[Status]
    target: Status


TRANSITIONS: dict[str, Transition] = {
    "claim": Transition(frozenset({Status.PENDING, Status.RETRYING}), Status.PROCESSING),
    "claim_background": Transition(frozenset({Status.PENDING_BACKGROUND_RETRY}), Status.PROCESSING),
    "retry_later": Transition(frozenset({Status.PROCESSING}), Status.RETRYING),
    "to_background": Transition(frozenset({Status.PROCESSING}), Status.PENDING_BACKGROUND_RETRY),
    "succeed": Transition(frozenset({Status.PROCESSING}), Status.COMPLETED),
    "block": Transition(frozenset({Status.PROCESSING}), Status.COMPLETED),
    "fail": Transition(frozenset({Status.PROCESSING}), Status.FAILED),
    "expire": Transition(frozenset({Status.PENDING_BACKGROUND_RETRY}), Status.FAILED),
    "cancel": Transition(ACTIVE_STATUSES, Status.CANCELED),
    "requeue": Transition(frozenset({Status.FAILED}), Status.PENDING),  # an admin's retry, the one way back
}

# A retry message may arrive a little before next_retry_at when worker and database clocks differ.
CLOCK_SKEW = timedelta(seconds=1)


def _leaves(name: str) -> Any:
    return Job.status.in_(TRANSITIONS[name].sources)


@dataclass(frozen=True)
class Claim:
    """The right to run one attempt of a job, and what the attempt needs to know."""
    job_id: uuid.UUID
    token: uuid.UUID
    kind: str
    user_id: int
    photo_id: Optional[uuid.UUID]
    params: dict
    attempts: int
    retry_count: int
    created_at: datetime

    def holds(self) -> Any:
        """SQL: the job is still this attempt's (not recovered, canceled or finished meanwhile)."""
        return and_(Job.status == Status.PROCESSING, Job.lease_token == self.token)


@dataclass(frozen=True)
class Finished:
    """A job reached a terminal status; `notification_id` is set when the user is to be told."""
    job_id: uuid.UUID
    status: Status
    notification_id: Optional[int] = None


CLAIM_COLUMNS = (Job.kind, Job.user_id, Job.photo_id, Job.params, Job.attempts, Job.retry_count, Job.created_at)


def claim_from(row: Any, token: uuid.UUID) -> Claim:
    return Claim(row.id, token, row.kind, row.user_id, row.photo_id, row.params or {},
                 row.attempts, row.retry_count, row.created_at)


def guarded_update(job_id: uuid.UUID, guard: Any, values: dict, returning: tuple = ()) -> Any:
    """One guarded UPDATE, committed; the row it returned, or None if the guard did not match."""
    row = db.session.execute(
        update(Job).where(Job.id == job_id, guard).values(updated_at=func.now(), **values)
        .returning(Job.id, *returning)
    ).first()
    db.session.commit()
    return row


def _finish(job_id: uuid.UUID, transition: str, guard: Any, values: dict, settings: Settings) -> Optional[Finished]:
    """The one way into a terminal status: in a single transaction, the guarded UPDATE, the
    ledger's capture or release, and the notification row."""
    status = TRANSITIONS[transition].target
    won = db.session.execute(
        update(Job).where(Job.id == job_id, _leaves(transition), guard)
        .values(status=status, updated_at=func.now(), completed_at=func.now(), lease_token=None,
                lease_expires_at=None, **values)
        .returning(Job.id)
    ).first()
    if won is None:
        db.session.rollback()
        return None
    billing.settle(job_id, EntryKind.CAPTURE if values.get("outcome") == Outcome.SUCCEEDED else EntryKind.RELEASE)
    event = notify.event_for(status, values.get("outcome"), settings)
    notification_id = notify.record(job_id, event, settings) if event else None
    db.session.commit()
    return Finished(job_id, status, notification_id)


def owner_and_kind(job_id: uuid.UUID) -> Optional[tuple[int, str]]:
    row = db.session.execute(select(Job.user_id, Job.kind).where(Job.id == job_id)).first()
    db.session.rollback()
    return (row.user_id, row.kind) if row else None


def claim(job_id: uuid.UUID, lease_seconds: float) -> Optional[Claim]:
    """Take a pending or due retrying job for one fast-ladder attempt; None if someone else has it."""
    token = uuid.uuid4()
    due = or_(Job.next_retry_at.is_(None), Job.next_retry_at <= func.now() + CLOCK_SKEW)
    row = guarded_update(
        job_id, and_(_leaves("claim"), due),
        dict(status=TRANSITIONS["claim"].target, attempts=Job.attempts + 1, lease_token=token,
             lease_expires_at=func.now() + timedelta(seconds=lease_seconds),
             next_retry_at=None, started_at=func.coalesce(Job.started_at, func.now())),
        CLAIM_COLUMNS,
    )
    return claim_from(row, token) if row else None


def claim_background_batch(settings: Settings, queue_wait_seconds: float) -> list[tuple[uuid.UUID, uuid.UUID, str]]:
    """The background processor's pick: up to its free slots, retry_count += 1, in one statement.

    Returns (job id, ticket, kind) triples; each attempt then starts with `start_claimed(ticket)`.
    The lease covers the wait in the queue too, so a busy pool does not look like a dead worker.
    """
    # One sweep at a time, so two sweeps cannot both see the same free slots.
    if not db.session.execute(text("SELECT pg_try_advisory_xact_lock(7240001)")).scalar():
        db.session.rollback()
        return []
    running = db.session.execute(
        select(func.count()).select_from(Job).where(Job.status == Status.PROCESSING, Job.retry_count > 0)
    ).scalar_one()
    free_slots = settings.max_concurrent_background_tasks - running
    if free_slots <= 0:
        db.session.rollback()
        return []
    candidates = (
        select(Job.id)
        .where(_leaves("claim_background"), ~policy.background_exhausted(settings))
        .order_by(Job.updated_at)
        .limit(free_slots)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    statement = (
        update(Job)
        .where(Job.id.in_(candidates), _leaves("claim_background"))
        .values(status=TRANSITIONS["claim_background"].target, retry_count=Job.retry_count + 1,
                lease_token=func.gen_random_uuid(),
                lease_expires_at=func.now() + timedelta(seconds=settings.job_lease_seconds + queue_wait_seconds),
                updated_at=func.now())
        .returning(Job.id, Job.lease_token, Job.kind)
    )
    claimed = [(row.id, row.lease_token, row.kind) for row in db.session.execute(statement)]
    db.session.commit()
    return claimed


def start_claimed(job_id: uuid.UUID, ticket: uuid.UUID, lease_seconds: float) -> Optional[Claim]:
    """Begin the attempt the background processor claimed with `ticket` (no status change).

    The ticket is exchanged for a fresh lease token, so a redelivered copy of the same
    message finds its ticket spent and steps aside.
    """
    token = uuid.uuid4()
    row = guarded_update(
        job_id, and_(Job.status == Status.PROCESSING, Job.lease_token == ticket),
        dict(attempts=Job.attempts + 1, lease_token=token, lease_expires_at=func.now() + timedelta(seconds=lease_seconds)),
        CLAIM_COLUMNS,
    )
    return claim_from(row, token) if row else None


def succeed(claim: Claim, result_path: str, settings: Settings) -> Optional[Finished]:
    return _finish(claim.job_id, "succeed", claim.holds(), dict(
        outcome=Outcome.SUCCEEDED, result_path=result_path, error_code=None), settings)


def block(claim: Claim, block_reason: str, settings: Settings) -> Optional[Finished]:
    return _finish(claim.job_id, "block", claim.holds(), dict(
        outcome=Outcome.BLOCKED, block_reason=block_reason, error_code=None), settings)


def fail(claim: Claim, error_code: str, detail: str, settings: Settings) -> Optional[Finished]:
    return _finish(claim.job_id, "fail", claim.holds(), dict(error_code=error_code, error_detail=detail), settings)


def cancel(job_id: uuid.UUID, settings: Settings) -> Optional[Finished]:
    """Cancel a job that has not finished; a running attempt's outcome then matches no row."""
    return _finish(job_id, "cancel", true(), {}, settings)


def requeue_failed(job_id: uuid.UUID) -> bool:
    """An admin's retry: a failed job goes back to pending with fresh counters. Its hold was
    released when it failed and is not taken again, so the retry is free for the user.
    Runs in the caller's transaction."""
    won = db.session.execute(
        update(Job).where(Job.id == job_id, _leaves("requeue"))
        .values(status=TRANSITIONS["requeue"].target, attempts=0, retry_count=0, next_retry_at=None,
                error_code=None, error_detail=None, completed_at=None, started_at=None, broker_epoch=None,
                updated_at=func.now())
        .returning(Job.id)
    ).first()
    return won is not None


def record_transient_failure(claim: Claim, error_code: str, detail: str, settings: Settings,
                             retry_after: float = 0) -> tuple[Optional[policy.NextStep], Optional[Finished]]:
    """Move the job on after a transient failure: (the step taken, or None if the claim was
    lost meanwhile; and the Finished record when the step was to `failed`)."""
    step = policy.plan_after_transient_failure(claim.attempts, claim.retry_count,
                                               datetime.now(timezone.utc) - claim.created_at, settings, retry_after)
    values: dict = dict(error_code=error_code, error_detail=detail)
    if step.status == Status.FAILED:
        finished = _finish(claim.job_id, "fail", claim.holds(), values, settings)
        return (step if finished else None), finished
    if step.retry_in is not None:
        values["next_retry_at"] = func.now() + timedelta(seconds=step.retry_in)
    transition = "retry_later" if step.status == Status.RETRYING else "to_background"
    won = guarded_update(claim.job_id, claim.holds(),
                dict(status=TRANSITIONS[transition].target, lease_token=None, lease_expires_at=None, **values))
    return (step if won else None), None


def expire_background(settings: Settings) -> list[Finished]:
    """Fail background-retry jobs past the age limit (or out of tries) without another attempt."""
    exhausted = policy.background_exhausted(settings)
    job_ids = list(db.session.execute(select(Job.id).where(_leaves("expire"), exhausted).limit(500)).scalars())
    db.session.rollback()
    finished = [_finish(job_id, "expire", exhausted, dict(error_code="TOO_OLD",
                                                          error_detail="too old for another background try"), settings)
                for job_id in job_ids]
    return [record for record in finished if record]
