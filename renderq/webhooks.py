"""Webhook delivery: a notification POSTed as JSON to the user's URL, signed the Standard
Webhooks way with WEBHOOK_SECRET.

`webhook-id` is the notification's own id, stable across redeliveries, so receivers can drop
duplicates; the signature covers id, timestamp and body.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
from datetime import datetime, timezone
from urllib.parse import urlsplit

import requests
from standardwebhooks.webhooks import Webhook

from renderq import notify
from renderq.logs import job_logging
from renderq.runtime import settings

log = logging.getLogger(__name__)

MAX_DELIVERY_ATTEMPTS = 8
DELIVERY_TIMEOUT = 10
METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "metadata.azure.com"}


class UnsafeUrl(ValueError):
    pass


class RedeliverLater(Exception):
    """A delivery failed and another try is due in `delay` seconds."""

    def __init__(self, delay: float, error: Exception):
        super().__init__("redeliver in %ss: %s" % (delay, error))
        self.delay = delay


def check_url(url: str) -> str:
    """The URL if renderq may POST to it; UnsafeUrl saying why not otherwise.

    Checked when it is set and again before each delivery (DNS may change in between)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("webhook_url must be an http:// or https:// URL with a host")
    host = parts.hostname.lower()
    if host in METADATA_HOSTS:
        raise UnsafeUrl("webhook_url may not point at a cloud metadata service")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        raise UnsafeUrl("webhook_url's host %s does not resolve" % host) from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved or \
                str(ip) in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"):
            raise UnsafeUrl("webhook_url may not point at a link-local, metadata or reserved address (%s)" % ip)
    return url


def backoff(attempt: int) -> float:
    """Seconds before delivery attempt `attempt + 1`: 1, 2, 4 ... capped at ten minutes."""
    return min(2.0 ** (attempt - 1), 600.0)


def signed_headers(secret: str, webhook_id: str, body: str) -> dict:
    timestamp = datetime.now(timezone.utc)
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": Webhook(secret).sign(webhook_id, timestamp, body),
    }


def deliver(notification_id: int) -> None:
    """One delivery attempt of a notification, if it is due; raises RedeliverLater when
    another attempt should follow."""
    delivery = notify.claim_delivery(notification_id, DELIVERY_TIMEOUT + 5)
    if delivery is None:
        return  # delivered already, not due, or a redelivered copy of a message being handled
    with job_logging(delivery.job_id):
        body = json.dumps(delivery.payload, ensure_ascii=False, separators=(",", ":"))
        try:
            check_url(delivery.url)
            response = requests.post(delivery.url, data=body.encode(), timeout=DELIVERY_TIMEOUT,
                                     headers=signed_headers(settings().webhook_secret, delivery.webhook_id, body))
            response.raise_for_status()
        except (requests.RequestException, UnsafeUrl) as error:
            if delivery.attempts >= MAX_DELIVERY_ATTEMPTS or isinstance(error, UnsafeUrl):
                notify.give_up(notification_id, str(error))
                log.warning("❌ [ERROR_HANDLER] webhook %s abandoned after %d attempts: %s",
                            delivery.webhook_id, delivery.attempts, error)
                return
            delay = backoff(delivery.attempts)
            notify.schedule_redelivery(notification_id, delay, str(error))
            log.info("❌ [ERROR_HANDLER] webhook %s attempt %d failed (%s); again in %ss",
                     delivery.webhook_id, delivery.attempts, error, delay)
            raise RedeliverLater(delay, error) from error
        notify.mark_delivered(notification_id)
        log.info("📋 [QUEUE] webhook %s delivered (attempt %d)", delivery.webhook_id, delivery.attempts)
