"""Pure logic: settings validation, the ladder policy, Celery's effective settings."""
from __future__ import annotations

from datetime import timedelta
from unittest import mock

import pytest
from celery.app.task import Task

import celeryconfig
from config import ConfigError, load_settings
from renderq.jobs.policy import plan_after_transient_failure

DEFAULTS = load_settings({})


def test_defaults_are_the_spec():
    assert DEFAULTS.retry_delays == (1, 5, 15, 60, 300)
    assert (DEFAULTS.max_retries, DEFAULTS.concurrent_jobs, DEFAULTS.queue_check_interval) == (5, 3, 5)
    assert (DEFAULTS.background_processing_interval_ms, DEFAULTS.max_concurrent_background_tasks) == (30000, 3)
    assert (DEFAULTS.max_background_retry_age_ms, DEFAULTS.max_retry_attempts) == (86_400_000, 3)
    assert (DEFAULTS.completed_job_ttl, DEFAULTS.max_upload_bytes) == (86400, 10 * 1024 * 1024)
    assert (DEFAULTS.app_env, DEFAULTS.log_format, DEFAULTS.notify_on_failure) == ("development", "text", False)


@pytest.mark.parametrize("name, value", [
    ("MAX_RETRIES", "-1"), ("MAX_RETRIES", "many"), ("RETRY_DELAYS", "1,x"), ("CONCURRENT_JOBS", "0"),
    ("QUEUE_CHECK_INTERVAL", "0"), ("APP_ENV", "prod"), ("LOG_FORMAT", "xml"), ("NOTIFY_ON_FAILURE", "perhaps"),
    ("DATABASE_URL", "mysql://x"), ("REDIS_URL", "http://x"), ("DEFAULT_LOCALE", "de"),
    ("BROKER_URL", "http://x"), ("BROKER_URL", "kafka://x"), ("STORAGE_BACKEND", "gcs"),
    ("S3_BUCKET", "Not_A_Bucket"), ("S3_ENDPOINT_URL", "ftp://x"), ("S3_REGION", "EU West"),
    ("REDIS_URL", "rediss://cache:6380/0"), ("BROKER_URL", "rediss://cache:6380/0"),
])
def test_a_bad_value_names_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_a_media_root_that_cannot_be_made_stops_start_up(tmp_path):
    from webapp import create_app

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="MEDIA_ROOT=%s" % (blocker / "media")):
        create_app({"MEDIA_ROOT": str(blocker / "media")})


def test_fewer_delays_than_retries_is_refused():
    with pytest.raises(ConfigError, match="RETRY_DELAYS"):
        load_settings({"RETRY_DELAYS": "1,2", "MAX_RETRIES": "5"})


def test_decimal_delays_are_allowed():
    assert load_settings({"RETRY_DELAYS": "0.5,1.5,2,3,4"}).retry_delays == (0.5, 1.5, 2, 3, 4)


def test_the_fast_ladder_waits_1_5_15_60_300_then_hands_over_to_the_background():
    young = timedelta(minutes=1)
    delays = [plan_after_transient_failure(attempt, 0, young, DEFAULTS).retry_in for attempt in range(1, 6)]
    assert delays == [1, 5, 15, 60, 300]
    assert plan_after_transient_failure(6, 0, young, DEFAULTS).status == "pending_background_retry"


def test_retry_after_is_honoured_when_longer_than_the_ladder():
    step = plan_after_transient_failure(1, 0, timedelta(0), DEFAULTS, retry_after=12)
    assert (step.status, step.retry_in) == ("retrying", 12)


def test_background_tries_stop_at_three_or_at_the_age_limit():
    young, old = timedelta(hours=1), timedelta(hours=25)
    assert plan_after_transient_failure(7, 1, young, DEFAULTS).status == "pending_background_retry"
    assert plan_after_transient_failure(8, 2, young, DEFAULTS).status == "pending_background_retry"
    assert plan_after_transient_failure(9, 3, young, DEFAULTS).status == "failed"
    assert plan_after_transient_failure(7, 1, old, DEFAULTS).status == "failed"


def test_celery_is_given_the_ladder_countdowns_retry_by_retry(app):
    """The countdown that autoretry_for hands to Celery's Task.retry is the ladder's, retry by retry."""
    from renderq.jobs.policy import RetryLater
    from tasks.jobs import attempt

    given = []

    def record(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None, max_retries=None, **options):
        given.append(countdown)
        raise Exception("published")  # stand-in for the publish; Celery itself is not under test here

    with mock.patch.object(Task, "retry", record), app.app_context():
        for attempt_number in range(1, 6):
            step = plan_after_transient_failure(attempt_number, 0, timedelta(0), DEFAULTS)
            with pytest.raises(Exception, match="published"):
                attempt.retry(exc=RetryLater(step.retry_in))
    assert given == [1, 5, 15, 60, 300]
    assert attempt.autoretry_for and RetryLater in attempt.autoretry_for


def test_celery_reliability_settings_take_effect(app):
    celery = app.extensions["celery"]
    conf = celery.conf
    assert (conf.task_serializer, conf.result_serializer, list(conf.accept_content)) == ("json", "json", ["json"])
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_connection_retry_on_startup
    settings = app.extensions["renderq.settings"]
    assert conf.worker_concurrency == settings.concurrent_jobs == 3  # CONCURRENT_JOBS, without a command-line flag
    longest = max(settings.retry_delays) + 120
    assert conf.broker_transport_options["visibility_timeout"] > longest
    assert celeryconfig.visibility_timeout(DEFAULTS) > 300 + 120
    task = celery.tasks["renderq.jobs.attempt"]
    assert task.acks_late and task.reject_on_worker_lost and task.max_retries is None
    schedule = conf.beat_schedule
    assert schedule["background-processor"]["schedule"] == timedelta(milliseconds=settings.background_processing_interval_ms)
    assert schedule["reconciler"]["schedule"] == timedelta(seconds=settings.queue_check_interval)


def test_a_retry_after_is_honoured_only_up_to_the_ladders_longest_step():
    step = plan_after_transient_failure(1, 0, timedelta(0), DEFAULTS, retry_after=10 ** 9)
    assert (step.status, step.retry_in) == ("retrying", 300)


def test_settings_that_need_each_other_name_what_is_missing():
    with pytest.raises(ConfigError, match="S3_BUCKET"):
        load_settings({"STORAGE_BACKEND": "s3"})
    with pytest.raises(ConfigError, match="BROKER_SENTINEL_MASTER"):
        load_settings({"BROKER_URL": "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0"})
    s3 = load_settings({"STORAGE_BACKEND": "s3", "S3_BUCKET": "renderq-media", "S3_ENDPOINT_URL": "http://minio:9000"})
    assert (s3.s3_bucket, s3.s3_endpoint_url, s3.s3_region) == ("renderq-media", "http://minio:9000", "")


@pytest.mark.parametrize("name, value, secret", [
    ("REDIS_URL", "http://:hunter2-redis@cache:6379/0", "hunter2-redis"),
    ("BROKER_URL", "kafka://renderq:hunter2-kafka@queue:9092", "hunter2-kafka"),
    ("WEBHOOK_SECRET", "whsec_hunter2", "hunter2"),
    ("FLOWER_BASIC_AUTH", ":hunter2-flower", "hunter2-flower"),
])
def test_a_start_up_error_never_prints_a_secret(name, value, secret):
    with pytest.raises(ConfigError, match=name) as refused:
        load_settings({name: value})
    assert secret not in str(refused.value)


def test_the_broker_defaults_to_redis_url():
    settings = load_settings({"REDIS_URL": "redis://cache:6379/2"})
    assert (settings.broker_url, settings.broker_is_amqp) == ("redis://cache:6379/2", False)
    assert load_settings({"BROKER_URL": "amqp://guest:guest@rabbit:5672//"}).redis_url == "redis://127.0.0.1:6379/0"


def _celery_for(tmp_path, **environ: str):
    from renderq.app import create_base_app

    return create_base_app({"MEDIA_ROOT": str(tmp_path), **environ}).extensions["celery"]


def test_celery_on_rabbitmq_keeps_the_same_guarantees(tmp_path):
    celery = _celery_for(tmp_path, BROKER_URL="amqp://guest:guest@rabbit:5672//", REDIS_URL="redis://cache:6379/0")
    conf = celery.conf
    assert conf.broker_url == "amqp://guest:guest@rabbit:5672//"
    assert conf.result_backend == "redis://cache:6379/0"  # results (ignored anyway) stay on REDIS_URL
    # publisher confirms; none of Redis's options (no visibility timeout on RabbitMQ)
    assert conf.broker_transport_options == {"confirm_publish": True}
    assert (conf.task_serializer, list(conf.accept_content)) == ("json", ["json"])
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.task_default_delivery_mode == "persistent"
    for name in (celeryconfig.ATTEMPTS_QUEUE, celeryconfig.MAINTENANCE_QUEUE, celeryconfig.WEBHOOKS_QUEUE):
        queue = celery.amqp.queues[name]  # made on first use, as a worker or a publish would
        assert queue.durable and not queue.auto_delete and not (queue.queue_arguments or {}).get("x-queue-type")
    # a message is held unacknowledged by a worker for at most a timer plus an attempt: well within
    # RabbitMQ's consumer_timeout, which would otherwise close the channel and redeliver everything
    assert celeryconfig.longest_unacknowledged() <= celeryconfig.RABBITMQ_DEFAULT_CONSUMER_TIMEOUT / 2


def test_tls_brokers_check_the_servers_certificate(tmp_path):
    import ssl

    from kombu import Connection

    rediss = _celery_for(tmp_path, REDIS_URL="rediss://cache:6380/0?ssl_cert_reqs=required")
    assert Connection(rediss.conf.broker_url).ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    amqps = _celery_for(tmp_path, BROKER_URL="amqps://renderq:pw@rabbit.internal:5671/renderq")
    assert amqps.conf.broker_use_ssl == {"server_hostname": None}  # kombu fills in the URL's host name


def test_celery_behind_redis_sentinel_is_given_the_master_name(tmp_path):
    celery = _celery_for(tmp_path, BROKER_URL="sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0",
                         BROKER_SENTINEL_MASTER="renderq")
    options = celery.conf.broker_transport_options
    assert options["master_name"] == "renderq" and options["visibility_timeout"] >= 3600


def test_no_timer_waits_longer_than_a_consumer_may_hold_it(app):
    """A 429's Retry-After of two hours is a chain of timers, none longer than LONGEST_TIMER_SECONDS:
    the one that arrives early is set again for the rest (renderq.jobs.scheduler.retry_due)."""
    from renderq.broker import timer_countdown
    from renderq.jobs.policy import RetryLater
    from tasks.jobs import attempt

    assert timer_countdown(1.5) == 1.5 and timer_countdown(7200) == celeryconfig.LONGEST_TIMER_SECONDS
    given = []

    def record(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None, max_retries=None, **options):
        given.append((countdown, options.get("confirm_timeout")))
        raise Exception("published")

    with mock.patch.object(Task, "retry", record), app.app_context():
        with pytest.raises(Exception, match="published"):
            attempt.retry(exc=RetryLater(7200))
    assert given == [(celeryconfig.LONGEST_TIMER_SECONDS, 5)]
