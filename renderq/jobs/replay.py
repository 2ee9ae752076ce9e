"""Replaying failed jobs: an admin's filter (error code, kind, user, when they failed), every
matching job back to pending in one transaction, each with a new hold of its price, and a
record of the action (`job_replays`).

At most `limit` matching jobs are examined, oldest failure first. Each is replayed or skipped
with a reason: its user has not the credit for a new hold (INSUFFICIENT_CREDITS), its photo
was deleted (PHOTO_GONE), or its last hold is still open (HOLD_NOT_RELEASED, which a failed
job's release in the transaction that failed it rules out; checked all the same). A replayed
job runs the normal ladder again from fresh counters at the back of its user's fair queue, as
its next generation: the ledger gives that generation its own hold and its own capture or
release (renderq.billing), so a job that succeeds on replay is charged once, for the run that
delivered.

Two replays at once never take the same job: the candidates are locked FOR UPDATE SKIP LOCKED,
so a second replay sees only what the first did not take, and the requeue is a guarded UPDATE
all the same. Users are locked in id order after their jobs, as every finishing attempt locks
its job before its user.
"""
from __future__ import annotations

import logging
import re
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NoReturn, Optional

from sqlalchemy import and_, exists, or_, select

from config.kinds import KINDS
from renderq import billing, events
from renderq.db import db
from renderq.enums import EntryKind, Status
from renderq.errors import Conflict, InsufficientCredits, InvalidInput, NotFound
from renderq.jobs import lifecycle, scheduler
from renderq.logs import job_logging
from renderq.messages import INPUT_ERROR_CODES
from renderq.models import Job, JobReplay, LedgerEntry, User

log = logging.getLogger(__name__)

MAX_LIMIT = 10_000
MAX_ID = 2 ** 63 - 1
FIELDS = ("status", "error_code", "kind", "user_id", "failed_after", "failed_before", "limit", "dry_run")
# The public code of every failure that was not the user's input (renderq.messages.public_error).
GENERATOR_UNAVAILABLE = "GENERATOR_UNAVAILABLE"
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")

INSUFFICIENT_CREDITS, PHOTO_GONE, HOLD_NOT_RELEASED = "INSUFFICIENT_CREDITS", "PHOTO_GONE", "HOLD_NOT_RELEASED"
SKIP_REASONS = {
    INSUFFICIENT_CREDITS: "its user has not enough credits available for a new hold of its price",
    PHOTO_GONE: "its photo was deleted",
    HOLD_NOT_RELEASED: "its last hold is still open",
}


@dataclass(frozen=True)
class ReplayFilter:
    """Which failed jobs a replay examines: at most `limit`, oldest failure first."""
    limit: int
    error_code: Optional[str] = None  # an internal code (jobs.error_code) or GENERATOR_UNAVAILABLE
    kind: Optional[str] = None
    user_id: Optional[int] = None
    failed_after: Optional[datetime] = None  # inclusive
    failed_before: Optional[datetime] = None  # exclusive
    job_id: Optional[uuid.UUID] = None  # an admin's retry of one job

    def as_json(self) -> dict:
        fields = {"status": Status.FAILED.value, "job_id": str(self.job_id) if self.job_id else None,
                  "error_code": self.error_code, "kind": self.kind, "user_id": self.user_id,
                  "failed_after": _iso(self.failed_after), "failed_before": _iso(self.failed_before),
                  "limit": self.limit}
        return {name: value for name, value in fields.items() if value is not None}

    def conditions(self) -> list[Any]:
        conditions = [Job.status == Status.FAILED]
        if self.job_id is not None:
            conditions.append(Job.id == self.job_id)
        if self.error_code == GENERATOR_UNAVAILABLE:
            conditions.append(or_(Job.error_code.is_(None), Job.error_code.not_in(INPUT_ERROR_CODES)))
        elif self.error_code is not None:
            conditions.append(Job.error_code == self.error_code)
        if self.kind is not None:
            conditions.append(Job.kind == self.kind)
        if self.user_id is not None:
            conditions.append(Job.user_id == self.user_id)
        if self.failed_after is not None:
            conditions.append(Job.completed_at >= self.failed_after)
        if self.failed_before is not None:
            conditions.append(Job.completed_at < self.failed_before)
        return conditions


def _iso(moment: Optional[datetime]) -> Optional[str]:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def parse_request(body: object) -> tuple[ReplayFilter, bool]:
    """The filter and dry_run flag of a replay request (a JSON object), or InvalidInput saying
    what to fix (NotFound for a user_id that does not exist)."""
    if not isinstance(body, dict):
        raise InvalidInput("INVALID_BODY", "The body must be a JSON object with: %s." % ", ".join(FIELDS))
    unknown = set(body) - set(FIELDS)
    if unknown:
        raise InvalidInput("INVALID_BODY", "Unknown fields: %s; expected %s." % (", ".join(sorted(unknown)),
                                                                                 ", ".join(FIELDS)))
    if body.get("status", Status.FAILED.value) != Status.FAILED.value:
        raise InvalidInput("INVALID_STATUS", "Only failed jobs can be replayed: status must be \"failed\" "
                                             "(or left out).")
    spec = ReplayFilter(limit=_limit(body.get("limit")), error_code=_error_code(body.get("error_code")),
                        kind=_kind(body.get("kind")), user_id=_user_id(body.get("user_id")),
                        failed_after=parse_time(body.get("failed_after"), "failed_after"),
                        failed_before=parse_time(body.get("failed_before"), "failed_before"))
    if spec.failed_after and spec.failed_before and spec.failed_after >= spec.failed_before:
        raise InvalidInput("INVALID_TIME_WINDOW", "failed_after must be earlier than failed_before.")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise InvalidInput("INVALID_DRY_RUN", "dry_run must be true or false.")
    return spec, dry_run


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _limit(value: object) -> int:
    if not _whole(value) or not 1 <= value <= MAX_LIMIT:  # type: ignore[operator]
        raise InvalidInput("INVALID_LIMIT", "limit is required: a whole number from 1 to %d, the most failed jobs "
                                            "this replay examines." % MAX_LIMIT)
    return value  # type: ignore[return-value]


def _error_code(value: object) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not _ERROR_CODE.fullmatch(value):
        raise InvalidInput("INVALID_ERROR_CODE", "error_code must be an error code such as GENERATOR_BUSY, TIME_LIMIT, "
                                                 "WORKER_LOST, TOO_OLD or INVALID_INPUT, or GENERATOR_UNAVAILABLE for "
                                                 "every failure that was not the user's input.")
    return value


def _kind(value: object) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or value not in KINDS:
        raise InvalidInput("INVALID_KIND", "kind must be one of: %s." % ", ".join(sorted(KINDS)))
    return value


def _user_id(value: object) -> Optional[int]:
    if value is None:
        return None
    if not _whole(value) or not 1 <= value <= MAX_ID:  # type: ignore[operator]
        raise InvalidInput("INVALID_USER_ID", "user_id must be a whole number from 1 to %d." % MAX_ID)
    if db.session.get(User, value) is None:
        raise NotFound("NOT_FOUND", "No user with id %d." % value)
    return value  # type: ignore[return-value]


def parse_time(value: object, name: str) -> Optional[datetime]:
    """An ISO 8601 time with a UTC offset (a bare local time would mean different hours on
    different hosts)."""
    if value is None:
        return None
    problem = "%s must be an ISO 8601 time with a UTC offset, such as 2026-11-28T14:00:00Z." % name
    if not isinstance(value, str):
        raise InvalidInput("INVALID_TIME", problem)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput("INVALID_TIME", problem) from None
    if moment.tzinfo is None:
        raise InvalidInput("INVALID_TIME", problem)
    return moment


@dataclass(frozen=True)
class Skipped:
    job_id: uuid.UUID
    user_id: int
    reason: str  # a key of SKIP_REASONS

    def as_json(self) -> dict:
        return {"job_id": str(self.job_id), "user_id": self.user_id, "reason": self.reason,
                "message": SKIP_REASONS[self.reason]}


@dataclass(frozen=True)
class ReplayReport:
    """What a replay did (or, for a dry run, would do)."""
    replay_id: Optional[int]
    dry_run: bool
    spec: ReplayFilter
    replayed: list[uuid.UUID]
    skipped: list[Skipped]
    credits_held: int
    duration_ms: int
    created_at: Optional[datetime] = None  # when it was recorded (a dry run is not)

    @property
    def skipped_reasons(self) -> dict[str, int]:
        return dict(Counter(skip.reason for skip in self.skipped))


@dataclass
class _Plan:
    """The candidates, their users (locked unless a dry run), and the split into replayed and skipped."""
    users: dict[int, User]
    chosen: list[Any] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _hold_open() -> Any:
    """SQL: the hold of the job's current generation has been neither captured nor released."""
    def entry(*kinds: EntryKind) -> Any:
        return exists().where(LedgerEntry.job_id == Job.id, LedgerEntry.generation == Job.generation,
                              LedgerEntry.entry_type.in_(kinds))
    return and_(entry(EntryKind.HOLD), ~entry(EntryKind.CAPTURE, EntryKind.RELEASE))


def _photo_gone() -> Any:
    photo_kinds = [name for name, kind in KINDS.items() if kind.needs_photo]
    return and_(Job.kind.in_(photo_kinds), Job.photo_id.is_(None))


def _plan(spec: ReplayFilter, lock: bool) -> _Plan:
    """Examine the matching jobs, oldest failure first: with `lock`, lock them (skipping those
    another replay holds, unless it is one job an admin asked for) and their users."""
    query = (select(Job.id, Job.user_id, Job.price, _hold_open().label("hold_open"), _photo_gone().label("photo_gone"))
             .where(*spec.conditions()).order_by(Job.completed_at, Job.id).limit(spec.limit))
    if lock:
        query = query.with_for_update(of=Job, skip_locked=spec.job_id is None)
    rows = db.session.execute(query).all()
    user_ids = {row.user_id for row in rows}
    if lock:
        users = billing.lock_users(user_ids)
    else:
        users = {user.id: user for user in db.session.execute(
            select(User).where(User.id.in_(user_ids)).execution_options(populate_existing=True)).scalars()}
    plan = _Plan(users)
    room = {user.id: billing.available(user) for user in users.values()}
    for row in rows:
        reason = _skip_reason(row, room[row.user_id])
        if reason:
            plan.skipped.append(Skipped(row.id, row.user_id, reason))
        else:
            room[row.user_id] -= row.price
            plan.chosen.append(row)
    return plan


def _skip_reason(row: Any, credits_left: int) -> Optional[str]:
    """Why a candidate cannot be replayed, or None; `credits_left` is what its user has
    available after the earlier failures this replay took."""
    if row.photo_gone:
        return PHOTO_GONE
    if row.hold_open:
        return HOLD_NOT_RELEASED
    if row.price > credits_left:
        return INSUFFICIENT_CREDITS
    return None


def replay(spec: ReplayFilter, *, dry_run: bool, requested_by: str, admin_id: Optional[int] = None) -> ReplayReport:
    """Replay the failed jobs `spec` matches (or, with dry_run, only say what would be replayed
    and skipped, changing nothing), record the action, and let the scheduler start them."""
    started = time.monotonic()
    plan = _plan(spec, lock=not dry_run)
    if dry_run:
        db.session.rollback()
        return ReplayReport(None, True, spec, [row.id for row in plan.chosen], plan.skipped,
                            sum(row.price for row in plan.chosen), _since(started))
    return _carry_out(plan, spec, requested_by, admin_id, started)


def replay_one(job_id: uuid.UUID, *, requested_by: str, admin_id: Optional[int] = None) -> ReplayReport:
    """An admin's retry of one job: the same replay, refused when it cannot be done
    (Conflict unless the job failed, InsufficientCredits without the credit for a new hold)."""
    started = time.monotonic()
    spec = ReplayFilter(limit=1, job_id=job_id)
    plan = _plan(spec, lock=True)
    if plan.skipped:
        db.session.rollback()
        _refuse(job_id, plan.skipped[0], plan.users[plan.skipped[0].user_id])
    if not plan.chosen:
        db.session.rollback()
        status = db.session.execute(select(Job.status).where(Job.id == job_id)).scalar()
        raise Conflict("JOB_NOT_FAILED", "Only failed jobs can be retried; this one is %s." % status)
    return _carry_out(plan, spec, requested_by, admin_id, started)


def _refuse(job_id: uuid.UUID, skip: Skipped, user: User) -> NoReturn:
    if skip.reason == INSUFFICIENT_CREDITS:
        price = db.session.execute(select(Job.price).where(Job.id == job_id)).scalar_one()
        raise InsufficientCredits(price, billing.available(user))
    raise Conflict(skip.reason, "This job cannot be retried: %s." % SKIP_REASONS[skip.reason])


def _carry_out(plan: _Plan, spec: ReplayFilter, requested_by: str, admin_id: Optional[int],
               started: float) -> ReplayReport:
    """The writes, in one transaction: the requeue, the holds, the record; then the dispatch."""
    jobs_of: dict[int, list[uuid.UUID]] = defaultdict(list)
    for row in plan.chosen:
        jobs_of[row.user_id].append(row.id)
    fair_tags: dict[uuid.UUID, int] = {}
    for user_id, job_ids in jobs_of.items():
        fair_tags.update(zip(job_ids, scheduler.next_tags(plan.users[user_id], len(job_ids))))
    requeued = lifecycle.requeue_failed_batch(fair_tags)
    held = billing.hold_replays(plan.users, [billing.ReplayHold(row.user_id, row.id, row.generation, row.price)
                                             for row in requeued])
    report = ReplayReport(None, False, spec, [row.id for row in requeued], plan.skipped, held, _since(started))
    record = JobReplay(requested_by=requested_by, admin_id=admin_id, filter=spec.as_json(),
                       replayed=len(report.replayed), skipped=len(report.skipped),
                       skipped_reasons=report.skipped_reasons, credits_held=held,
                       job_ids=[str(job_id) for job_id in report.replayed],
                       skipped_jobs=[skip.as_json() for skip in report.skipped], duration_ms=report.duration_ms)
    db.session.add(record)
    db.session.flush()  # its id and created_at, from RETURNING
    replay_id, created_at = record.id, record.created_at
    db.session.commit()
    events.record(requeued)
    reasons = ", ".join("%s %d" % (reason, count) for reason, count in sorted(report.skipped_reasons.items()))
    log.info("📋 [QUEUE] replay %d by %s: %d failed job(s) back to pending, %d skipped%s", replay_id, requested_by,
             len(report.replayed), len(report.skipped), " (%s)" % reasons if reasons else "")
    for row in requeued:
        with job_logging(row.id):
            log.info("📋 [QUEUE] job %s replayed (replay %d, generation %d)", row.id, replay_id, row.generation)
    scheduler.dispatch_soon()
    return ReplayReport(replay_id, False, spec, report.replayed, report.skipped, held, report.duration_ms, created_at)


def _since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
