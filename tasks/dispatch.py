"""Publishing job ids to the broker, and knowing which messages the broker may have lost.

The broker epoch is a random id kept in Redis. Each publish records the epoch on the job;
if Redis loses its data (a restart without persistence, FLUSHALL) the key goes with it, a
new epoch begins, and the reconciler re-publishes every waiting job stamped with an old one.
"""
from __future__ import annotations

import logging
import uuid
from typing import Optional

import redis
from flask import current_app

from config.kinds import get_kind
from webapp import lifecycle

log = logging.getLogger(__name__)

EPOCH_KEY = "renderq:broker-epoch"
BACKGROUND_RUNS_KEY = "renderq:background-processor-runs"
ATTEMPT_TASK = "renderq.jobs.attempt"


def redis_client() -> redis.Redis:
    extensions = current_app.extensions
    if "renderq.redis" not in extensions:
        url = extensions["renderq.settings"].redis_url
        extensions["renderq.redis"] = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    return extensions["renderq.redis"]


def broker_epoch() -> str:
    client = redis_client()
    if client.set(EPOCH_KEY, str(uuid.uuid4()), nx=True):
        log.info("📋 [QUEUE] a new broker epoch began (first start, or Redis lost its data)")
    return client.get(EPOCH_KEY).decode()


def time_limits(kind: str) -> dict:
    job_kind = get_kind(kind)
    return dict(soft_time_limit=job_kind.soft_time_limit, time_limit=job_kind.hard_time_limit)


def publish_attempt(job_id: uuid.UUID, kind: str, countdown: Optional[float] = None,
                    ticket: Optional[uuid.UUID] = None) -> None:
    """Send one attempt of a committed job to the workers, and remember which broker has it."""
    epoch = broker_epoch()
    kwargs = {"kind": kind, **({"ticket": str(ticket)} if ticket else {})}
    # The task id is the job id: every message of a job shares it, so a cancel can revoke them all.
    current_app.extensions["celery"].send_task(ATTEMPT_TASK, args=[str(job_id)], kwargs=kwargs, task_id=str(job_id),
                                               countdown=countdown, **time_limits(kind))
    lifecycle.mark_published(job_id, epoch)
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


DELIVER_TASK = "renderq.notifications.deliver"


def finished_channel(job_id: uuid.UUID) -> str:
    return "renderq:job-finished:%s" % job_id


def publish_delivery(notification_id: int, countdown: Optional[float] = None) -> None:
    current_app.extensions["celery"].send_task(DELIVER_TASK, args=[notification_id], countdown=countdown)


def announce(finished: lifecycle.Finished) -> None:
    """After a job's terminal commit: send its webhook, and wake whoever waits on it
    (`Prefer: wait`). Both are best effort; the reconciler re-sends undelivered webhooks."""
    try:
        if finished.notification_id is not None:
            publish_delivery(finished.notification_id)
        redis_client().publish(finished_channel(finished.job_id), finished.status)
    except Exception:
        log.warning("📋 [QUEUE] job %s finished but could not be announced now", finished.job_id, exc_info=True)
