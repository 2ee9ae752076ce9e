"""What renderq sends through the broker (attempt messages, the ladder's timers, webhook
deliveries), and announcing finished jobs to whoever waits on them.

Which job gets an attempt message, and when, is renderq.jobs.scheduler's decision.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Optional

from sqlalchemy import select

from config.kinds import get_kind
from renderq.db import db
from renderq.enums import TERMINAL_STATUSES
from renderq.jobs.lifecycle import Finished
from renderq.models import Job
from renderq.runtime import celery_app, redis_client

log = logging.getLogger(__name__)

BACKGROUND_RUNS_KEY = "renderq:background-processor-runs"
ATTEMPT_TASK = "renderq.jobs.attempt"
DELIVER_TASK = "renderq.notifications.deliver"


def _send(name: str, **options: object) -> None:
    # Status lives in PostgreSQL: nobody waits on a Celery result, so none is subscribed to
    # (send_task would otherwise open a result-backend subscription for every message).
    celery_app().send_task(name, ignore_result=True, **options)


def publish_attempt(job_id: uuid.UUID, ticket: uuid.UUID, kind: str) -> None:
    """Send the attempt the scheduler gave `ticket` to (after its commit)."""
    job_kind = get_kind(kind)
    # The task id is the job id: every message of a job shares it, so a cancel can revoke them all.
    _send(ATTEMPT_TASK, args=[str(job_id)], kwargs={"ticket": str(ticket), "kind": kind}, task_id=str(job_id),
          soft_time_limit=job_kind.soft_time_limit, time_limit=job_kind.hard_time_limit)
    log.info("📋 [QUEUE] job %s: attempt message sent", job_id, extra={"job_id": str(job_id)})


def publish_timer(job_id: uuid.UUID, kind: str, countdown: float) -> None:
    """A message without a ticket, due in `countdown` seconds: when it arrives the job's retry
    is due and the scheduler sends it an attempt as soon as a slot is free."""
    _send(ATTEMPT_TASK, args=[str(job_id)], kwargs={"kind": kind}, task_id=str(job_id), countdown=countdown)


def publish_delivery(notification_id: int, countdown: Optional[float] = None) -> None:
    _send(DELIVER_TASK, args=[notification_id], countdown=countdown)


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
