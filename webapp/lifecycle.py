"""The job row is the state machine: every status change is one guarded UPDATE here.

Each transition names the statuses it may leave and reports whether it won, so a
redelivered message, a late attempt or a racing sweep can never move a job twice or out of
a terminal status. A running attempt is fenced by its `lease_token`: once a reconciler
has recovered the job, the old attempt's writes match no row.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from sqlalchemy import and_, func, or_, select, text, update

from config import Settings
from webapp import ledger, notifications
from webapp.extensions import db
from webapp.models import (
    BLOCKED, CANCELED, CAPTURE, COMPLETED, FAILED, PENDING, PENDING_BACKGROUND_RETRY, PROCESSING, RELEASE,
    RETRYING, SUCCEEDED, TERMINAL_STATUSES, Job,
)

# A retry message may arrive a little before next_retry_at when worker and database clocks differ.
CLOCK_SKEW = timedelta(seconds=1)


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


@dataclass(frozen=True)
class NextStep:
    """Where a transient failure sent the job: a fast-ladder retry, the background tier, or failed."""
    status: str
    retry_in: Optional[float] = None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _transition(job_id: uuid.UUID, guard: Any, values: dict, returning: tuple = ()) -> Any:
    statement = (
        update(Job)
        .where(Job.id == job_id, guard)
        .values(updated_at=func.now(), **values)
        .returning(Job.id, *returning)
    )
    row = db.session.execute(statement).first()
    db.session.commit()
    return row


@dataclass(frozen=True)
class Finished:
    """A job reached a terminal status; `notification_id` is set when the user is to be told."""
    job_id: uuid.UUID
    status: str
    notification_id: Optional[int] = None


def _finish(job_id: uuid.UUID, guard: Any, values: dict, settings: Settings) -> Optional[Finished]:
    """The one way into a terminal status: in a single transaction, the guarded UPDATE, the
    ledger's capture or release, and the notification row (SPEC §3, §4)."""
    status = values["status"]
    won = db.session.execute(
        update(Job).where(Job.id == job_id, guard)
        .values(updated_at=func.now(), completed_at=func.now(), lease_token=None, lease_expires_at=None, **values)
        .returning(Job.id)
    ).first()
    if won is None:
        db.session.rollback()
        return None
    succeeded = values.get("outcome") == SUCCEEDED
    ledger.settle(job_id, CAPTURE if succeeded else RELEASE)
    event = {SUCCEEDED: "succeeded", BLOCKED: "blocked"}.get(values.get("outcome"))
    if status == FAILED and settings.notify_on_failure:
        event = "failed"
    notification_id = notifications.record(job_id, event, settings) if event else None
    db.session.commit()
    return Finished(job_id, status, notification_id)


_CLAIM_COLUMNS = (Job.kind, Job.user_id, Job.photo_id, Job.params, Job.attempts, Job.retry_count, Job.created_at)


def _claim_from(row: Any, token: uuid.UUID) -> Claim:
    return Claim(row.id, token, row.kind, row.user_id, row.photo_id, row.params or {},
                 row.attempts, row.retry_count, row.created_at)


def owner_and_kind(job_id: uuid.UUID) -> Optional[tuple[int, str]]:
    row = db.session.execute(select(Job.user_id, Job.kind).where(Job.id == job_id)).first()
    db.session.rollback()
    return (row.user_id, row.kind) if row else None


def claim(job_id: uuid.UUID, lease_seconds: float) -> Optional[Claim]:
    """Take a pending or due retrying job for one fast-ladder attempt; None if someone else has it."""
    token = uuid.uuid4()
    due = or_(Job.next_retry_at.is_(None), Job.next_retry_at <= func.now() + CLOCK_SKEW)
    row = _transition(
        job_id,
        and_(Job.status.in_((PENDING, RETRYING)), due),
        dict(status=PROCESSING, attempts=Job.attempts + 1, lease_token=token,
             lease_expires_at=func.now() + timedelta(seconds=lease_seconds),
             next_retry_at=None, started_at=func.coalesce(Job.started_at, func.now())),
        _CLAIM_COLUMNS,
    )
    return _claim_from(row, token) if row else None


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
        select(func.count()).select_from(Job).where(Job.status == PROCESSING, Job.retry_count > 0)
    ).scalar_one()
    free_slots = settings.max_concurrent_background_tasks - running
    if free_slots <= 0:
        db.session.rollback()
        return []
    candidates = (
        select(Job.id)
        .where(Job.status == PENDING_BACKGROUND_RETRY,
               Job.retry_count < settings.max_retry_attempts,
               Job.created_at > func.now() - _max_background_age(settings))
        .order_by(Job.updated_at)
        .limit(free_slots)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    statement = (
        update(Job)
        .where(Job.id.in_(candidates), Job.status == PENDING_BACKGROUND_RETRY)
        .values(status=PROCESSING, retry_count=Job.retry_count + 1, lease_token=func.gen_random_uuid(),
                lease_expires_at=func.now() + timedelta(seconds=settings.job_lease_seconds + queue_wait_seconds),
                updated_at=func.now())
        .returning(Job.id, Job.lease_token, Job.kind)
    )
    claimed = [(row.id, row.lease_token, row.kind) for row in db.session.execute(statement)]
    db.session.commit()
    return claimed


def start_claimed(job_id: uuid.UUID, ticket: uuid.UUID, lease_seconds: float) -> Optional[Claim]:
    """Begin the attempt the background processor claimed with `ticket`.

    The ticket is exchanged for a fresh lease token, so a redelivered copy of the same
    message finds its ticket spent and steps aside.
    """
    token = uuid.uuid4()
    row = _transition(
        job_id,
        and_(Job.status == PROCESSING, Job.lease_token == ticket),
        dict(attempts=Job.attempts + 1, lease_token=token,
             lease_expires_at=func.now() + timedelta(seconds=lease_seconds)),
        _CLAIM_COLUMNS,
    )
    return _claim_from(row, token) if row else None


def renew_lease(job_id: uuid.UUID, token: uuid.UUID, lease_seconds: float) -> bool:
    return _transition(
        job_id,
        and_(Job.status == PROCESSING, Job.lease_token == token),
        dict(lease_expires_at=func.now() + timedelta(seconds=lease_seconds)),
    ) is not None


def _held(token: uuid.UUID) -> Any:
    return and_(Job.status == PROCESSING, Job.lease_token == token)


_RELEASE_LEASE = dict(lease_token=None, lease_expires_at=None)


def finish_succeeded(claim: Claim, result_path: str, settings: Settings) -> Optional[Finished]:
    return _finish(claim.job_id, _held(claim.token), dict(
        status=COMPLETED, outcome=SUCCEEDED, result_path=result_path, error_code=None), settings)


def finish_blocked(claim: Claim, block_reason: str, settings: Settings) -> Optional[Finished]:
    return _finish(claim.job_id, _held(claim.token), dict(
        status=COMPLETED, outcome=BLOCKED, block_reason=block_reason, error_code=None), settings)


def fail(claim: Claim, error_code: str, detail: str, settings: Settings) -> Optional[Finished]:
    return _finish(claim.job_id, _held(claim.token), dict(
        status=FAILED, error_code=error_code, error_detail=detail), settings)


def cancel(job_id: uuid.UUID, settings: Settings) -> Optional[Finished]:
    """Cancel a job that has not finished; a running attempt's outcome then matches no row."""
    return _finish(job_id, Job.status.not_in(TERMINAL_STATUSES), dict(status=CANCELED), settings)


def requeue_failed(job_id: uuid.UUID) -> bool:
    """An admin's retry: a failed job goes back to pending with fresh counters. Its hold was
    released when it failed and is not taken again, so the retry is free for the user."""
    won = db.session.execute(
        update(Job).where(Job.id == job_id, Job.status == FAILED)
        .values(status=PENDING, attempts=0, retry_count=0, next_retry_at=None, error_code=None,
                error_detail=None, completed_at=None, started_at=None, broker_epoch=None, updated_at=func.now())
        .returning(Job.id)
    ).first()
    return won is not None


def _max_background_age(settings: Settings) -> timedelta:
    return timedelta(milliseconds=settings.max_background_retry_age_ms)


def plan_after_transient_failure(attempts: int, retry_count: int, age: timedelta,
                                 settings: Settings, retry_after: float = 0) -> NextStep:
    """Pure policy of SPEC §2: the next step after the transient failure of attempt number `attempts`."""
    if retry_count > 0:  # a background attempt
        if retry_count >= settings.max_retry_attempts or age >= _max_background_age(settings):
            return NextStep(FAILED)
        return NextStep(PENDING_BACKGROUND_RETRY)
    retries_used = attempts - 1
    if retries_used < settings.max_retries:
        return NextStep(RETRYING, max(settings.retry_delay(retries_used + 1), retry_after))
    if settings.max_retry_attempts == 0:
        return NextStep(FAILED)
    return NextStep(PENDING_BACKGROUND_RETRY)


def record_transient_failure(claim: Claim, error_code: str, detail: str, settings: Settings,
                             retry_after: float = 0) -> tuple[Optional[NextStep], Optional[Finished]]:
    """Move the job on after a transient failure: (the step taken, or None if the claim was
    lost meanwhile; and the Finished record when the step was to `failed`)."""
    step = plan_after_transient_failure(claim.attempts, claim.retry_count, _now() - claim.created_at,
                                        settings, retry_after)
    values: dict = dict(status=step.status, error_code=error_code, error_detail=detail)
    if step.status == FAILED:
        finished = _finish(claim.job_id, _held(claim.token), values, settings)
        return (step if finished else None), finished
    if step.retry_in is not None:
        values["next_retry_at"] = func.now() + timedelta(seconds=step.retry_in)
    won = _transition(claim.job_id, _held(claim.token), {**values, **_RELEASE_LEASE})
    return (step if won else None), None


def expired_claims() -> list[Claim]:
    """Attempts whose worker stopped renewing the lease: the worker died or hung."""
    rows = db.session.execute(
        select(Job.id, Job.lease_token, *_CLAIM_COLUMNS)
        .where(Job.status == PROCESSING, Job.lease_expires_at < func.now())
        .limit(500)
    ).all()
    db.session.rollback()
    return [_claim_from(row, row.lease_token) for row in rows]


def fail_too_old(settings: Settings) -> list[Finished]:
    """Fail background-retry jobs past the age limit (or out of tries) without another attempt."""
    expired = or_(Job.created_at <= func.now() - _max_background_age(settings),
                  Job.retry_count >= settings.max_retry_attempts)
    job_ids = list(db.session.execute(
        select(Job.id).where(Job.status == PENDING_BACKGROUND_RETRY, expired).limit(500)).scalars())
    db.session.rollback()
    finished = [_finish(job_id, and_(Job.status == PENDING_BACKGROUND_RETRY, expired),
                        dict(status=FAILED, error_code="TOO_OLD", error_detail="too old for another background try"),
                        settings) for job_id in job_ids]
    return [record for record in finished if record]


def mark_published(job_id: uuid.UUID, broker_epoch: str) -> None:
    db.session.execute(update(Job).where(Job.id == job_id).values(broker_epoch=broker_epoch, published_at=func.now()))
    db.session.commit()


def unpublished(broker_epoch: str, grace: timedelta) -> list[tuple[uuid.UUID, str, Optional[datetime]]]:
    """Jobs waiting for a message the broker does not have (never published, or lost with the
    broker's data), and retries whose message is overdue (held by a worker that died)."""
    overdue_retry = and_(Job.status == RETRYING, Job.next_retry_at < func.now() - grace,
                         Job.published_at < func.now() - grace)
    lost = and_(Job.status.in_((PENDING, RETRYING)),
                or_(Job.broker_epoch.is_(None), Job.broker_epoch != broker_epoch),
                Job.updated_at < func.now() - timedelta(seconds=2))
    rows = db.session.execute(
        select(Job.id, Job.kind, Job.next_retry_at).where(or_(lost, overdue_retry)).limit(1000)
    ).all()
    db.session.rollback()
    return [(row.id, row.kind, row.next_retry_at) for row in rows]
