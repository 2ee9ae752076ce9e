"""One attempt of one job: claim the row, call the generator, record the outcome.

Plain service code: the Celery tasks in tasks.jobs only call `run_attempt` and `recover`.
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
import uuid
from typing import Callable, Optional

from flask import current_app

from config import Settings
from config.kinds import get_kind
from tasks import dispatch, throttle
from tasks.errors import GeneratorFailure, PermanentFailure, RetryLater, SafetyBlock, TransientFailure, classify_exception
from webapp import history, lifecycle, storage
from webapp.extensions import db
from webapp.logs import job_logging
from webapp.models import FAILED, RETRYING, Photo, User

log = logging.getLogger(__name__)


def settings() -> Settings:
    return current_app.extensions["renderq.settings"]


class LeaseKeeper:
    """Renews the claim's lease while the attempt runs, so the reconciler can tell a dead
    worker (lease expired) from a slow generator (lease renewed)."""

    def __init__(self, claim: lifecycle.Claim, lease_seconds: float):
        self.claim = claim
        self.lease_seconds = lease_seconds
        self.stopped = threading.Event()
        self.app = current_app._get_current_object()
        self.thread = threading.Thread(target=self._renew, name="lease-%s" % claim.job_id, daemon=True)

    def _renew(self) -> None:
        with self.app.app_context(), job_logging(self.claim.job_id):
            while not self.stopped.wait(self.lease_seconds / 3):
                try:
                    if not lifecycle.renew_lease(self.claim.job_id, self.claim.token, self.lease_seconds):
                        return  # the claim was taken away (recovered or canceled): nothing to keep
                except Exception:  # a database hiccup: the next beat tries again before the lease ends
                    log.warning("🔧 [JOB_PROCESSOR] could not renew the lease", exc_info=True)

    def __enter__(self) -> "LeaseKeeper":
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.thread.join()


def _handler(kind: str) -> Callable[..., bytes]:
    module_name, function_name = get_kind(kind).handler.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def _call_generator(claim: lifecycle.Claim, config: Settings) -> bytes:
    safety_agreed = db.session.get(User, claim.user_id).safety_agreed_at is not None
    image_path: Optional[str] = None
    if claim.photo_id is not None:
        photo = db.session.get(Photo, claim.photo_id)
        image_path = storage.absolute_path(config.media_root, photo.path)
    db.session.rollback()  # no transaction stays open across the slow call
    return _handler(claim.kind)(config, str(claim.job_id), claim.params, safety_agreed, image_path)


def _claim(job_id: uuid.UUID, ticket: Optional[uuid.UUID], config: Settings) -> Optional[lifecycle.Claim]:
    if ticket is None:
        return lifecycle.claim(job_id, config.job_lease_seconds)
    return lifecycle.start_claimed(job_id, ticket, config.job_lease_seconds)


def run_attempt(job_id: uuid.UUID, ticket: Optional[uuid.UUID] = None) -> None:
    """Run one attempt if this message may; raises RetryLater when the fast ladder goes on
    and Throttled when the generator has no free slot."""
    config = settings()
    with job_logging(job_id):
        owner = lifecycle.owner_and_kind(job_id)
        if owner is None:
            log.info("📋 [QUEUE] job %s no longer exists; this message steps aside", job_id)
            return
        with throttle.generator_slot(config, *owner):
            _attempt(job_id, ticket, config)


def _attempt(job_id: uuid.UUID, ticket: Optional[uuid.UUID], config: Settings) -> None:
    claim = _claim(job_id, ticket, config)
    if claim is None:
        log.info("📋 [QUEUE] job %s is not due or is claimed elsewhere; this message steps aside", job_id)
        return
    tier = "background try %d" % claim.retry_count if claim.retry_count else "fast ladder"
    log.info("🔧 [JOB_PROCESSOR] attempt %d of job %s (%s, %s)", claim.attempts, job_id, claim.kind, tier)
    started_at, clock = history.now(), time.monotonic()
    with LeaseKeeper(claim, config.job_lease_seconds):
        try:
            image = _call_generator(claim, config)
        except Exception as error:
            failure = classify_exception(error)
            if failure is None:
                raise  # a bug, not the generator: the lease expires and the reconciler recovers the job
            history.record_attempt(claim, _attempt_outcome(failure), failure.code, started_at,
                                   time.monotonic() - clock)
            _record_failure(claim, failure, config)
            return
    history.record_attempt(claim, "succeeded", None, started_at, time.monotonic() - clock)
    _record_success(claim, image, config)


def _attempt_outcome(failure: GeneratorFailure) -> str:
    if isinstance(failure, SafetyBlock):
        return "blocked"
    return "transient" if isinstance(failure, TransientFailure) else "failed"


def _record_success(claim: lifecycle.Claim, image: bytes, config: Settings) -> None:
    relative = storage.save(config.media_root, "results/%s.png" % claim.job_id, image)
    finished = lifecycle.finish_succeeded(claim, relative, config)
    if finished:
        log.info("✅ [QUEUED_%s] job %s succeeded after %d attempt(s)",
                 claim.kind.upper().replace(".", "_"), claim.job_id, claim.attempts)
        dispatch.announce(finished)
    else:
        storage.delete(config.media_root, relative)
        log.info("📋 [QUEUE] job %s left processing while its attempt ran; result discarded", claim.job_id)


def _record_failure(claim: lifecycle.Claim, failure: GeneratorFailure, config: Settings) -> None:
    if isinstance(failure, SafetyBlock):
        finished = lifecycle.finish_blocked(claim, failure.code, config)
        if finished:
            log.info("❌ [ERROR_HANDLER] job %s blocked by the generator: %s", claim.job_id, failure.code)
            dispatch.announce(finished)
        return
    if isinstance(failure, PermanentFailure):
        finished = lifecycle.fail(claim, failure.code, failure.detail, config)
        if finished:
            log.info("❌ [ERROR_HANDLER] job %s failed permanently: %s", claim.job_id, failure.detail)
            dispatch.announce(finished)
        return
    record_transient(claim, failure.code, failure.detail, getattr(failure, "retry_after", 0), config)


def record_transient(claim: lifecycle.Claim, code: str, detail: str, retry_after: float,
                     config: Settings) -> bool:
    """Move the job on after a transient failure; raises RetryLater for the next fast-ladder step.
    False if the job had already changed hands."""
    step, finished = lifecycle.record_transient_failure(claim, code, detail, config, retry_after)
    if finished:
        dispatch.announce(finished)
    if step is None:
        log.info("📋 [QUEUE] job %s changed hands while its attempt ran; outcome dropped", claim.job_id)
        return False
    log.info("❌ [ERROR_HANDLER] job %s attempt %d failed transiently (%s); now %s%s", claim.job_id,
             claim.attempts, detail, step.status, "" if step.retry_in is None else " in %.3gs" % step.retry_in)
    if step.status == RETRYING:
        raise RetryLater(step.retry_in)
    if step.status == FAILED:
        log.info("🔁 [BACKGROUND] job %s failed after %d background tries", claim.job_id, claim.retry_count)
    return True
