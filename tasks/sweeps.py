"""Periodic work scheduled by beat: the background processor and the reconciler."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

from celery import shared_task

from config.kinds import longest_hard_time_limit
from tasks import dispatch
from tasks.attempts import record_transient, settings
from tasks.errors import RetryLater
from webapp import history, lifecycle, notifications
from webapp.logs import job_logging

log = logging.getLogger(__name__)


@shared_task(name="renderq.background.process", ignore_result=True)
def process_background() -> int:
    """Tier 2: fail what is too old, then claim up to the free background slots and run them."""
    config = settings()
    dispatch.redis_client().incr(dispatch.BACKGROUND_RUNS_KEY)
    for finished in lifecycle.fail_too_old(config):
        with job_logging(finished.job_id):
            log.info("🔁 [BACKGROUND] job %s failed: past the age limit or out of tries", finished.job_id)
            dispatch.announce(finished)
    claimed = lifecycle.claim_background_batch(config, queue_wait_seconds=longest_hard_time_limit())
    for job_id, ticket, kind in claimed:
        with job_logging(job_id):
            log.info("🔁 [BACKGROUND] job %s claimed for a background try", job_id)
            dispatch.publish_attempt(job_id, kind, ticket=ticket)
    return len(claimed)


@shared_task(name="renderq.queue.reconcile", ignore_result=True)
def reconcile() -> None:
    """Recover attempts whose worker died, and re-publish jobs whose message is lost or overdue."""
    config = settings()
    for claim in lifecycle.expired_claims():
        with job_logging(claim.job_id):
            try:
                recovered = record_transient(claim, "WORKER_LOST", "the attempt's worker stopped renewing its lease",
                                             0, config)
            except RetryLater as retry:
                recovered = True
                dispatch.publish_attempt(claim.job_id, claim.kind, countdown=retry.countdown)
            if recovered:
                history.record_attempt(claim, "lost", "WORKER_LOST", history.now(), 0)
    grace = timedelta(seconds=max(30.0, 3 * config.queue_check_interval))
    now = datetime.now(timezone.utc)
    for job_id, kind, next_retry_at in lifecycle.unpublished(dispatch.broker_epoch(), grace):
        with job_logging(job_id):
            countdown = max(0.0, (next_retry_at - now).total_seconds()) if next_retry_at else None
            log.info("📋 [QUEUE] job %s has no message in the broker; re-publishing", job_id)
            dispatch.publish_attempt(job_id, kind, countdown=countdown)
    # A delivery in flight has pushed next_delivery_at past itself, so a short grace is enough.
    for notification_id in notifications.overdue_deliveries(timedelta(seconds=2 * config.queue_check_interval)):
        dispatch.publish_delivery(notification_id)
