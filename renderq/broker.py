"""Publishing job ids to the broker, knowing which messages the broker may have lost, and
announcing finished jobs.

The broker epoch is a random id kept in Redis. Each publish records the epoch on the job;
if Redis loses its data (a restart without persistence, FLUSHALL) the key goes with it, a
new epoch begins, and the reconciler re-publishes every waiting job stamped with an old one.
"""
from __future__ import annotations

import logging
import time
import uuid
from datetime import datetime, timedelta
from typing import Optional

from sqlalchemy import and_, func, or_, select, update

from config.kinds import get_kind
from renderq.db import db
from renderq.enums import TERMINAL_STATUSES, Status
from renderq.jobs.lifecycle import Finished
from renderq.models import Job
from renderq.runtime import celery_app, redis_client

log = logging.getLogger(__name__)

EPOCH_KEY = "renderq:broker-epoch"
BACKGROUND_RUNS_KEY = "renderq:background-processor-runs"
ATTEMPT_TASK = "renderq.jobs.attempt"
DELIVER_TASK = "renderq.notifications.deliver"


def broker_epoch() -> str:
    client = redis_client()
    if client.set(EPOCH_KEY, str(uuid.uuid4()), nx=True):
        log.info("📋 [QUEUE] a new broker epoch began (first start, or Redis lost its data)")
    return client.get(EPOCH_KEY).decode()


def mark_published(job_id: uuid.UUID, epoch: str) -> None:
    db.session.execute(update(Job).where(Job.id == job_id).values(broker_epoch=epoch, published_at=func.now()))
    db.session.commit()


def publish_attempt(job_id: uuid.UUID, kind: str, countdown: Optional[float] = None,
                    ticket: Optional[uuid.UUID] = None) -> None:
    """Send one attempt of a committed job to the workers, and remember which broker has it."""
    epoch = broker_epoch()
    job_kind = get_kind(kind)
    kwargs = {"kind": kind, **({"ticket": str(ticket)} if ticket else {})}
    # The task id is the job id: every message of a job shares it, so a cancel can revoke them all.
    celery_app().send_task(ATTEMPT_TASK, args=[str(job_id)], kwargs=kwargs, task_id=str(job_id), countdown=countdown,
                           soft_time_limit=job_kind.soft_time_limit, time_limit=job_kind.hard_time_limit)
    mark_published(job_id, epoch)
    log.info("📋 [QUEUE] job %s published%s", job_id, "" if not countdown else " to run in %.3gs" % countdown)


def try_publish(job_id: uuid.UUID, kind: str) -> bool:
    """Publish after commit; a broker outage leaves the job pending for the reconciler."""
    try:
        publish_attempt(job_id, kind)
        return True
    except Exception:
        log.warning("📋 [QUEUE] job %s stays pending: the broker refused it; the reconciler will publish it",
                    job_id, exc_info=True)
        return False


def unpublished(epoch: str, grace: timedelta) -> list[tuple[uuid.UUID, str, Optional[datetime]]]:
    """Jobs waiting for a message the broker does not have (never published, or lost with the
    broker's data), and retries whose message is overdue (held by a worker that died)."""
    overdue_retry = and_(Job.status == Status.RETRYING, Job.next_retry_at < func.now() - grace,
                         Job.published_at < func.now() - grace)
    lost = and_(Job.status.in_((Status.PENDING, Status.RETRYING)),
                or_(Job.broker_epoch.is_(None), Job.broker_epoch != epoch),
                Job.updated_at < func.now() - timedelta(seconds=2))
    rows = db.session.execute(
        select(Job.id, Job.kind, Job.next_retry_at).where(or_(lost, overdue_retry)).limit(1000)
    ).all()
    db.session.rollback()
    return [(row.id, row.kind, row.next_retry_at) for row in rows]


def publish_delivery(notification_id: int, countdown: Optional[float] = None) -> None:
    celery_app().send_task(DELIVER_TASK, args=[notification_id], countdown=countdown)


def finished_channel(job_id: uuid.UUID) -> str:
    return "renderq:job-finished:%s" % job_id


def announce(finished: Finished) -> None:
    """After a job's terminal commit: send its webhook, and wake whoever waits on it
    (`Prefer: wait`). Both are best effort; the reconciler re-sends undelivered webhooks."""
    try:
        if finished.notification_id is not None:
            publish_delivery(finished.notification_id)
        redis_client().publish(finished_channel(finished.job_id), finished.status)
    except Exception:
        log.warning("📋 [QUEUE] job %s finished but could not be announced now", finished.job_id, exc_info=True)


def _status(job_id: uuid.UUID) -> str:
    status = db.session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    db.session.close()  # give the connection back before waiting
    return status


def wait_until_terminal(job_id: uuid.UUID, seconds: float) -> None:
    """Return when the job is terminal or after `seconds`, whichever is first: it listens on
    the channel `announce` publishes to, holding no database connection and not polling."""
    pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(finished_channel(job_id))  # before reading, so no finish slips between
        if _status(job_id) in TERMINAL_STATUSES:
            return
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if pubsub.get_message(timeout=min(remaining, 1.0)) is not None:
                return
    finally:
        pubsub.close()
