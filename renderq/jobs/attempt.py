"""One attempt of one job: start it with the message's token, call the generator, record the
outcome, and hand the freed slot to the next job.

The Celery task renderq.jobs.attempt (tasks/jobs.py) only calls `run_attempt`; a RetryLater
it raises is the fast ladder going on, which the task hands to Celery's retry as its countdown.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Callable, Optional, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

from config import Settings
from config.kinds import get_kind
from renderq import broker, events, storage, tracing, workers
from renderq.db import db
from renderq.enums import AttemptOutcome, Status, Tier
from renderq.generator import client
from renderq.generator.errors import (
    GeneratorFailure,
    PermanentFailure,
    SafetyBlock,
    classify_exception,
)
from renderq.jobs import lease, lifecycle, policy, scheduler
from renderq.jobs.lifecycle import AttemptRecord, Claim
from renderq.logs import job_logging
from renderq.runtime import settings

log = logging.getLogger(__name__)
T = TypeVar("T")


# How long one task goes on running the jobs its slot is handed: the message that started it
# stays unacknowledged meanwhile, and Flower shows that task as running.
HAND_OVER_SECONDS = 300


def run_attempt(job_id: uuid.UUID, ticket: uuid.UUID, worker_host: str) -> None:
    """Run the attempt the message carrying `ticket` was sent for, if it still may. Raises
    RetryLater when the fast ladder goes on.

    In a threads worker the thread then keeps its slot: it runs the next job the process's
    dispatcher hands it (scheduler.Dispatcher.take), and the next, while jobs wait, instead of
    the slot going back through the broker. A prefork child does not: the task's hard time limit
    would cut a later job's call short."""
    keeps_slot = workers.keeps_slots()
    try:
        _run_one(job_id, ticket, worker_host, ask_on_commit=not keeps_slot)
    except policy.RetryLater:
        if keeps_slot:
            scheduler.dispatch_soon()  # the ladder's countdown goes out through Celery's retry; the slot is free
        raise
    if keeps_slot:
        _run_handed_over(worker_host)


def _run_handed_over(worker_host: str) -> None:
    until = time.monotonic() + HAND_OVER_SECONDS
    while time.monotonic() < until and workers.keeps_slots():
        handed = scheduler.dispatcher().take(worker_host)
        if handed is None:
            return
        with tracing.handed_over_attempt(handed.id, handed.trace_parent):
            try:
                if isinstance(handed, scheduler.HandedClaim):  # the round claimed it for this thread
                    events.record([handed.row])
                    _run_claimed(lifecycle.claim_from(handed.row, handed.row.lease_token, handed.taken_at),
                                 ask_on_commit=False)
                else:
                    _run_one(handed.id, handed.dispatch_token, worker_host, ask_on_commit=False)
            except policy.RetryLater as step:
                # The message Celery's retry would send for this job's own task.
                broker.publish_timer(handed.id, handed.kind, step.countdown)
    scheduler.dispatch_soon()  # stopped with its slot free


def _run_one(job_id: uuid.UUID, ticket: uuid.UUID, worker_host: str, ask_on_commit: bool) -> None:
    config = settings()
    with job_logging(job_id):
        claim = lifecycle.claim(job_id, ticket, config.job_lease_seconds, worker_host,
                                with_photo=storage.storage().transactional)
        if claim is None:
            log.info("📋 [QUEUE] job %s: this message is stale (the job moved on); it steps aside", job_id)
            return
    _run_claimed(claim, ask_on_commit)


def _run_claimed(claim: Claim, ask_on_commit: bool) -> None:
    with job_logging(claim.job_id):
        if ask_on_commit:
            scheduler.dispatch_on_next_commit()  # the outcome's commit frees this attempt's slot
        _attempt(claim, settings())


def _attempt(claim: Claim, config: Settings) -> None:
    tier = policy.tier(claim.retry_count)
    log.info("🔧 [JOB_PROCESSOR] attempt %d of job %s (%s, %s)", claim.attempts, claim.job_id, claim.kind,
             "fast ladder" if tier is Tier.FAST else "background try %d" % claim.retry_count)
    with workers.lease_keeper().holding(claim.token):
        try:
            image = _call_generator(claim, config)
        except LeaseLost:
            log.info("📋 [QUEUE] job %s was recovered while this attempt stalled before its call; it steps aside",
                     claim.job_id)
            return
        except Exception as error:
            failure = classify_exception(error)
            if failure is None:
                raise  # a bug, not the generator: the lease expires and the reconciler recovers the job
            attempt = AttemptRecord(failure.outcome, failure.code)
            _while_the_database_returns(lambda: _record_failure(claim, failure, attempt, config), config)
            return
        attempt = AttemptRecord(AttemptOutcome.SUCCEEDED, None)
        _while_the_database_returns(lambda: _record_success(claim, image, attempt, config), config)


class LeaseLost(Exception):
    """The claim was recovered before the generator call: the call would belong to no attempt."""


def _call_generator(claim: Claim, config: Settings) -> bytes:
    image = None
    if get_kind(claim.kind).needs_photo and claim.photo_key is not None:
        data = claim.photo if claim.photo is not None else storage.storage().get(claim.photo_key)
        image = (os.path.basename(claim.photo_key), data)
    db.session.rollback()  # no transaction stays open across the slow call
    if not lease.surely_held(claim, config.job_lease_seconds):
        raise LeaseLost()
    return client.render(config.generator_url, str(claim.job_id), claim.kind, claim.params, claim.safety_agreed, image)


def _record_success(claim: Claim, image: bytes, attempt: AttemptRecord, config: Settings) -> None:
    store, key = storage.storage(), storage.result_key(claim.job_id, claim.token)
    if not store.transactional:
        store.put(key, image)
    finished = lifecycle.succeed(claim, key, attempt, config, result=image if store.transactional else None)
    if finished:
        log.info("✅ [QUEUED_%s] job %s succeeded after %d attempt(s)",
                 claim.kind.upper().replace(".", "_"), claim.job_id, claim.attempts)
        broker.announce(finished)
        return
    if lifecycle.result_of(claim.job_id) == key:  # this attempt won: the commit that said so went unanswered
        log.info("📋 [QUEUE] job %s: this attempt's result was recorded before the database went away", claim.job_id)
        return
    if not store.transactional:
        store.delete([key])  # this attempt's own key: never the result of the attempt that won
    log.info("📋 [QUEUE] job %s left this attempt's hands while it ran; its result is discarded", claim.job_id)


def _record_failure(claim: Claim, failure: GeneratorFailure, attempt: AttemptRecord, config: Settings) -> None:
    if isinstance(failure, SafetyBlock):
        finished = lifecycle.block(claim, failure.code, attempt, config)
        if finished:
            log.info("❌ [ERROR_HANDLER] job %s blocked by the generator: %s", claim.job_id, failure.code)
            broker.announce(finished)
    elif isinstance(failure, PermanentFailure):
        finished = lifecycle.fail(claim, failure.code, failure.detail, attempt, config)
        if finished:
            log.info("❌ [ERROR_HANDLER] job %s failed permanently: %s", claim.job_id, failure.detail)
            broker.announce(finished)
    else:
        record_transient(claim, failure.code, failure.detail, attempt, config, getattr(failure, "retry_after", 0))


def record_transient(claim: Claim, code: str, detail: str, attempt: AttemptRecord, config: Settings,
                     retry_after: float = 0, guard: object = None) -> Optional[policy.NextStep]:
    """Move the job on after a transient failure; raises RetryLater for the next fast-ladder
    step. None if the job had already left this claim's hands."""
    step, finished = lifecycle.record_transient_failure(claim, code, detail, attempt, config, retry_after, guard)
    if finished:
        broker.announce(finished)
    if step is None:
        log.info("📋 [QUEUE] job %s left this attempt's hands while it ran; outcome dropped", claim.job_id)
        return None
    log.info("❌ [ERROR_HANDLER] job %s attempt %d failed transiently (%s); now %s%s", claim.job_id,
             claim.attempts, detail, step.status, "" if step.retry_in is None else " in %.3gs" % step.retry_in)
    if step.status == Status.FAILED:
        log.info("🔁 [BACKGROUND] job %s failed after %d background tries", claim.job_id, claim.retry_count)
    if step.status == Status.RETRYING and guard is None:
        raise policy.RetryLater(step.retry_in)
    return step


def _while_the_database_returns(record: Callable[[], T], config: Settings) -> T:
    """Record an outcome, trying again while PostgreSQL restarts, for up to half the lease: the
    generator's answer is worth keeping. Past that the reconciler recovers the job anyway."""
    deadline = time.monotonic() + config.job_lease_seconds / 2
    while True:
        try:
            return record()
        except DBAPIError as error:
            # Away: unreachable, restarting, or it ended this session (a pause inside a transaction).
            if not (isinstance(error, OperationalError) or error.connection_invalidated):
                raise
            db.session.rollback()
            if time.monotonic() > deadline:
                raise
            log.warning("🔧 [JOB_PROCESSOR] the database is away; recording the outcome again shortly")
            time.sleep(0.5)

