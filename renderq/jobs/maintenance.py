"""What beat runs: the background processor, the reconciler and the TTL cleanup."""
from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import delete, func, select

from renderq import broker, counters, notify, storage
from renderq.db import db
from renderq.enums import TERMINAL_STATUSES, AttemptOutcome
from renderq.jobs import idempotency, lease, lifecycle, scheduler
from renderq.jobs.attempt import record_transient
from renderq.jobs.lifecycle import AttemptRecord
from renderq.logs import job_logging
from renderq.models import IdempotencyKey, Job, Photo
from renderq.runtime import redis_client, settings

log = logging.getLogger(__name__)

PURGE_BATCH = 50  # each DELETE, its cascades included, stays within a few milliseconds: short locks
LAST_RUN_KEY = "renderq:maintenance:last-run:%s"
MAINTENANCE_TASKS = ("background", "reconcile", "cleanup")


def _ran(task: str) -> None:
    """For the alert that a maintenance task stopped running (renderq_maintenance_last_run...)."""
    try:
        redis_client().set(LAST_RUN_KEY % task, time.time())
    except Exception:
        log.warning("could not note that %s ran", task, exc_info=True)


def process_background() -> int:
    """The background tier: fail what is too old or out of tries, then send up to the free
    background slots their next try; returns how many were sent."""
    config = settings()
    _ran("background")
    broker.count_background_run()
    expired = 0
    for finished in lifecycle.expire_background(config):
        with job_logging(finished.job_id):
            log.info("🔁 [BACKGROUND] job %s failed: past the age limit or out of tries", finished.job_id)
            broker.announce(finished)
        expired += 1
    sent = scheduler.dispatch_background()
    _summary("🔁 [BACKGROUND] sweep", ("failed", expired), ("sent", sent))
    return sent


def reconcile() -> None:
    """Recover attempts whose worker died, send again what the broker lost, and fill free slots."""
    config = settings()
    _ran("reconcile")
    recovered = 0
    for claim in lease.expired_claims():
        with job_logging(claim.job_id):
            lost = AttemptRecord(AttemptOutcome.LOST, "WORKER_LOST", 0)
            step = record_transient(claim, "WORKER_LOST", "the attempt's worker stopped renewing its lease", lost,
                                    config, guard=lease.still_expired(claim))
            if step is not None and step.retry_in is not None:
                broker.publish_timer(claim.job_id, claim.kind, step.retry_in)
            recovered += step is not None
    # A message that has started nothing this long after it was sent is lost: in a healthy
    # system an attempt message only goes out for a free slot and starts within moments.
    resent = scheduler.recover_lost_dispatches(timedelta(seconds=config.queue_check_interval + 2))
    dispatched = scheduler.dispatch()
    counters.fold()
    # A delivery in flight has pushed next_delivery_at past itself, so a short grace is enough.
    webhooks = 0
    for notification_id in notify.overdue_deliveries(timedelta(seconds=2 * config.queue_check_interval)):
        broker.publish_delivery(notification_id)
        webhooks += 1
    _summary("📋 [QUEUE] reconcile", ("recovered", recovered), ("re-sent", resent), ("dispatched", dispatched),
             ("webhooks re-sent", webhooks))


def _summary(run: str, *counts: tuple[str, int]) -> None:
    """One line for a run that did something ("reconcile: recovered 2, dispatched 5"); the idle
    runs, every few seconds, only at DEBUG."""
    done = ", ".join("%s %d" % (what, count) for what, count in counts if count)
    log.log(logging.INFO if done else logging.DEBUG, "%s: %s", run, done or "nothing to do")


def purge_expired(ttl_seconds: int) -> int:
    """Delete terminal jobs finished more than `ttl_seconds` ago, their results, and photos
    no job refers to any more; returns how many jobs went. The ledger and the notifications
    stay (they are the record of what was charged and said)."""
    store = storage.storage()
    cutoff = func.now() - timedelta(seconds=ttl_seconds)
    db.session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - idempotency.KEY_LIFETIME))
    db.session.commit()
    purged = 0
    while True:
        # Materialized, so the batch is picked once through the completed_at index and joined
        # by primary key: as `id IN (SELECT ... LIMIT n)` the planner read all of jobs.
        expired = (select(Job.id).where(Job.status.in_(TERMINAL_STATUSES), Job.completed_at < cutoff)
                   .limit(PURGE_BATCH).cte("expired").prefix_with("MATERIALIZED"))
        rows = db.session.execute(
            delete(Job).where(Job.id == expired.c.id).returning(Job.id, Job.result_path, Job.photo_id)).all()
        photo_ids = {row.photo_id for row in rows if row.photo_id}
        orphans = photo_ids - set(db.session.execute(select(Job.photo_id).where(Job.photo_id.in_(photo_ids))).scalars())
        photos = db.session.execute(delete(Photo).where(Photo.id.in_(orphans)).returning(Photo.path)).scalars().all()
        keys = [row.result_path for row in rows if row.result_path] + list(photos)
        if store.transactional:
            store.delete(keys)
        db.session.commit()
        if not store.transactional:
            store.delete(keys)  # after the commit: a rolled-back purge keeps its files
        purged += len(rows)
        if len(rows) < PURGE_BATCH:
            return purged


def cleanup() -> int:
    _ran("cleanup")
    purged = purge_expired(settings().completed_job_ttl)
    if purged:
        log.info("📋 [QUEUE] purged %d finished job(s) older than COMPLETED_JOB_TTL", purged)
    return purged
