"""Webhook delivery: a notification POSTed as JSON, signed the Standard Webhooks way.

`webhook-id` is the notification's own id, stable across redeliveries, so receivers can
drop duplicates; the signature covers id, timestamp and body with WEBHOOK_SECRET.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import requests
from celery import shared_task
from standardwebhooks.webhooks import Webhook

from tasks.attempts import settings
from webapp import notifications
from webapp.logs import job_logging
from webapp.urls import UnsafeUrl, check_webhook_url

log = logging.getLogger(__name__)

MAX_DELIVERY_ATTEMPTS = 8
DELIVERY_TIMEOUT = 10


def backoff(attempt: int) -> float:
    """Seconds before delivery attempt `attempt + 1`: 1, 2, 4 ... capped at ten minutes."""
    return min(2.0 ** (attempt - 1), 600.0)


def signed_request(secret: str, webhook_id: str, body: str) -> dict:
    timestamp = datetime.now(timezone.utc)
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, timestamp, body),
    }


@shared_task(bind=True, name="renderq.notifications.deliver", acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_DELIVERY_ATTEMPTS, ignore_result=True)
def deliver(self, notification_id: int) -> None:
    config = settings()
    delivery = notifications.claim_delivery(notification_id, DELIVERY_TIMEOUT + 5)
    if delivery is None:
        return  # delivered already, not due, or a redelivered copy of a message being handled
    with job_logging(delivery.job_id):
        body = json.dumps(delivery.payload, ensure_ascii=False, separators=(",", ":"))
        try:
            check_webhook_url(delivery.url)
            response = requests.post(delivery.url, data=body.encode(), timeout=DELIVERY_TIMEOUT,
                                     headers=signed_request(config.webhook_secret, delivery.webhook_id, body))
            response.raise_for_status()
        except (requests.RequestException, UnsafeUrl) as error:
            if delivery.attempts >= MAX_DELIVERY_ATTEMPTS or isinstance(error, UnsafeUrl):
                notifications.give_up(notification_id, str(error))
                log.warning("❌ [ERROR_HANDLER] webhook %s abandoned after %d attempts: %s",
                            delivery.webhook_id, delivery.attempts, error)
                return
            delay = backoff(delivery.attempts)
            notifications.schedule_redelivery(notification_id, delay, str(error))
            log.info("❌ [ERROR_HANDLER] webhook %s attempt %d failed (%s); again in %ss",
                     delivery.webhook_id, delivery.attempts, error, delay)
            raise self.retry(countdown=delay, exc=error)
        notifications.mark_delivered(notification_id)
        log.info("📋 [QUEUE] webhook %s delivered (attempt %d)", delivery.webhook_id, delivery.attempts)
