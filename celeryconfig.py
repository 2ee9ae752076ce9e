"""Celery's settings, built from renderq's validated Settings (never copied from app.config)."""
from __future__ import annotations

import ssl
from datetime import timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit

from config import Settings
from config.kinds import longest_hard_time_limit


# Job attempts, beat's maintenance and webhook deliveries each have a queue and a consumer of
# their own (Procfile: worker, maintenance, webhooks), so that a backlog of attempts never
# delays the reconciler, and a slow webhook receiver never holds an attempt's slot.
ATTEMPTS_QUEUE = "celery"
MAINTENANCE_QUEUE = "maintenance"
WEBHOOKS_QUEUE = "webhooks"


def visibility_timeout(settings: Settings) -> int:
    # Redis hands an unacknowledged message to another worker after this many seconds. A
    # retry's countdown is spent *reserved but unacknowledged* inside a worker, so the
    # timeout must outlast the longest countdown plus the longest attempt, or Redis would
    # redeliver waiting retries and run them twice. Dead workers are recovered sooner by
    # the reconciler's lease, not by this timeout.
    return int(max(3600, max(settings.retry_delays) + longest_hard_time_limit() + 60))


def celery_redis_url(url: str) -> str:
    """A Redis URL as kombu and Celery's result backend read it: they spell a Unix socket
    redis+socket:///path?virtual_host=N where redis-py (and REDIS_URL) has unix:///path?db=N."""
    parts = urlsplit(url)
    if parts.scheme != "unix":
        return url
    query = urlencode([("virtual_host" if name == "db" else name, value) for name, value in parse_qsl(parts.query)])
    return "redis+socket://%s%s%s" % (parts.netloc, parts.path, "?" + query if query else "")


def tls_settings(settings: Settings) -> dict:
    """For rediss:// URLs: check the server's certificate against the system's CAs, as redis-py
    does. Without this, kombu would connect without checking it (with a warning) and Celery's
    result backend would refuse to start; ssl_* parameters in the URL still take precedence."""
    verified = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    options = {}
    if settings.redis_url.startswith("rediss://"):
        options["broker_use_ssl"] = verified
    if settings.result_backend.startswith("rediss://"):
        options["redis_backend_use_ssl"] = verified
    return options


def from_settings(settings: Settings) -> dict:
    return dict(
        broker_url=celery_redis_url(settings.redis_url),
        result_backend=celery_redis_url(settings.result_backend),
        **tls_settings(settings),
        result_expires=settings.completed_job_ttl,
        # Status lives in PostgreSQL; results in Redis would only be read by Flower.
        task_ignore_result=True,
        # JSON only: a message is data, never code (pickle would be).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Reliability: acknowledge after the attempt, requeue when the worker dies, take one
        # message at a time so a busy process does not sit on messages others could run.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        # Processes per worker; `celery worker --concurrency N` still overrides it.
        worker_concurrency=settings.concurrent_jobs,
        # The API publishes after commit and answers 202 even when the broker is down (the
        # reconciler publishes later), so a publish must give up within a second or two.
        broker_connection_timeout=2,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        broker_transport_options={
            "visibility_timeout": visibility_timeout(settings),
            # Kombu routes through `_kombu.binding.*` sets that vanish when Redis loses its
            # data; without a dead-letter queue it would then drop every message silently.
            "deadletter_queue": "celery",
        },
        # Events feed Flower's task views.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
        include=["tasks.jobs", "tasks.sweeps", "tasks.webhooks"],
        task_default_queue=ATTEMPTS_QUEUE,
        task_routes={
            "renderq.background.process": {"queue": MAINTENANCE_QUEUE},
            "renderq.queue.reconcile": {"queue": MAINTENANCE_QUEUE},
            "renderq.maintenance.cleanup": {"queue": MAINTENANCE_QUEUE},
            "renderq.notifications.deliver": {"queue": WEBHOOKS_QUEUE},
        },
        beat_schedule={
            "background-processor": {
                "task": "renderq.background.process",
                "schedule": timedelta(milliseconds=settings.background_processing_interval_ms),
                "options": {"expires": settings.background_processing_interval_ms / 1000},
            },
            "reconciler": {
                "task": "renderq.queue.reconcile",
                "schedule": timedelta(seconds=settings.queue_check_interval),
                "options": {"expires": settings.queue_check_interval},
            },
            "cleanup": {
                "task": "renderq.maintenance.cleanup",
                "schedule": timedelta(seconds=min(3600, settings.completed_job_ttl)),
                "options": {"expires": 600},
            },
        },
    )
