"""The job row is the state machine: every status change is one guarded UPDATE here.

TRANSITIONS names each move with the statuses it may leave; each function below is one of
them and reports whether it won, so a redelivered message, a late attempt or a racing sweep
can never move a job twice or out of a terminal status. An attempt starts only with the
token of the message the scheduler sent for it, and runs fenced by its `lease_token`: once
the reconciler has recovered the job, the old attempt's writes match no row. What an attempt
ends with (the move, its attempt record, the ledger, the notification, the result) is written
in one transaction.
"""
from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    Select,
    Uuid,
    and_,
    any_,
    bindparam,
    cast,
    column,
    extract,
    func,
    insert,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from config import Settings
from renderq import billing, events, notify
from renderq.db import constant, db, execute_alone
from renderq.enums import ACTIVE_STATUSES, AttemptOutcome, EntryKind, Event, Outcome, Status
from renderq.jobs import policy
from renderq.models import Blob, Job, JobAttempt, Photo, User


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


def _leaves(name: str) -> Any:
    return Job.status.in_([constant(status) for status in sorted(TRANSITIONS[name].sources)])


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
    started_at: datetime  # when this attempt started, by the database's clock
    safety_agreed: bool = False
    photo_key: Optional[str] = None
    photo: Optional[bytes] = None  # the photo's bytes, when the database holds them
    # When this process asked for the claim, by its own clock: the lease was surely ours since.
    taken_at: float = field(default_factory=time.monotonic)

    def holds(self) -> Any:
        """SQL: the job is still this attempt's (not recovered, canceled or finished meanwhile)."""
        return and_(Job.status == Status.PROCESSING, Job.lease_token == self.token)


@dataclass(frozen=True)
class AttemptRecord:
    """How one generator call ended, for the attempt history written with its outcome."""
    outcome: AttemptOutcome
    error_code: Optional[str]
    # None: from the claim until the record is written, by the database's clock, so that the
    # record spans the call whatever held the attempt up around it (a late answer to the claim,
    # a slow commit, Redis restarting); the next attempt can only start after that commit.
    duration_seconds: Optional[float] = None


@dataclass(frozen=True)
class Finished:
    """A job reached a terminal status; `notification_id` is set when a webhook is to be sent."""
    job_id: uuid.UUID
    status: Status
    notification_id: Optional[int] = None


CLAIM_COLUMNS = (Job.kind, Job.user_id, Job.photo_id, Job.params, Job.attempts, Job.retry_count, Job.created_at,
                 Job.attempt_started_at)


def claim_from(row: Any, token: uuid.UUID, taken_at: Optional[float] = None) -> Claim:
    return Claim(row.id, token, row.kind, row.user_id, row.photo_id, row.params or {}, row.attempts,
                 row.retry_count, row.created_at, row.attempt_started_at or datetime.now(timezone.utc),
                 getattr(row, "safety_agreed", False), getattr(row, "photo_key", None), getattr(row, "photo", None),
                 time.monotonic() if taken_at is None else taken_at)


def _with_snapshot(*columns: Any) -> tuple:
    """RETURNING columns: the ones asked for, and the new state that status events carry."""
    return tuple(dict.fromkeys((*events.SNAPSHOT, *columns)))


def guarded_update(job_id: uuid.UUID, guard: Any, values: dict, returning: tuple = (),
                   attempt: Optional[tuple[Claim, AttemptRecord]] = None) -> Any:
    """One guarded UPDATE (and the attempt's record, if any), committed and announced as a
    status event; the row it returned, or None if the guard did not match."""
    statement = update(Job).where(Job.id == job_id, guard).values(updated_at=func.now(), **values)
    row = _update_and_record(statement.returning(*_with_snapshot(*returning)), attempt)
    if attempt is not None and row is None:
        _record_if_latest(*attempt)
    db.session.commit()
    events.record([row])
    return row


def _update_and_record(statement: Any, attempt: Optional[tuple[Claim, AttemptRecord]]) -> Any:
    """The row a guarded UPDATE ... RETURNING returned, or None; with `attempt`, the attempt's
    history row is written by the same statement if the UPDATE matched (one round trip)."""
    return db.session.connection().execute(_and_record(statement, attempt and _timed(attempt[1])),
                                           _attempt_parameters(attempt)).first()


def _and_record(statement: Any, timed: Optional[bool]) -> Any:
    """`statement`, and (unless `timed` is None: no attempt) the INSERT of the attempt's record
    if it returns a row."""
    if timed is None:
        return statement
    changed = statement.cte("changed")
    return select(changed).add_cte(_attempt_insert(timed, lambda row: row.select_from(changed)).cte("recorded"))


_ATTEMPT_VALUES = ("job_id", "number", "kind", "tier", "outcome", "error_code", "started_at")


def _timed(attempt: AttemptRecord) -> bool:
    return attempt.duration_seconds is not None


def _attempt_row(timed: bool) -> dict[str, Any]:
    """The attempt's history row, as SQL expressions by column (its values are parameters:
    see _attempt_parameters). Parameters are named apart from the jobs' columns: SQLAlchemy
    adds a parameter named like a column to the SET of an UPDATE on that table."""
    columns = JobAttempt.__table__.c
    row = {name: bindparam("history_" + name, type_=columns[name].type) for name in _ATTEMPT_VALUES}
    row["duration_ms"] = (bindparam("history_duration_ms", type_=Integer) if timed
                          else cast(extract("epoch", func.clock_timestamp() - row["started_at"]) * 1000, Integer))
    return row


def _attempt_parameters(attempt: Optional[tuple[Claim, AttemptRecord]]) -> dict[str, Any]:
    if attempt is None:
        return {}
    claim, record = attempt
    values = {"job_id": claim.job_id, "number": claim.attempts, "kind": claim.kind,
              "tier": policy.tier(claim.retry_count), "outcome": record.outcome, "error_code": record.error_code,
              "started_at": claim.started_at}
    if _timed(record):
        values["duration_ms"] = int(record.duration_seconds * 1000)
    return {"history_" + name: value for name, value in values.items()}


def _attempt_insert(timed: bool, chosen: Callable[[Select], Select]) -> Any:
    """The INSERT of an attempt's history row, from the SELECT of its values that `chosen`
    shapes (the row it is written for, the condition it is written under)."""
    row = _attempt_row(timed)
    return insert(JobAttempt).from_select(list(row), chosen(select(*(value.label(name) for name, value in row.items()))))


def _record_if_latest(claim: Claim, attempt: AttemptRecord) -> None:
    """The record of an attempt that lost its claim while it ran (the job was canceled, or
    recovered and not yet tried again): its generator call happened and belongs in the history,
    unless a later attempt has started. A recovery that lost to a renewed lease records nothing:
    the attempt it took for lost is alive. Nor does an outcome recorded again because the commit
    that recorded it went unanswered (the database crashed after making it durable)."""
    if attempt.outcome == AttemptOutcome.LOST:
        return
    recorded = select(JobAttempt.id).where(JobAttempt.job_id == claim.job_id, JobAttempt.number == claim.attempts,
                                           JobAttempt.started_at == claim.started_at).exists()
    # Judged under the job row's lock: a claim of the next attempt running now is waited for, then seen.
    latest = and_(Job.id == claim.job_id, Job.attempts == claim.attempts, ~recorded)
    db.session.connection().execute(
        _attempt_insert(_timed(attempt), lambda row: row.where(latest).with_for_update(of=Job)),
        _attempt_parameters((claim, attempt)))


# What an attempt's own claim guards with (Claim.holds), its lease token a parameter.
_HOLDS = and_(Job.status == constant(Status.PROCESSING), Job.lease_token == bindparam("held_lease", type_=Uuid))


def _finish_statement(transition: str, guard: Any, value_names: tuple[str, ...], timed: Optional[bool],
                      notices: bool = False, stores_result: bool = False) -> Any:
    """A finish's statement: the guarded UPDATE, the ledger's settlement (billing.settlement: the
    parameter `settle_as`), unless `timed` is None the attempt's record, if `notices` the
    notification (notify.NOTICED, its id as `notification_id`), and if `stores_result` the
    result's bytes (`result_bytes`) in `blobs` under its `new_result_path`. Its values are
    parameters: `finished_id`, and `new_<column>` for each of `value_names`."""
    values = {name: bindparam("new_" + name, type_=Job.__table__.c[name].type) for name in value_names}
    changed = (
        update(Job).where(Job.id == bindparam("finished_id", type_=Uuid), _leaves(transition), guard,
                          User.id == Job.user_id)
        .values(status=TRANSITIONS[transition].target, updated_at=func.now(), completed_at=func.now(),
                lease_token=null(), lease_expires_at=null(), dispatch_token=null(), **values)
        .returning(*_with_snapshot(*notify.JOB_COLUMNS, Job.generation), *notify.USER_COLUMNS).cte("changed"))
    statement = select(changed).add_cte(billing.settlement(changed))
    if notices:
        statement = statement.add_columns(select(notify.NOTICED.c.id).scalar_subquery().label("notification_id"))
    if stores_result:  # the attempt's own key, so a new row; none if the UPDATE matched nothing
        statement = statement.add_cte(insert(Blob).from_select(["key", "data"], select(
            bindparam("new_result_path", type_=Blob.key.type).label("key"),
            bindparam("result_bytes", type_=Blob.data.type).label("data")).select_from(changed)).cte("stored"))
    if timed is None:
        return statement
    return statement.add_cte(_attempt_insert(timed, lambda row: row.select_from(changed)).cte("recorded"))


# An attempt ends in one of these for every job, so they are built once per shape: building
# and hashing the statement cost the worker more than PostgreSQL's answer to it.
_attempt_finish_statement = functools.cache(
    lambda transition, value_names, timed, notices, stores_result:
    _finish_statement(transition, _HOLDS, value_names, timed, notices, stores_result))


def _finish(job_id: uuid.UUID, transition: str, guard: Any, values: dict, settings: Settings,
            attempt: Optional[tuple[Claim, AttemptRecord]] = None,
            result: Optional[bytes] = None) -> Optional[Finished]:
    """The one way into a terminal status, all or nothing: the guarded UPDATE, the attempt's
    record, the ledger's capture or release, the notification row, and `result` (the bytes,
    where the database is the store). `guard` None: the attempt's own claim.

    An attempt's finish whose statement writes its notification, or that has none to write,
    is that one statement, atomic by itself: it runs outside a transaction, one round trip
    where BEGIN and COMMIT around it made three. Any other finish is a transaction."""
    status = TRANSITIONS[transition].target
    timed = attempt and _timed(attempt[1])
    event = notify.event_for(status, values.get("outcome"), settings)
    parameters = {"finished_id": job_id, **{"new_" + name: value for name, value in values.items()},
                  "settle_as": EntryKind.CAPTURE if values.get("outcome") == Outcome.SUCCEEDED else EntryKind.RELEASE,
                  **_attempt_parameters(attempt)}
    notices = guard is None and event == Event.SUCCEEDED  # one statement fewer for the common end of an attempt
    if notices:
        parameters.update(notify.success_notice(job_id, attempt[0].kind))
    if result is not None:
        parameters["result_bytes"] = result
    if guard is None:
        statement = _attempt_finish_statement(transition, tuple(values), timed, notices, result is not None)
        parameters["held_lease"] = attempt[0].token
    else:
        statement = _finish_statement(transition, guard, tuple(values), timed)
    alone = guard is None and (notices or event is None)
    won = (execute_alone(statement, parameters) if alone
           else db.session.connection().execute(statement, parameters)).first()
    if won is None:
        db.session.rollback()
        if attempt is not None:
            _record_if_latest(*attempt)
            db.session.commit()
        return None
    if notices:
        notification_id = won.notification_id if won.webhook_url else None
    else:
        notification_id = notify.record(won, event, settings) if event else None
    if not alone:
        db.session.commit()
    events.record([won])
    return Finished(job_id, status, notification_id)


def claim(job_id: uuid.UUID, ticket: uuid.UUID, lease_seconds: float, worker_host: str,
          with_photo: bool = False) -> Optional[Claim]:
    """Start the attempt the message carrying `ticket` was sent for: a pending or due retrying
    job (the `claim` move), or a background try the background processor has claimed. None if
    the ticket is not the job's any more (a stale or duplicated message steps aside).
    `with_photo`: the photo's bytes come back in the same statement (they are in `blobs`)."""
    token = uuid.uuid4()
    # Before the statement: a process frozen while the claim is on the wire (committed, not yet
    # read) must count that time against the lease, which started by the database's clock.
    sent_at = time.monotonic()
    row = execute_alone(_claim_statement(lease_seconds, with_photo),
                        {"claimed_id": job_id, "ticket": ticket, "new_lease": token, "host": worker_host}).first()
    events.record([row])
    return claim_from(row, token, taken_at=sent_at) if row else None


@functools.cache
def _claim_statement(lease_seconds: float, with_photo: bool) -> Any:
    """Every attempt starts with this statement, so it is built once per process (see
    _attempt_finish_statement); its parameters: claimed_id, ticket, new_lease and host."""
    background_try = and_(Job.status == constant(Status.PROCESSING), Job.lease_token.is_(None))
    return _claiming(and_(Job.id == bindparam("claimed_id", type_=Uuid),
                          Job.dispatch_token == bindparam("ticket", type_=Uuid), or_(_leaves("claim"), background_try)),
                     bindparam("new_lease", type_=Uuid), lease_seconds, with_photo)


def picked_claim_statement(lease_seconds: float, with_photo: bool) -> Any:
    """The claims a dispatch round makes itself, in its transaction and under its lock, for the
    jobs it hands straight to this process's threads (scheduler.Dispatcher.take): no message and
    no ticket, each with a lease token of its own. Parameters: picked_ids, host."""
    return _claiming(and_(Job.id == any_(bindparam("picked_ids", type_=ARRAY(Uuid))), _leaves("claim"),
                          Job.dispatch_token.is_(None)),
                     func.gen_random_uuid(), lease_seconds, with_photo)


def _claiming(condition: Any, lease_token: Any, lease_seconds: float, with_photo: bool) -> Any:
    """The UPDATE that starts an attempt of the jobs matching `condition`, returning what the
    attempt needs (claim_from); `with_photo`: the photo's bytes too (they are in `blobs`)."""
    photo_key = select(Photo.path).where(Photo.id == Job.photo_id).scalar_subquery()
    photo = (select(Blob.data).join(Photo, Photo.path == Blob.key).where(Photo.id == Job.photo_id)
             .scalar_subquery() if with_photo else null()).label("photo")
    return (
        update(Job).where(condition)
        .values(status=TRANSITIONS["claim"].target, attempts=Job.attempts + 1, lease_token=lease_token,
                lease_expires_at=func.now() + timedelta(seconds=lease_seconds),
                attempt_started_at=func.clock_timestamp(),  # after any wait for the row, unlike now()
                started_at=func.coalesce(Job.started_at, func.now()), next_retry_at=null(), dispatch_token=null(),
                worker_host=bindparam("host", type_=String), updated_at=func.now())
        .returning(*_with_snapshot(*CLAIM_COLUMNS, Job.lease_token, Job.trace_parent),
                   select(User.safety_agreed_at.is_not(None)).where(User.id == Job.user_id)
                   .scalar_subquery().label("safety_agreed"),
                   photo_key.label("photo_key"), photo))


def claim_background_batch(limit: int, settings: Settings) -> list[Any]:
    """The background processor's pick, in the caller's transaction: up to `limit` jobs waiting
    for a background try, retry_count + 1 in one statement, each with the token its message will
    carry. Returns rows of (id, dispatch_token, kind, and the status event's columns)."""
    # Materialized, so the LIMIT and the row locks apply once: a plain `id IN (SELECT ... LIMIT n
    # FOR UPDATE SKIP LOCKED)` may be evaluated again per row and claim more than n.
    picked = (select(Job.id).where(_leaves("claim_background"), ~policy.background_exhausted(settings))
              .order_by(Job.updated_at).limit(limit).with_for_update(skip_locked=True)
              .cte("picked").prefix_with("MATERIALIZED"))
    return list(db.session.execute(
        update(Job).where(Job.id == picked.c.id, _leaves("claim_background"))
        .values(status=TRANSITIONS["claim_background"].target, retry_count=Job.retry_count + 1,
                dispatch_token=func.gen_random_uuid(), dispatched_at=func.now(), updated_at=func.now())
        .returning(*_with_snapshot(Job.dispatch_token, Job.kind, Job.trace_parent))
        .execution_options(synchronize_session=False)))


def succeed(claim: Claim, result_key: str, attempt: AttemptRecord, settings: Settings,
            result: Optional[bytes] = None) -> Optional[Finished]:
    """`result`: the image, where the database is the store (written by the finish's statement);
    another store has it put under `result_key` before."""
    return _finish(claim.job_id, "succeed", None, dict(
        outcome=Outcome.SUCCEEDED, result_path=result_key, error_code=None), settings, (claim, attempt), result)


def result_of(job_id: uuid.UUID) -> Optional[str]:
    """The key of the result the job was finished with, if any."""
    key = db.session.execute(select(Job.result_path).where(Job.id == job_id)).scalar()
    db.session.rollback()
    return key


def block(claim: Claim, block_reason: str, attempt: AttemptRecord, settings: Settings) -> Optional[Finished]:
    return _finish(claim.job_id, "block", None, dict(
        outcome=Outcome.BLOCKED, block_reason=block_reason, error_code=None), settings, (claim, attempt))


def fail(claim: Claim, error_code: str, detail: str, attempt: AttemptRecord, settings: Settings) -> Optional[Finished]:
    return _finish(claim.job_id, "fail", None, dict(error_code=error_code, error_detail=detail), settings,
                   (claim, attempt))


def cancel(job_id: uuid.UUID, settings: Settings) -> Optional[Finished]:
    """Cancel a job that has not finished; a running attempt's outcome then matches no row."""
    return _finish(job_id, "cancel", true(), {}, settings)


def requeue_failed(job_id: uuid.UUID, fair_tag: int) -> Any:
    """One failed job back to pending (see requeue_failed_batch): its row, or None if it had
    not failed."""
    rows = requeue_failed_batch({job_id: fair_tag})
    return rows[0] if rows else None


def requeue_failed_batch(fair_tags: dict[uuid.UUID, int]) -> list[Any]:
    """An admin's replay: failed jobs back to pending with fresh counters, each queued at its
    fair tag, and on to their next generation (whose hold renderq.billing takes). One guarded
    UPDATE for them all, in the caller's transaction; the rows of the jobs that were still
    failed: their status event's columns, user_id, generation and price."""
    if not fair_tags:
        return []
    queued = func.unnest(bindparam("job_ids", list(fair_tags), type_=ARRAY(Uuid)),
                         bindparam("fair_tags", list(fair_tags.values()), type_=ARRAY(BigInteger))
                         ).table_valued(column("job_id", Uuid), column("fair_tag", BigInteger)).render_derived("queued")
    return db.session.execute(
        update(Job).where(Job.id == queued.c.job_id, _leaves("requeue"))
        .values(status=TRANSITIONS["requeue"].target, attempts=0, retry_count=0, next_retry_at=None,
                error_code=None, error_detail=None, completed_at=None, started_at=None, dispatch_token=None,
                dispatched_at=None, fair_tag=queued.c.fair_tag, generation=Job.generation + 1, updated_at=func.now())
        .returning(*_with_snapshot(Job.user_id, Job.generation, Job.price))
        .execution_options(synchronize_session=False)).all()


def record_transient_failure(claim: Claim, error_code: str, detail: str, attempt: AttemptRecord,
                             settings: Settings, retry_after: float = 0,
                             guard: Any = None) -> tuple[Optional[policy.NextStep], Optional[Finished]]:
    """Move the job on after a transient failure: (the step taken, or None if the claim was
    lost meanwhile; and the Finished record when the step was to `failed`). `guard` narrows
    the claim's own (the reconciler's recovery re-checks that the lease is still expired)."""
    step = policy.plan_after_transient_failure(claim.attempts, claim.retry_count,
                                               datetime.now(timezone.utc) - claim.created_at, settings, retry_after)
    values: dict = dict(error_code=error_code, error_detail=detail)
    if step.status == Status.FAILED:
        finished = _finish(claim.job_id, "fail", guard, values, settings, (claim, attempt))
        return (step if finished else None), finished
    if step.retry_in is not None:
        values["next_retry_at"] = func.now() + timedelta(seconds=step.retry_in)
    transition = "retry_later" if step.status == Status.RETRYING else "to_background"
    won = guarded_update(claim.job_id, and_(_leaves(transition), claim.holds() if guard is None else guard),
                         dict(status=TRANSITIONS[transition].target, lease_token=None, lease_expires_at=None,
                              **values), attempt=(claim, attempt))
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
