"""Notifications: which finishes notify, the row written in the transaction that finishes the
job (one per job and event), and the bookkeeping of its webhook delivery.

Only `succeeded` and `blocked` notify (and `failed` with NOTIFY_ON_FAILURE=true): never a
retry or a transient error. renderq.webhooks sends them.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert

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


def payload(job: Job, event: Event, locale: str) -> dict:
    body = {"event": "job.%s" % event, "job_id": str(job.id), "status": job.status, "outcome": job.outcome,
            "kind": job.kind}
    if event == Event.SUCCEEDED:
        body["result_url"] = job.result_url
    elif event == Event.BLOCKED:
        body["block_reason"] = job.block_reason
        body["message"] = block_message(job.block_reason, locale)
    else:
        body["error"] = public_error(job.error_code or "", locale)
    return body


def record(job_id: uuid.UUID, event: Event, settings: Settings) -> Optional[int]:
    """Insert the notification unless it exists; its id if this call created it."""
    job = db.session.get(Job, job_id, populate_existing=True)
    user = db.session.get(User, job.user_id)
    statement = (
        insert(Notification)
        .values(user_id=user.id, job_id=job.id, event=event,
                payload=payload(job, event, user.locale or settings.default_locale),
                webhook_id="msg_%s" % uuid.uuid4().hex,
                next_delivery_at=func.now() if user.webhook_url else None)
        .on_conflict_do_nothing(index_elements=["job_id", "event"])
        .returning(Notification.id)
    )
    return db.session.execute(statement).scalar()


def inbox(user_id: int, limit: int = 50) -> list[Notification]:
    return list(db.session.execute(
        select(Notification).where(Notification.user_id == user_id)
        .order_by(Notification.created_at.desc(), Notification.id.desc()).limit(limit)).scalars())


@dataclass(frozen=True)
class Delivery:
    notification_id: int
    job_id: uuid.UUID
    url: str
    webhook_id: str
    payload: dict
    attempts: int


def claim_delivery(notification_id: int, hold_seconds: float) -> Optional[Delivery]:
    """Take a due, undelivered notification for one delivery attempt, pushing its next
    delivery time past this attempt so nobody else sends it meanwhile."""
    row = db.session.execute(
        update(Notification)
        .where(Notification.id == notification_id, Notification.delivered_at.is_(None),
               Notification.next_delivery_at <= func.now() + timedelta(seconds=1))
        .values(next_delivery_at=func.now() + timedelta(seconds=hold_seconds),
                delivery_attempts=Notification.delivery_attempts + 1)
        .returning(Notification.job_id, Notification.user_id, Notification.webhook_id, Notification.payload,
                   Notification.delivery_attempts)
    ).first()
    url = db.session.get(User, row.user_id).webhook_url if row else None
    db.session.commit()
    if row is None or not url:
        return None
    return Delivery(notification_id, row.job_id, url, row.webhook_id, row.payload, row.delivery_attempts)


def _update(notification_id: int, **values: Any) -> None:
    db.session.execute(update(Notification).where(Notification.id == notification_id).values(**values))
    db.session.commit()


def mark_delivered(notification_id: int) -> None:
    _update(notification_id, delivered_at=func.now(), next_delivery_at=None, last_delivery_error=None)


def schedule_redelivery(notification_id: int, delay: float, error: str) -> None:
    _update(notification_id, next_delivery_at=func.now() + timedelta(seconds=delay), last_delivery_error=error[:500])


def give_up(notification_id: int, error: str) -> None:
    _update(notification_id, next_delivery_at=None, last_delivery_error=error[:500])


def overdue_deliveries(grace: timedelta) -> list[int]:
    """Deliveries whose message was lost (broker data loss, a worker that died)."""
    ids = list(db.session.execute(
        select(Notification.id).where(Notification.delivered_at.is_(None),
                                      Notification.next_delivery_at < func.now() - grace).limit(500)).scalars())
    db.session.rollback()
    return ids
