"""Webhook delivery: a notification POSTed as JSON to the user's URL, signed the Standard
Webhooks way with WEBHOOK_SECRET, one attempt at a time, until it is answered with a 2xx or
WEBHOOK_RETRY_DELAYS is used up.

`webhook-id` is the notification's own id, stable across redeliveries, so receivers can drop
duplicates; the signature covers id, timestamp and body. How the receiver is reached (which
addresses, the deadline, no redirects) is renderq.webhook_http.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from standardwebhooks.webhooks import Webhook

from config import Settings
from renderq import notify, tracing
from renderq.logs import job_logging
from renderq.runtime import settings
from renderq.webhook_http import (
    DEADLINE_SECONDS,
    Deadline,
    DeliveryFailed,
    UnsafeUrl,
    post,
)

log = logging.getLogger(__name__)

# A claim holds the notification this much longer than an attempt's deadline, so the attempt
# has ended (its connection reset) before anyone may claim it again: a redelivered message or
# the reconciler never starts a second, concurrent POST of one notification. The margin
# covers the claim's second of slack and recording the outcome.
HOLD_MARGIN_SECONDS = 5.0
CLAIM_HOLD_SECONDS = DEADLINE_SECONDS + HOLD_MARGIN_SECONDS


class RedeliverLater(Exception):
    """A delivery failed and another try is due in `delay` seconds."""

    def __init__(self, delay: float, error: Exception):
        super().__init__("redeliver in %ss: %s" % (delay, error))
        self.delay = delay


def max_attempts(config: Settings) -> int:
    return 1 + len(config.webhook_retry_delays)


def signed_headers(secret: str, webhook_id: str, body: str) -> dict:
    timestamp = datetime.now(timezone.utc)
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, timestamp, body),
    }


def describe_status(status: int) -> str:
    if 300 <= status < 400:
        return "HTTP %d: redirects are not followed" % status
    return "HTTP %d" % status


def deliver(notification_id: int) -> None:
    """One delivery attempt of a notification, if it is due; raises RedeliverLater when
    another attempt should follow."""
    deadline = Deadline(DEADLINE_SECONDS)  # started before the claim, so it ends inside the hold
    delivery = notify.claim_delivery(notification_id, CLAIM_HOLD_SECONDS)
    if delivery is None:
        return  # delivered, not due, held by an attempt in flight, or no webhook_url any more
    config = settings()
    with job_logging(delivery.job_id):
        tracing.mark_job(delivery.job_id)
        if delivery.attempts > max_attempts(config):  # the last attempt's worker died before recording it
            notify.give_up(delivery, "gave up after %d attempts" % max_attempts(config))
            return
        body = json.dumps(delivery.payload, ensure_ascii=False, separators=(",", ":"))
        headers = signed_headers(config.webhook_secret, delivery.webhook_id, body)
        try:
            with tracing.client_call("POST webhook", "POST", delivery.url) as call:  # traceparent to the receiver
                status = post(delivery.url, body.encode(), {**headers, **call.headers}, config.webhook_allowed_networks,
                              deadline)
                call.answered(status)
            if not 200 <= status < 300:
                raise DeliveryFailed(describe_status(status))
        except UnsafeUrl as refused:
            notify.give_up(delivery, str(refused))
            log.warning("❌ [ERROR_HANDLER] webhook %s refused, not delivered: %s", delivery.webhook_id, refused)
            return
        except DeliveryFailed as failure:
            _failed(delivery, failure, config)
            return
        notify.mark_delivered(delivery)
        log.info("📋 [QUEUE] webhook %s delivered (attempt %d)", delivery.webhook_id, delivery.attempts)


def _failed(delivery: notify.Delivery, failure: DeliveryFailed, config: Settings) -> None:
    if delivery.attempts >= max_attempts(config):
        if notify.give_up(delivery, "%s (gave up after %d attempts)" % (failure, delivery.attempts)):
            log.warning("❌ [ERROR_HANDLER] webhook %s abandoned after %d attempts: %s",
                        delivery.webhook_id, delivery.attempts, failure)
        return
    delay = config.webhook_retry_delays[delivery.attempts - 1]
    if not notify.schedule_redelivery(delivery, delay, str(failure)):
        return  # ended meanwhile (webhook_url removed) or claimed again: nothing to retry here
    log.info("❌ [ERROR_HANDLER] webhook %s attempt %d failed (%s); again in %ss",
             delivery.webhook_id, delivery.attempts, failure, delay)
    raise RedeliverLater(delay, failure) from failure
