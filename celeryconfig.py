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


# A retry's countdown is spent *reserved but unacknowledged* inside a worker (Celery's ETA). No
# single timer message waits longer than this: a longer wait (a 429's Retry-After, a long
# RETRY_DELAYS) is a chain of timers, each re-armed for the rest when it arrives early
# (renderq.broker.timer_countdown, renderq.jobs.scheduler.retry_due). So no message is ever held
# unacknowledged longer than this or the longest attempt, whatever the generator asks for.
LONGEST_TIMER_SECONDS = 600

# RabbitMQ's default consumer_timeout (30 min): a delivery held unacknowledged longer closes the
# consumer's channel, and every message it held is delivered again.
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT = 1800


def longest_unacknowledged() -> float:
    """The longest a worker holds one message unacknowledged: a timer, which once due may still
    wait for a pool process busy with an attempt, or a whole attempt."""
    return LONGEST_TIMER_SECONDS + longest_hard_time_limit()


def visibility_timeout(settings: Settings) -> int:
    # Redis hands an unacknowledged message to another worker after this many seconds, so it
    # must outlast the longest hold, or Redis would redeliver waiting retries and run them
    # twice. Dead workers are recovered sooner by the reconciler's lease, not by this timeout.
    return int(max(3600, longest_unacknowledged() + 60))


def broker_transport_options(settings: Settings) -> dict:
    if settings.broker_is_amqp:
        # Publisher confirms: a publish returns once RabbitMQ has taken the message (persistent,
        # on a durable queue), and raises if it refuses it, so "sent" means stored. RabbitMQ has
        # no visibility timeout: an unacknowledged message comes back when its consumer's
        # connection closes, and after consumer_timeout (see RABBITMQ_DEFAULT_CONSUMER_TIMEOUT).
        return {"confirm_publish": True}
    options = {
        "visibility_timeout": visibility_timeout(settings),
        # Kombu routes through `_kombu.binding.*` sets that vanish when Redis loses its
        # data; without a dead-letter queue it would then drop every message silently.
        "deadletter_queue": "celery",
    }
    if settings.broker_sentinel_master:
        options["master_name"] = settings.broker_sentinel_master
    return options


def celery_redis_url(url: str) -> str:
    """A Redis URL as kombu and Celery's result backend read it: they spell a Unix socket
    redis+socket:///path?virtual_host=N where redis-py (and REDIS_URL) has unix:///path?db=N."""
    parts = urlsplit(url)
    if parts.scheme != "unix":
        return url
    query = urlencode([("virtual_host" if name == "db" else name, value) for name, value in parse_qsl(parts.query)])
    return "redis+socket://%s%s%s" % (parts.netloc, parts.path, "?" + query if query else "")


def tls_settings(settings: Settings) -> dict:
    """For rediss:// and amqps:// URLs: check the server's certificate against the system's CAs, as redis-py
    does. Without this, kombu would connect without checking it (with a warning) and Celery's
    result backend would refuse to start; ssl_* parameters in the URL still take precedence."""
    verified = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    options = {}
    if settings.broker_url.startswith("rediss://"):
        options["broker_use_ssl"] = verified
    elif settings.broker_url.startswith("amqps://"):
        # Check the server's certificate against the host name too (by default kombu checks the
        # chain only); a private CA comes in through SSL_CERT_FILE.
        options["broker_use_ssl"] = {"server_hostname": None}
    if settings.result_backend.startswith("rediss://"):
        options["redis_backend_use_ssl"] = verified
    return options


def from_settings(settings: Settings) -> dict:
    return dict(
        broker_url=celery_redis_url(settings.broker_url),
        result_backend=celery_redis_url(settings.result_backend),
        **tls_settings(settings),
        result_expires=settings.completed_job_ttl,
        # Status lives in PostgreSQL; results in Redis would only be read by Flower.
        task_ignore_result=True,
        # JSON only: a message is data, never code (pickle would be).
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Reliability: acknowledge after the attempt, requeue when the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A prefork worker takes one message per process, so none sits on a message another
        # could run. A threads worker's consumer (Celery's blocking loop) only asks Redis for
        # more while it has room, and looks again up to 2 s later: with one message per thread
        # it would leave a freed thread idle that long. The scheduler never sends more attempt
        # messages than there are free slots, so room for twice that hoards nothing.
        worker_prefetch_multiplier=1 if settings.worker_pool == "prefork" else 2,
        broker_connection_retry_on_startup=True,
        # After a broker reconnect Celery lowers the prefetch count while old tasks run and raises
        # it again from the pool thread that acknowledges the last one, on the consumer's own
        # connection: with the threads pool that thread and the main loop both read the socket and
        # the worker hangs for good (seen on RabbitMQ restarts under load). Not lowering it costs
        # a few extra messages prefetched for a moment after a reconnect.
        worker_enable_prefetch_count_reduction=False,
        # The pool and its size (WORKER_POOL, CONCURRENT_JOBS); `celery worker --pool/--concurrency`
        # still override them (the maintenance and webhooks consumers do).
        worker_pool=settings.worker_pool,
        worker_concurrency=settings.concurrent_jobs,
        # The API publishes after commit and answers 202 even when the broker is down (the
        # reconciler publishes later), so a publish must give up within a second or two.
        broker_connection_timeout=2,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        broker_transport_options=broker_transport_options(settings),
        # On RabbitMQ: durable classic queues and persistent messages survive a broker restart.
        # Not quorum queues: Celery's ETA (the ladder's countdowns) on quorum queues needs native
        # delayed delivery; classic queues keep the worker-side ETA that Redis uses too.
        task_default_queue_type="classic",
        task_create_missing_queue_type="classic",
        task_default_delivery_mode="persistent",
        # The workers' events feed Flower's task views. No task-sent event: a publisher would
        # send one more message with every message (a tenth of the API's time per submission),
        # and jobs wait in PostgreSQL, not in the broker, so a message is received at once.
        worker_send_task_events=True,
        task_send_sent_event=False,
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
