"""One attempt of one job: claim the row, call the generator, record the outcome.

The Celery task renderq.jobs.attempt (tasks/jobs.py) only calls `run_attempt`; a RetryLater
it raises is the fast ladder going on, which the task hands to Celery's retry.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Optional

from config import Settings
from config.kinds import get_kind
from renderq import broker, storage, throttle
from renderq.db import db
from renderq.enums import AttemptOutcome, Status, Tier
from renderq.generator import client
from renderq.generator.errors import GeneratorFailure, PermanentFailure, SafetyBlock, classify_exception
from renderq.jobs import history, lifecycle, policy
from renderq.jobs.lease import LeaseKeeper
from renderq.jobs.lifecycle import Claim
from renderq.logs import job_logging
from renderq.models import Photo, User
from renderq.runtime import settings

log = logging.getLogger(__name__)


def run_attempt(job_id: uuid.UUID, ticket: Optional[uuid.UUID] = None) -> None:
    """Run one attempt if this message may: a plain message claims a pending or due retrying
    job; a background ticket starts the try the background processor claimed. Raises RetryLater
    when the fast ladder goes on, and Throttled when the generator has no free slot."""
    config = settings()
    with job_logging(job_id):
        owner = lifecycle.owner_and_kind(job_id)
        if owner is None:
            log.info("📋 [QUEUE] job %s no longer exists; this message steps aside", job_id)
            return
        with throttle.generator_slot(config, *owner):
            claim = (lifecycle.claim(job_id, config.job_lease_seconds) if ticket is None
                     else lifecycle.start_claimed(job_id, ticket, config.job_lease_seconds))
            if claim is None:
                log.info("📋 [QUEUE] job %s is not due or is claimed elsewhere; this message steps aside", job_id)
                return
            _attempt(claim, config)


def _attempt(claim: Claim, config: Settings) -> None:
    tier = policy.tier(claim.retry_count)
    log.info("🔧 [JOB_PROCESSOR] attempt %d of job %s (%s, %s)", claim.attempts, claim.job_id, claim.kind,
             "fast ladder" if tier is Tier.FAST else "background try %d" % claim.retry_count)
    started_at, clock = history.now(), time.monotonic()
    with LeaseKeeper(claim, config.job_lease_seconds):
        try:
            image = _call_generator(claim, config)
        except Exception as error:
            failure = classify_exception(error)
            if failure is None:
                raise  # a bug, not the generator: the lease expires and the reconciler recovers the job
            history.record_attempt(claim, failure.outcome, failure.code, started_at, time.monotonic() - clock)
            _record_failure(claim, failure, config)
            return
    history.record_attempt(claim, AttemptOutcome.SUCCEEDED, None, started_at, time.monotonic() - clock)
    _record_success(claim, image, config)


def _call_generator(claim: Claim, config: Settings) -> bytes:
    safety_agreed = db.session.get(User, claim.user_id).safety_agreed_at is not None
    image = None
    if get_kind(claim.kind).needs_photo and claim.photo_id is not None:
        path = db.session.get(Photo, claim.photo_id).path
        image = (os.path.basename(path), storage.read(config.media_root, path))
    db.session.rollback()  # no transaction stays open across the slow call
    return client.render(config.generator_url, str(claim.job_id), claim.kind, claim.params, safety_agreed, image)


def _record_success(claim: Claim, image: bytes, config: Settings) -> None:
    relative = storage.save(config.media_root, "results/%s.png" % claim.job_id, image)
    finished = lifecycle.succeed(claim, relative, config)
    if finished:
        log.info("✅ [QUEUED_%s] job %s succeeded after %d attempt(s)",
                 claim.kind.upper().replace(".", "_"), claim.job_id, claim.attempts)
        broker.announce(finished)
    else:
        storage.delete(config.media_root, relative)
        log.info("📋 [QUEUE] job %s left processing while its attempt ran; result discarded", claim.job_id)


def _record_failure(claim: Claim, failure: GeneratorFailure, config: Settings) -> None:
    if isinstance(failure, SafetyBlock):
        finished = lifecycle.block(claim, failure.code, config)
        if finished:
            log.info("❌ [ERROR_HANDLER] job %s blocked by the generator: %s", claim.job_id, failure.code)
            broker.announce(finished)
    elif isinstance(failure, PermanentFailure):
        finished = lifecycle.fail(claim, failure.code, failure.detail, config)
        if finished:
            log.info("❌ [ERROR_HANDLER] job %s failed permanently: %s", claim.job_id, failure.detail)
            broker.announce(finished)
    else:
        record_transient(claim, failure.code, failure.detail, getattr(failure, "retry_after", 0), config)


def record_transient(claim: Claim, code: str, detail: str, retry_after: float, config: Settings) -> bool:
    """Move the job on after a transient failure; raises RetryLater for the next fast-ladder step.
    False if the job had already changed hands."""
    step, finished = lifecycle.record_transient_failure(claim, code, detail, config, retry_after)
    if finished:
        broker.announce(finished)
    if step is None:
        log.info("📋 [QUEUE] job %s changed hands while its attempt ran; outcome dropped", claim.job_id)
        return False
    log.info("❌ [ERROR_HANDLER] job %s attempt %d failed transiently (%s); now %s%s", claim.job_id,
             claim.attempts, detail, step.status, "" if step.retry_in is None else " in %.3gs" % step.retry_in)
    if step.status == Status.RETRYING:
        raise policy.RetryLater(step.retry_in)
    if step.status == Status.FAILED:
        log.info("🔁 [BACKGROUND] job %s failed after %d background tries", claim.job_id, claim.retry_count)
    return True
