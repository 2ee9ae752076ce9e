"""What beat runs: the background processor, the reconciler and the TTL cleanup."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select

from config.kinds import longest_hard_time_limit
from renderq import broker, notify, storage
from renderq.db import db
from renderq.enums import TERMINAL_STATUSES, AttemptOutcome
from renderq.jobs import history, idempotency, lease, lifecycle
from renderq.jobs.attempt import record_transient
from renderq.jobs.policy import RetryLater
from renderq.logs import job_logging
from renderq.models import IdempotencyKey, Job, Photo
from renderq.runtime import redis_client, settings

log = logging.getLogger(__name__)

PURGE_BATCH = 500


def process_background() -> int:
    """The background tier: fail what is too old, then claim up to the free background slots
    and publish their tries; returns how many were claimed."""
    config = settings()
    redis_client().incr(broker.BACKGROUND_RUNS_KEY)
    for finished in lifecycle.expire_background(config):
        with job_logging(finished.job_id):
            log.info("🔁 [BACKGROUND] job %s failed: past the age limit or out of tries", finished.job_id)
            broker.announce(finished)
    claimed = lifecycle.claim_background_batch(config, queue_wait_seconds=longest_hard_time_limit())
    for job_id, ticket, kind in claimed:
        with job_logging(job_id):
            log.info("🔁 [BACKGROUND] job %s claimed for a background try", job_id)
            broker.publish_attempt(job_id, kind, ticket=ticket)
    return len(claimed)


def reconcile() -> None:
    """Recover attempts whose worker died, and re-publish jobs whose message is lost or overdue."""
    config = settings()
    for claim in lease.expired_claims():
        with job_logging(claim.job_id):
            try:
                recovered = record_transient(claim, "WORKER_LOST", "the attempt's worker stopped renewing its lease",
                                             0, config)
            except RetryLater as retry:
                recovered = True
                broker.publish_attempt(claim.job_id, claim.kind, countdown=retry.countdown)
            if recovered:
                history.record_attempt(claim, AttemptOutcome.LOST, "WORKER_LOST", history.now(), 0)
    grace = timedelta(seconds=max(30.0, 3 * config.queue_check_interval))
    now = datetime.now(timezone.utc)
    for job_id, kind, next_retry_at in broker.unpublished(broker.broker_epoch(), grace):
        with job_logging(job_id):
            countdown = max(0.0, (next_retry_at - now).total_seconds()) if next_retry_at else None
            log.info("📋 [QUEUE] job %s has no message in the broker; re-publishing", job_id)
            broker.publish_attempt(job_id, kind, countdown=countdown)
    # A delivery in flight has pushed next_delivery_at past itself, so a short grace is enough.
    for notification_id in notify.overdue_deliveries(timedelta(seconds=2 * config.queue_check_interval)):
        broker.publish_delivery(notification_id)


def purge_expired(ttl_seconds: int) -> int:
    """Delete terminal jobs finished more than `ttl_seconds` ago, their results, and photos
    no job refers to any more; returns how many jobs went. The ledger and the notifications
    stay (they are the record of what was charged and said)."""
    media_root = settings().media_root
    cutoff = func.now() - timedelta(seconds=ttl_seconds)
    purged = 0
    while True:
        rows = db.session.execute(
            delete(Job).where(Job.id.in_(
                select(Job.id).where(Job.status.in_(TERMINAL_STATUSES), Job.completed_at < cutoff).limit(PURGE_BATCH)))
            .returning(Job.id, Job.result_path, Job.photo_id)).all()
        photo_ids = {row.photo_id for row in rows if row.photo_id}
        orphans = photo_ids - set(db.session.execute(select(Job.photo_id).where(Job.photo_id.in_(photo_ids))).scalars())
        photos = db.session.execute(delete(Photo).where(Photo.id.in_(orphans)).returning(Photo.path)).scalars().all()
        db.session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - idempotency.KEY_LIFETIME))
        db.session.commit()
        for relative in [row.result_path for row in rows] + list(photos):
            storage.delete(media_root, relative)  # after the commit: a rolled-back purge keeps its files
        purged += len(rows)
        if len(rows) < PURGE_BATCH:
            return purged


def cleanup() -> int:
    purged = purge_expired(settings().completed_job_ttl)
    if purged:
        log.info("📋 [QUEUE] purged %d finished job(s) older than COMPLETED_JOB_TTL", purged)
    return purged
