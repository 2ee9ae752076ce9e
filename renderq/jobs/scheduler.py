"""The fair schedule: which waiting job gets the next free generator slot, and when its
attempt message is sent.

Waiting jobs wait in PostgreSQL, not in the broker. The broker only ever holds attempt
messages for slots that are free, so a lost message is noticed within seconds and a job that
waits for capacity does not spin through the broker.

- Slots: every attempts worker registers how many attempts it runs at once (renderq.workers);
  with GENERATOR_MAX_INFLIGHT set, no more than that many are filled across all of them. A slot
  is held from the moment its message is sent until the attempt ends, counted in the database.
- Order: start-time fair queuing. Each job gets a tag when it is submitted: its user's last tag,
  or the tag of the last job dispatched if that is later, plus a step inversely proportional
  to the user's weight (their `max_inflight`). The lowest tag goes first, so a user who queues
  a thousand jobs takes turns with the one who queues a single job, and a user with weight 3
  gets three turns to another's one.
- Per user: at most `max_inflight` slots, and never every slot when the cap is set
  (GENERATOR_MAX_INFLIGHT − 1), so one user's burst always leaves room for somebody else.

Every dispatch decision runs under one advisory lock, so two processes can never fill the
same free slot; the tokens it hands out are checked when the attempt starts. A request or an
attempt that frees or needs a slot only asks for a round (`dispatch_soon`): each process's
dispatcher thread runs it, and one round serves every ask that came in while the last one ran,
so neither the client's answer nor the next attempt waits for the lock. A thread whose
attempt freed a slot may wait for that round instead (`Dispatcher.take`): the round hands it a
job's ticket directly and sends messages only for the rest.
"""
from __future__ import annotations

import atexit
import functools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

from flask import Flask, current_app
from sqlalchemy import (
    BigInteger,
    Integer,
    Select,
    Uuid,
    all_,
    and_,
    any_,
    bindparam,
    event,
    func,
    or_,
    select,
    text,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from config import Settings
from config.kinds import longest_hard_time_limit
from renderq import broker, events, storage, tracing
from renderq.db import constant, db, execute_alone
from renderq.enums import AttemptOutcome, Status
from renderq.jobs import lifecycle
from renderq.models import Job, JobAttempt, SchedulerClock, User, WorkerHost
from renderq.runtime import settings

log = logging.getLogger(__name__)

DISPATCH_LOCK = 7240002
TAG_STEP = 1_000_000

# The fair queue's conditions, each the predicate of a partial index (renderq.models.Job).
IN_FLIGHT = or_(Job.status == constant(Status.PROCESSING), Job.dispatch_token.is_not(None))
WAITING = and_(Job.status == constant(Status.PENDING), Job.dispatch_token.is_(None))
DUE_RETRY = and_(Job.status == constant(Status.RETRYING), Job.dispatch_token.is_(None), Job.next_retry_at <= func.now())


def weight(max_inflight: Optional[int]) -> int:
    return max(1, max_inflight or 1)


def next_tags(user: User, count: int) -> list[int]:
    """The fair tags of `count` jobs `user` (locked by the caller) queues now, one after the
    other (an admin's replay queues many at once); moves the user's tag on past the last. A
    submission computes its one tag the same way, in its own statement (renderq.jobs.submit)."""
    clock = db.session.execute(select(SchedulerClock.fair_tag).where(SchedulerClock.id == 1)).scalar() or 0
    step = TAG_STEP // weight(user.max_inflight)
    start = max(user.fair_tag, clock)
    tags = [start + step * (number + 1) for number in range(count)]
    if tags:
        user.fair_tag = tags[-1]
    return tags


def user_cap(max_inflight: Optional[int], generator_cap: int) -> Optional[int]:
    """The most slots one user may hold, or None for no limit of their own."""
    caps = [max_inflight] if max_inflight else []
    if generator_cap:
        caps.append(max(1, generator_cap - 1))
    return min(caps) if caps else None


@dataclass(frozen=True)
class State:
    """What a dispatch decision needs, read in one statement under the lock."""
    slots: int  # announced by the live attempts processes
    generator_cap: int  # the GENERATOR_MAX_INFLIGHT in force: the smallest any live worker or this process has
    lost: int  # attempts lost mid-call lately: their calls may still run at the generator
    in_flight: dict[int, int]  # slots held, by user
    waiting: bool  # a pending job or a due retry is waiting for a slot

    @property
    def free(self) -> int:
        capacity = self.slots
        if self.generator_cap:
            # A worker that died mid-call may leave the call running at the generator until
            # the kind's hard time limit: its slot is not given away before then.
            capacity = min(capacity, max(0, self.generator_cap - self.lost))
        return capacity - sum(self.in_flight.values())

    @property
    def full(self) -> bool:
        """No slot is free, or nothing waits for one."""
        return not (self.waiting and self.free > 0)


_LIVE = WorkerHost.expires_at > func.now()

# A round runs for every slot that comes free, so its statements are built once per process:
# building and hashing a statement cost more of the worker's CPU than PostgreSQL's answer.


@functools.cache
def _state_statement(lost_window_seconds: float) -> Select:
    lost_since = func.now() - timedelta(seconds=lost_window_seconds)
    by_user = select(Job.user_id, func.count().label("n")).where(IN_FLIGHT).group_by(Job.user_id).subquery()
    return select(
        select(func.coalesce(func.sum(WorkerHost.slots), 0)).where(_LIVE).scalar_subquery().label("slots"),
        select(func.min(WorkerHost.generator_cap).filter(WorkerHost.generator_cap > 0)).where(_LIVE)
        .scalar_subquery().label("worker_cap"),
        select(func.count()).select_from(JobAttempt).where(JobAttempt.outcome == constant(AttemptOutcome.LOST),
                                                           JobAttempt.started_at > lost_since)
        .scalar_subquery().label("lost"),
        select(func.json_object_agg(by_user.c.user_id, by_user.c.n)).scalar_subquery().label("in_flight"),
        or_(select(Job.id).where(WAITING).exists(), select(Job.id).where(DUE_RETRY).exists()).label("waiting"),
    )


def _state(config: Settings, alone: bool = False) -> State:
    """`alone`: read outside the session's transaction, in one round trip (see _hand_out_slots)."""
    query = _state_statement(longest_hard_time_limit())
    return _state_of((execute_alone(query) if alone else db.session.connection().execute(query)).one(), config)


def _state_of(row: Any, config: Settings) -> State:
    caps = [cap for cap in (row.worker_cap, config.generator_max_inflight) if cap]
    return State(int(row.slots), min(caps) if caps else 0, int(row.lost),
                 {int(user): int(count) for user, count in (row.in_flight or {}).items()}, bool(row.waiting))


def generator_cap() -> int:
    """The GENERATOR_MAX_INFLIGHT in force (0: none)."""
    return _state(settings()).generator_cap


_LOCK = text("SELECT pg_advisory_xact_lock(%d)" % DISPATCH_LOCK)


def _lock() -> None:
    db.session.connection().execute(_LOCK)


FIRST_READ = 16  # the candidates of each kind a round that claims for no thread reads with the state


def _first(condition: Any) -> Select:
    return (select(Job.id, Job.user_id, Job.fair_tag, User.max_inflight).join(User, User.id == Job.user_id)
            .where(condition, Job.user_id != all_(bindparam("skip_users", type_=ARRAY(Integer))))
            .order_by(Job.fair_tag, Job.id).limit(bindparam("limit", type_=Integer)))


_BOTH = union_all(_first(DUE_RETRY), _first(WAITING)).subquery()
_CANDIDATES = select(_BOTH).order_by(_BOTH.c.fair_tag, _BOTH.c.id)


def _candidates(limit: int, skip_users: set[int]) -> list[Any]:
    """The first `limit` due retries and the first `limit` waiting jobs, by tag, in one statement."""
    return list(db.session.connection().execute(_CANDIDATES, {"limit": limit, "skip_users": list(skip_users)}))


# The tickets, and the clock moved on to the last tag dispatched, in one statement.
_SENT = (update(Job).where(Job.id == any_(bindparam("job_ids", type_=ARRAY(Uuid))), or_(WAITING, DUE_RETRY))
         .values(dispatch_token=func.gen_random_uuid(), dispatched_at=func.now())
         .returning(Job.id, Job.dispatch_token, Job.kind, Job.trace_parent).cte("sent"))
_CLOCK = (update(SchedulerClock).where(SchedulerClock.id == 1)
          .values(fair_tag=func.greatest(SchedulerClock.fair_tag, bindparam("last_tag", type_=BigInteger)))
          .cte("clock"))
_SEND = select(_SENT.c.id, _SENT.c.dispatch_token, _SENT.c.kind, _SENT.c.trace_parent).add_cte(_CLOCK)


@functools.cache
def _state_and_first_statement(lost_window_seconds: float) -> Select:
    """The state and the first candidates (_CANDIDATES with no user skipped), in one statement:
    a row per candidate, each with the state's columns (a single row of them, its candidate
    columns null, if nothing waits)."""
    state = _state_statement(lost_window_seconds).subquery("state")
    first = _CANDIDATES.subquery("first")
    return select(state, first).select_from(state.outerjoin(first, true())).order_by(first.c.fair_tag, first.c.id)


def _state_and_first(config: Settings, limit: int) -> tuple[State, list[Any]]:
    """The state, and the first candidates up to `limit` of each kind (see _candidates)."""
    rows = db.session.connection().execute(_state_and_first_statement(longest_hard_time_limit()),
                                           {"limit": limit, "skip_users": []}).all()
    return _state_of(rows[0], config), [row for row in rows if row.id is not None]


def _pick(free: int, in_flight: dict[int, int], generator_cap: int, first: tuple[list[Any], int]) -> list[Any]:
    """Up to `free` waiting jobs (pending, or retries that are due), lowest tag first, within
    each user's cap. `first`: candidates read already, and the limit they were read with; they
    stand for the first read if that limit reaches as far."""
    picked: list[Any] = []
    capped: set[int] = set()
    rows, limit = first
    for number in range(4):  # each read skips the users the last one filled up
        want = free - len(picked)
        if number or (limit < want * 2 and len(rows) == limit):  # (fewer than asked for: that was all)
            limit = want * 2
            rows = _candidates(limit, capped)
        taken = {row.id for row in picked}
        for row in rows:
            if row.id in taken:
                continue
            cap = user_cap(row.max_inflight, generator_cap)
            if cap is not None and in_flight.get(row.user_id, 0) >= cap:
                capped.add(row.user_id)
                continue
            picked.append(row)
            in_flight[row.user_id] = in_flight.get(row.user_id, 0) + 1
            if len(picked) == free:
                return picked
        if len(rows) < limit:  # nothing more is waiting
            return picked
    return picked


def dispatch() -> int:
    """Send attempt messages to as many waiting jobs as there are free slots, fairest first;
    returns how many were sent. Runs whenever a slot may have come free or a job may have
    become due: after a submission, after an attempt (both through the dispatcher thread), when a
    retry's countdown ends, when a worker starts, and by the reconciler. It looks before it takes
    the lock: the reconciler's round every QUEUE_CHECK_INTERVAL costs the lock nothing while every
    slot is taken or nothing waits."""
    sent = _hand_out_slots(look_first=True).tickets
    _publish(sent)
    return len(sent)


@dataclass(frozen=True)
class Round:
    """A dispatch decision, committed."""
    read_at: float  # when it read the state it went by (time.monotonic; the snapshot is later)
    tickets: list[Any]  # (job id, ticket, kind, trace parent) of the jobs that got a slot by message
    full: bool  # no slot was free, or nothing waited
    claims: list[HandedClaim] = field(default_factory=list)  # the jobs claimed for this process's takers


@dataclass(frozen=True)
class HandedClaim:
    """An attempt a round claimed for one of this process's threads: `row` is the claim's
    (lifecycle.claim_from), `taken_at` when the round asked for it (time.monotonic). Read as a
    ticket is: id, kind, trace_parent."""
    row: Any
    taken_at: float

    @property
    def id(self) -> uuid.UUID:
        return self.row.id

    @property
    def kind(self) -> str:
        return self.row.kind

    @property
    def trace_parent(self) -> Optional[str]:
        return self.row.trace_parent


@functools.cache
def _picked_claims(lease_seconds: float, with_photo: bool) -> Any:
    return lifecycle.picked_claim_statement(lease_seconds, with_photo).add_cte(_CLOCK)


def _hand_out_slots(look_first: bool = False, claim_for: int = 0, worker_host: str = "") -> Round:
    """`look_first`: read the state without the lock first, and stop there if no slot is free
    or nothing waits. While every slot is taken (a backlog) that is one round trip instead of
    four, and the lock stays free for the rounds that have slots to hand out. It is sound
    because a slot freed or a job queued after the look asks for a round of its own.

    `claim_for`: threads of this process (on `worker_host`) waiting for their next job. The
    fairest jobs picked go to them claimed, by this round's transaction: one UPDATE of each job
    row instead of two (a ticket, then the claim), and no statement of their own to start."""
    config = settings()
    read_at = time.monotonic()
    if look_first and _state(config, alone=True).full:
        return Round(read_at, [], full=True)
    _lock()
    if not look_first:
        read_at = time.monotonic()
    # The candidates a round usually needs are read with the state: a worker's round mostly
    # fills the slots of the threads waiting for it; a web process's round finds the few jobs
    # submitted since its last.
    first_limit = 2 * claim_for if claim_for else FIRST_READ
    state, first = _state_and_first(config, first_limit)
    rows = [] if state.full else _pick(state.free, dict(state.in_flight), state.generator_cap, (first, first_limit))
    if not rows:
        # Not a rollback, though the round only read: psycopg forgets every statement it has
        # prepared on the connection at a ROLLBACK, and PostgreSQL then plans them all again.
        db.session.commit()
        return Round(read_at, [], state.full)
    connection, last_tag = db.session.connection(), max(row.fair_tag for row in rows)
    claimed, sent = rows[:claim_for], rows[claim_for:]
    claims, tickets = [], []
    if claimed:
        taken_at = time.monotonic()
        statement = _picked_claims(config.job_lease_seconds, storage.storage().transactional)
        claims = [HandedClaim(row, taken_at) for row in connection.execute(statement, {
            "picked_ids": [row.id for row in claimed], "host": worker_host, "last_tag": last_tag})]
    if sent:
        tickets = connection.execute(_SEND, {"job_ids": [row.id for row in sent], "last_tag": last_tag}).all()
    db.session.commit()
    return Round(read_at, tickets, full=False, claims=claims)


@dataclass(eq=False)
class _Taker:
    """A thread of this process whose attempt just freed its slot, waiting for its next job."""
    asked_at: float
    worker_host: str
    promised: bool = False  # a round that may claim a job for it has begun: it waits for that round's answer
    handed: Optional[Any] = None  # a HandedClaim, or a ticket
    answered: threading.Event = field(default_factory=threading.Event)


class Dispatcher:
    """This process's dispatch thread. `ask` returns at once; the thread runs one round for
    all the asks made before it starts. A round that fails is left to the reconciler, which
    dispatches every QUEUE_CHECK_INTERVAL anyway.

    An ask says when the commit behind it (a slot freed, a job queued) was made. A round that
    read the state after that commit has handed out what it freed, so such an ask needs no
    round of its own: under load slots come free faster than rounds run, and most asks would
    otherwise start a round that finds nothing left to hand out.

    A round claims the fairest jobs it picks for this process's threads waiting in `take`, and
    sends messages through the broker only for the rest: a thread that has just freed its slot
    runs the next job at once, with no publish, no broker round trip, no wait for the consumer
    and no claim of its own."""

    def __init__(self, app: Flask):
        self.app, self.pid = app, os.getpid()
        self.committed_at = -1.0  # the latest commit asked about (time.monotonic): none yet
        self.covered_until = 0.0  # the latest round read the state every commit before this left
        self.takers: list[_Taker] = []
        self.wanted = threading.Condition()
        self.idle = threading.Event()  # set while no round runs or is asked for
        self.idle.set()
        self.thread = threading.Thread(target=self._run, name="renderq-dispatcher", daemon=True)
        self.thread.start()

    def ask(self, committed_at: Optional[float] = None) -> None:
        with self.wanted:
            self.committed_at = max(self.committed_at, time.monotonic() if committed_at is None else committed_at)
            if self.committed_at >= self.covered_until:
                self.idle.clear()
                self.wanted.notify()

    def take(self, worker_host: str, timeout: float = 30) -> Optional[Any]:
        """For a thread of `worker_host` whose attempt's outcome has committed: its next job from
        the first round that read the state after that commit, as a HandedClaim (the attempt
        started: run it) or a ticket (job id, ticket, kind, trace parent: claim it); None if that
        round had none left for it (nothing waits, the slots are taken) or failed."""
        taker = _Taker(time.monotonic(), worker_host)
        with self.wanted:
            self.takers.append(taker)
        self.ask(taker.asked_at)
        if not taker.answered.wait(timeout):
            with self.wanted:  # a round answers under this lock: either it has, or it never will
                if not taker.promised:
                    if taker in self.takers:
                        self.takers.remove(taker)
                    return taker.handed
            taker.answered.wait()  # a round may have claimed a job for it: nobody else would run that
        return taker.handed

    def _promise(self) -> tuple[int, str]:
        """The threads waiting now, promised an answer by the round that begins: how many, and their host."""
        with self.wanted:
            for taker in self.takers:
                taker.promised = True
            return len(self.takers), self.takers[0].worker_host if self.takers else ""

    def _hand_to_takers(self, done: Optional[Round]) -> list[Any]:
        """Give `done`'s claims, then its tickets, to the waiting threads, oldest first (the
        promised ones are the oldest, and a round claims no more jobs than it promised threads);
        answer None to those whose commit it covered and had none left for (all of them if the
        round failed). Returns the tickets left over, to send through the broker."""
        handed = [*done.claims, *done.tickets] if done else []
        with self.wanted:
            waiting = []
            for taker in self.takers:
                if handed:
                    taker.handed = handed.pop(0)
                elif done is not None and taker.asked_at > done.read_at:
                    taker.promised = False
                    waiting.append(taker)  # freed its slot after this round read: the next round is its
                    continue
                taker.answered.set()
            self.takers = waiting
        return handed

    def _run(self) -> None:
        look_first = False
        while True:
            with self.wanted:
                while self.committed_at < self.covered_until:
                    self.idle.set()
                    self.wanted.wait()
            begun = time.monotonic()
            done = self._round(look_first)
            look_first = done is not None and done.full  # slots taken: the next round looks before locking
            with self.wanted:  # a round that failed is not run again for the asks it was for
                self.covered_until = max(self.covered_until, done.read_at if done else begun)

    def _round(self, look_first: bool) -> Optional[Round]:
        with self.app.app_context():
            done = None
            try:
                claim_for, worker_host = self._promise()
                with tracing.untraced():  # the decision is nobody's trace; each message joins its job's
                    done = _hand_out_slots(look_first, claim_for, worker_host)
            except Exception:
                db.session.rollback()
                log.warning("📋 [QUEUE] could not dispatch now; the reconciler will", exc_info=True)
            finally:
                left = self._hand_to_takers(done)  # every promised thread is answered, whatever happened
            _publish(left)
            return done


_dispatchers_lock = threading.Lock()
_dispatchers: list[Dispatcher] = []  # a forked child inherits its parent's, which it tells by their pid


def dispatcher(app: Optional[Flask] = None) -> Dispatcher:
    """The dispatcher of this process for `app` (default: the current one); a forked child
    starts its own, since threads do not survive a fork."""
    app = app or current_app._get_current_object()
    with _dispatchers_lock:
        current = app.extensions.get("renderq.dispatcher")
        if current is None or current.pid != os.getpid():
            if not any(other.pid == os.getpid() for other in _dispatchers):
                atexit.register(finish_dispatching)
            current = app.extensions["renderq.dispatcher"] = Dispatcher(app)
            _dispatchers.append(current)
        return current


def finish_dispatching(timeout: float = 5) -> None:
    """Let the rounds this process has asked for end before it exits: a round cut short would
    leave its jobs to the reconciler, seconds later."""
    deadline = time.monotonic() + timeout
    for each in list(_dispatchers):
        if each.pid == os.getpid():
            each.idle.wait(max(0.0, deadline - time.monotonic()))


def dispatch_soon() -> None:
    """Ask this process's dispatcher for a round, right after the commit that queued a job."""
    dispatcher().ask()


def dispatch_on_next_commit() -> None:
    """Ask for a round the moment the session next commits: an attempt's outcome frees its
    slot, and the next job need not wait while its status event and webhook go out."""
    event.listen(db.session(), "after_commit", lambda session: dispatch_soon(), once=True)


def dispatch_background() -> int:
    """The background tier: claim up to MAX_CONCURRENT_BACKGROUND_TASKS background tries at once
    (status processing, retry_count + 1, in one statement) within the free slots, and send them.
    It runs every BACKGROUND_PROCESSING_INTERVAL: while no job waits for a background try, it
    looks (one statement on the background queue's index) and leaves the dispatch lock alone."""
    config = settings()
    waiting = select(Job.id).where(Job.status == Status.PENDING_BACKGROUND_RETRY).exists()
    if not execute_alone(select(waiting)).scalar():
        return 0
    _lock()
    running = db.session.execute(select(func.count()).select_from(Job).where(
        Job.status == Status.PROCESSING, Job.retry_count > 0)).scalar_one()
    room = min(config.max_concurrent_background_tasks - running, _state(config).free)
    if room <= 0:
        db.session.rollback()
        return 0
    claimed = lifecycle.claim_background_batch(room, config)
    db.session.commit()
    events.record(claimed)
    for row in claimed:
        log.info("🔁 [BACKGROUND] job %s claimed for a background try", row.id, extra={"job_id": str(row.id)})
    _publish([(row.id, row.dispatch_token, row.kind, row.trace_parent) for row in claimed])
    return len(claimed)


def retry_due(job_id: uuid.UUID) -> None:
    """The ladder's countdown for a job ran out: dispatch, or, if the database's clock says the
    retry is not due yet (the worker's clock runs ahead), set the countdown again for the rest."""
    row = db.session.execute(select(Job.kind, func.extract("epoch", Job.next_retry_at - func.now()).label("left"))
                             .where(Job.id == job_id, Job.status == Status.RETRYING)).first()
    db.session.rollback()
    if row is not None and row.left > 0:
        broker.publish_timer(job_id, row.kind, float(row.left))
        return
    dispatch()


def recover_lost_dispatches(grace: timedelta) -> int:
    """Attempt messages that started nothing within `grace` were lost (a broker that lost its
    data, a deleted queue, a publish that failed, a worker that died holding them): waiting jobs
    go back to the queue; background tries, already counted, get a new message."""
    stale = and_(Job.dispatch_token.is_not(None), Job.dispatched_at < func.now() - grace)
    requeued = db.session.execute(
        update(Job).where(stale, Job.status.in_((Status.PENDING, Status.RETRYING)))
        .values(dispatch_token=None, dispatched_at=None).returning(Job.id)
        .execution_options(synchronize_session=False)).scalars().all()
    resent = db.session.execute(
        update(Job).where(stale, Job.status == Status.PROCESSING, Job.lease_token.is_(None))
        .values(dispatch_token=func.gen_random_uuid(), dispatched_at=func.now())
        .returning(Job.id, Job.dispatch_token, Job.kind, Job.trace_parent)
        .execution_options(synchronize_session=False)).all()
    db.session.commit()
    for job_id in requeued:
        log.info("📋 [QUEUE] job %s: its attempt message was lost; queued again", job_id,
                 extra={"job_id": str(job_id)})
    _publish(resent)
    return len(requeued) + len(resent)


def _publish(sent: list[Any]) -> None:
    """After the commit, each in its job's trace, together in one batch; if the broker refuses
    the batch, one by one (with kombu's retries on a connection that went away). A message that
    cannot be sent is left to recover_lost_dispatches, and one sent twice steps aside the second
    time (its ticket is spent)."""
    if not sent:
        return
    try:
        with broker.together():
            for job_id, token, kind, trace_parent in sent:
                broker.publish_attempt(job_id, token, kind, trace_parent)
        for job_id, *_ in sent:
            _log_sent(job_id)
        return
    except Exception:
        log.warning("📋 [QUEUE] the broker refused a batch of %d attempt messages; sending them one by one",
                    len(sent), exc_info=True)
    for job_id, token, kind, trace_parent in sent:
        try:
            broker.publish_attempt(job_id, token, kind, trace_parent)
        except Exception:
            log.warning("📋 [QUEUE] job %s: the broker refused its attempt message; it will be sent again",
                        job_id, exc_info=True, extra={"job_id": str(job_id)})
        else:
            _log_sent(job_id)


def _log_sent(job_id: uuid.UUID) -> None:
    """Once the broker has the message: a batch's messages are only buffered until it ends."""
    log.info("📋 [QUEUE] job %s: attempt message sent", job_id, extra={"job_id": str(job_id)})


def jobs_ahead(job: Job) -> Select:
    """The count of waiting jobs before `job` in the fair order: an index-only count on the
    fair-queue index, so finished jobs, however many, cost nothing."""
    return select(func.count()).select_from(Job).where(
        WAITING, tuple_(Job.fair_tag, Job.id) < tuple_(job.fair_tag, job.id))


def queue_position(job: Job) -> Optional[int]:
    """Waiting jobs ahead of `job` while it is pending; 0 once its attempt message is out."""
    return queue_positions([job])[job.id]


def queue_positions(jobs: list[Job]) -> dict[uuid.UUID, Optional[int]]:
    """Each job's queue_position, the waiting ones counted in one pass over the fair queue up
    to the last of them (a page of jobs costs what its furthest job costs alone)."""
    positions: dict[uuid.UUID, Optional[int]] = {
        job.id: None if job.status != Status.PENDING else 0 for job in jobs}
    waiting = sorted((job for job in jobs if job.status == Status.PENDING and job.dispatch_token is None),
                     key=lambda job: (job.fair_tag, job.id))
    if waiting:
        last = waiting[-1]
        counts = db.session.execute(select(*[
            func.count().filter(tuple_(Job.fair_tag, Job.id) < tuple_(job.fair_tag, job.id)) for job in waiting])
            .where(WAITING, tuple_(Job.fair_tag, Job.id) < tuple_(last.fair_tag, last.id))).one()
        positions.update(zip((job.id for job in waiting), counts))
    return positions
