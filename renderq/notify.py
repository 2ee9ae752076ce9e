"""Notifications: which finishes notify, the row written in the transaction that finishes the
job (one per job and event), and the bookkeeping of its webhook delivery.

Only `succeeded` and `blocked` notify (and `failed` with NOTIFY_ON_FAILURE=true): never a
retry or a transient error. renderq.webhooks sends them.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any, Optional

from sqlalchemy import JSON, Boolean, Integer, Uuid, and_, bindparam, func, select, text, update

from config import Settings
from renderq.db import db
from renderq.enums import Event, Outcome, Status
from renderq.messages import block_message, public_error
from renderq.models import Job, Notification, User


def event_for(status: Status, outcome: Optional[str], settings: Settings) -> Optional[Event]:
    """What a finished job tells its user, if anything."""
    if outcome == Outcome.SUCCEEDED:
        return Event.SUCCEEDED
    if outcome == Outcome.BLOCKED:
        return Event.BLOCKED
    if status == Status.FAILED and settings.notify_on_failure:
        return Event.FAILED
    return None


# What a notification is made of, returned by the UPDATE that finishes the job (lifecycle._finish).
JOB_COLUMNS = (Job.id, Job.user_id, Job.status, Job.outcome, Job.kind, Job.block_reason, Job.error_code)
USER_COLUMNS = (User.locale, User.webhook_url)


def payload(job: Any, event: Event, locale: str) -> dict:
    body = {"event": "job.%s" % event, "job_id": str(job.id), "status": job.status, "outcome": job.outcome,
            "kind": job.kind}
    if event == Event.SUCCEEDED:
        body["result_url"] = Job.result_url.fget(job)
    elif event == Event.BLOCKED:
        body["block_reason"] = job.block_reason
        body["message"] = block_message(job.block_reason, locale)
    else:
        body["error"] = public_error(job.error_code or "", locale)
    return body


def success_notice(job_id: uuid.UUID, kind: str) -> dict:
    """NOTICED's parameters for a job that succeeded. A success's notification says nothing its
    attempt does not know before the finish (no message in the user's locale), so the statement
    that finishes the job inserts it."""
    job = SimpleNamespace(id=job_id, status=Status.COMPLETED, outcome=Outcome.SUCCEEDED, kind=kind)
    return {"notice_event": str(Event.SUCCEEDED), "notice_payload": payload(job, Event.SUCCEEDED, locale=""),
            "notice_webhook_id": "msg_%s" % uuid.uuid4().hex}


# The notification a finish's statement inserts from its UPDATE's row (the CTE `changed`), unless
# one exists; its id, to be delivered only where the user has a webhook_url.
NOTICED = text(
    "INSERT INTO notifications (user_id, job_id, event, payload, webhook_id, next_delivery_at) "
    "SELECT user_id, id, :notice_event, :notice_payload, :notice_webhook_id, "
    "       CASE WHEN webhook_url IS NOT NULL THEN now() END FROM changed "
    "ON CONFLICT (job_id, event) DO NOTHING RETURNING id").bindparams(
    bindparam("notice_payload", type_=JSON)).columns(id=Integer).cte("noticed")


def record(job: Any, event: Event, settings: Settings) -> Optional[int]:
    """Insert the notification unless it exists, in the transaction that finishes the job; `job`
    is that UPDATE's row (JOB_COLUMNS and USER_COLUMNS). Its id if this call created it and it
    is to be delivered to a webhook (a user without one only reads the inbox)."""
    notification_id = db.session.connection().execute(_INSERT_NOTIFICATION, {
        "user_id": job.user_id, "job_id": job.id, "event": str(event),
        "payload": payload(job, event, job.locale or settings.default_locale),
        "webhook_id": "msg_%s" % uuid.uuid4().hex, "to_deliver": bool(job.webhook_url)}).scalar()
    return notification_id if job.webhook_url else None


# Written by every finish that notifies, so it is text: SQLAlchemy compiles it once (its
# PostgreSQL INSERT ... ON CONFLICT construct stays out of the statement cache).
_INSERT_NOTIFICATION = text(
    "INSERT INTO notifications (user_id, job_id, event, payload, webhook_id, next_delivery_at) "
    "VALUES (:user_id, :job_id, :event, :payload, :webhook_id, CASE WHEN :to_deliver THEN now() END) "
    "ON CONFLICT (job_id, event) DO NOTHING RETURNING id").bindparams(
    bindparam("job_id", type_=Uuid), bindparam("payload", type_=JSON), bindparam("to_deliver", type_=Boolean))


def inbox(user_id: int, limit: int = 50) -> list[Notification]:
    return list(db.session.execute(
        select(Notification).where(Notification.user_id == user_id)
        .order_by(Notification.created_at.desc(), Notification.id.desc()).limit(limit)).scalars())


# What GET /api/me/notifications says of a notification's webhook, derived from its columns:
# delivered (delivered_at), pending (a next delivery time), failed (given up, last error
# kept), none (the user had no webhook_url when the job finished).
DELIVERED, PENDING, FAILED, NO_WEBHOOK = "delivered", "pending", "failed", "none"
WEBHOOK_URL_REMOVED = "not delivered: the webhook_url was removed"


def delivery_state(notification: Notification) -> str:
    if notification.delivered_at is not None:
        return DELIVERED
    if notification.next_delivery_at is not None:
        return PENDING
    return FAILED if notification.last_delivery_error else NO_WEBHOOK


@dataclass(frozen=True)
class Delivery:
    """One claimed delivery attempt; `attempts` counts it, and fences what it records."""
    notification_id: int
    job_id: uuid.UUID
    url: str
    webhook_id: str
    payload: dict
    attempts: int


def _due(notification_id: int):
    # A second of slack: a Celery countdown may fire a little before the time it was set for.
    return and_(Notification.id == notification_id, Notification.delivered_at.is_(None),
                Notification.next_delivery_at <= func.now() + timedelta(seconds=1))


def claim_delivery(notification_id: int, hold_seconds: float) -> Optional[Delivery]:
    """Take a due, undelivered notification for one delivery attempt, pushing its next
    delivery time `hold_seconds` ahead so that nobody else sends it meanwhile (a redelivered
    message steps aside, the reconciler waits). The attempt must end well within the hold.

    None if it is not due (delivered, scheduled later, or held by an attempt in flight), or if
    its user has no webhook_url any more, which ends the delivery for good."""
    row = db.session.execute(
        update(Notification)
        .where(_due(notification_id), Notification.user_id == User.id, User.webhook_url.is_not(None))
        .values(next_delivery_at=func.now() + timedelta(seconds=hold_seconds),
                delivery_attempts=Notification.delivery_attempts + 1)
        .returning(Notification.job_id, Notification.webhook_id, Notification.payload,
                   Notification.delivery_attempts, User.webhook_url)
    ).first()
    if row is None:
        db.session.execute(
            update(Notification)
            .where(_due(notification_id), Notification.user_id.in_(select(User.id).where(User.webhook_url.is_(None))))
            .values(next_delivery_at=None, last_delivery_error=WEBHOOK_URL_REMOVED))
    db.session.commit()
    if row is None:
        return None
    return Delivery(notification_id, row.job_id, row.webhook_url, row.webhook_id, row.payload, row.delivery_attempts)


def _record(delivery: Delivery, *conditions: Any, **values: Any) -> bool:
    """Record an attempt's outcome unless another claim has taken the notification since."""
    done = db.session.execute(
        update(Notification)
        .where(Notification.id == delivery.notification_id, Notification.delivered_at.is_(None),
               Notification.delivery_attempts == delivery.attempts, *conditions)
        .values(**values).returning(Notification.id)).first()
    db.session.commit()
    return done is not None


def mark_delivered(delivery: Delivery) -> None:
    # Whoever claimed since, this attempt was answered: that stays true.
    db.session.execute(
        update(Notification)
        .where(Notification.id == delivery.notification_id, Notification.delivered_at.is_(None))
        .values(delivered_at=func.now(), next_delivery_at=None, last_delivery_error=None))
    db.session.commit()


def schedule_redelivery(delivery: Delivery, delay: float, error: str) -> bool:
    """Whether another attempt was scheduled: not if the delivery was ended meanwhile (the
    webhook_url removed) or claimed again."""
    return _record(delivery, Notification.next_delivery_at.is_not(None),
                   next_delivery_at=func.now() + timedelta(seconds=delay), last_delivery_error=error[:500])


def give_up(delivery: Delivery, error: str) -> bool:
    """End the delivery for good (state failed), keeping why."""
    return _record(delivery, Notification.next_delivery_at.is_not(None),
                   next_delivery_at=None, last_delivery_error=error[:500])


def end_pending_deliveries(user_id: int) -> None:
    """The user removed their webhook_url: their pending deliveries end now (in the caller's
    transaction) instead of being claimed again and again. An attempt in flight finishes; what
    it records cannot revive the delivery."""
    db.session.execute(
        update(Notification)
        .where(Notification.user_id == user_id, Notification.delivered_at.is_(None),
               Notification.next_delivery_at.is_not(None))
        .values(next_delivery_at=None, last_delivery_error=WEBHOOK_URL_REMOVED))


def overdue_deliveries(grace: timedelta) -> list[int]:
    """Deliveries whose message was lost (broker data loss, a worker that died): due more
    than `grace` ago. An attempt in flight holds next_delivery_at past its own end, so it is
    never among them; a delivery given up or ended has none."""
    ids = list(db.session.execute(
        select(Notification.id).where(Notification.delivered_at.is_(None),
                                      Notification.next_delivery_at < func.now() - grace).limit(500)).scalars())
    db.session.rollback()
    return ids
