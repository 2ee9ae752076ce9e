"""What renderq sends through the broker: attempt messages, the ladder's timers, webhook
deliveries.

Which job gets an attempt message, and when, is renderq.jobs.scheduler's decision.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from typing import Iterator, Optional

import redis
from sqlalchemy import select

import celeryconfig
from config.kinds import get_kind
from renderq import tracing
from renderq.db import db
from renderq.jobs.lifecycle import Finished
from renderq.models import Job, Notification
from renderq.runtime import celery_app, redis_client

log = logging.getLogger(__name__)

BACKGROUND_RUNS_KEY = "renderq:background-processor-runs"
ATTEMPT_TASK = "renderq.jobs.attempt"
DELIVER_TASK = "renderq.notifications.deliver"

# A publish gives up after this long without the broker's confirmation (RabbitMQ stops reading
# from publishers during a memory or disk alarm): the caller moves on and the reconciler sends
# the message again, rather than an API request hanging on the broker.
PUBLISH_TIMEOUT = {"timeout": 5, "confirm_timeout": 5}


def timer_countdown(seconds: float) -> float:
    """The countdown of one timer message for a wait of `seconds`: never longer than
    celeryconfig.LONGEST_TIMER_SECONDS, because a worker holds it unacknowledged until it is due
    (RabbitMQ's consumer_timeout, Redis's visibility timeout). A timer that arrives before its
    job's retry is due is set again for the rest (renderq.jobs.scheduler.retry_due)."""
    return min(seconds, celeryconfig.LONGEST_TIMER_SECONDS)


_together = threading.local()


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Messages sent inside the block leave together as it ends, where the broker allows it:
    on Redis, kombu's publish batch sends them in one pipeline (one client, one round trip),
    where each would take a client from the pool and a round trip of its own; on RabbitMQ each
    still goes at once. A batch that cannot be sent raises as the block ends, none of it sent
    for sure (renderq.jobs.scheduler then sends each again on its own)."""
    with celery_app().producer_or_acquire() as producer, producer.batch():
        _together.producer = producer
        try:
            yield
        finally:
            _together.producer = None


def _send(name: str, job_id: Optional[uuid.UUID], trace_parent: Optional[str], **options: object) -> None:
    # Status lives in PostgreSQL: nobody waits on a Celery result, so none is subscribed to
    # (send_task would otherwise open a result-backend subscription for every message).
    with tracing.job_context(job_id, trace_parent):  # the message joins its job's trace
        celery_app().send_task(name, ignore_result=True, producer=getattr(_together, "producer", None),
                               **PUBLISH_TIMEOUT, **options)


def _stored_trace_parent(job_id: uuid.UUID) -> Optional[str]:
    """The job's submission trace context; only looked up while this process traces."""
    if not tracing.enabled():
        return None
    return db.session.execute(select(Job.trace_parent).where(Job.id == job_id)).scalar()


def publish_attempt(job_id: uuid.UUID, ticket: uuid.UUID, kind: str, trace_parent: Optional[str] = None) -> None:
    """Send the attempt the scheduler gave `ticket` to (after its commit), in the trace of the
    job's submission (`trace_parent`, from the job row)."""
    job_kind = get_kind(kind)
    # The task id is the job id: every message of a job shares it, so a cancel can revoke them all.
    _send(ATTEMPT_TASK, job_id, trace_parent, args=[str(job_id)], kwargs={"ticket": str(ticket), "kind": kind},
          task_id=str(job_id), soft_time_limit=job_kind.soft_time_limit, time_limit=job_kind.hard_time_limit)


def publish_timer(job_id: uuid.UUID, kind: str, countdown: float) -> None:
    """A message without a ticket, due in `countdown` seconds: when it arrives the job's retry
    is due and the scheduler sends it an attempt as soon as a slot is free."""
    _send(ATTEMPT_TASK, job_id, _stored_trace_parent(job_id), args=[str(job_id)], kwargs={"kind": kind},
          task_id=str(job_id), countdown=timer_countdown(countdown))


def publish_delivery(notification_id: int, countdown: Optional[float] = None) -> None:
    job_id, trace_parent = None, None
    if tracing.enabled():  # the webhook joins the trace of the job it tells about
        row = db.session.execute(select(Notification.job_id, Job.trace_parent)
                                 .outerjoin(Job, Job.id == Notification.job_id)
                                 .where(Notification.id == notification_id)).first()
        job_id, trace_parent = row if row is not None else (None, None)
    _send(DELIVER_TASK, job_id, trace_parent, args=[notification_id], countdown=countdown)


def queue_depth(queue: str = celeryconfig.ATTEMPTS_QUEUE) -> int:
    """Messages waiting in `queue` on the broker in use, Redis or RabbitMQ: a passive declare
    (it creates nothing) answers with the count on both. A queue nobody has declared yet holds
    nothing. Raises when the broker cannot be reached."""
    with celery_app().connection_for_read() as connection:
        connection.ensure_connection(max_retries=0)  # one try: a monitoring read must not wait
        channel = connection.channel()
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        except connection.channel_errors as error:
            if str(getattr(error, "reply_code", "")) == "404":  # NOT_FOUND
                return 0
            raise
        finally:
            _close_quietly(channel)


def _close_quietly(channel: object) -> None:
    try:
        channel.close()  # type: ignore[attr-defined]
    except Exception:  # a channel the broker already closed (after NOT_FOUND, on RabbitMQ)
        pass


def announce(finished: Finished) -> None:
    """After a job's terminal commit: send its webhook. Best effort: the reconciler re-sends
    undelivered webhooks."""
    if finished.notification_id is None:
        return
    try:
        publish_delivery(finished.notification_id)
    except Exception:
        log.warning("📋 [QUEUE] job %s finished but its webhook could not be sent now", finished.job_id, exc_info=True)


def count_background_run() -> None:
    """One more background-processor sweep, for /metrics: best effort, the sweep runs without it."""
    try:
        redis_client().incr(BACKGROUND_RUNS_KEY)
    except redis.RedisError:
        log.warning("🔁 [BACKGROUND] Redis is unreachable: this sweep is not counted", exc_info=True)
