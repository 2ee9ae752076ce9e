"""GET /metrics: Prometheus text, read at scrape time from PostgreSQL, the broker and Redis.

Nothing is counted in process memory, so the figures are the same whichever gunicorn worker
answers and however many Celery processes on however many hosts did the work. Every query
reads a bounded set of rows (renderq.counters, the in-flight rows, the live workers), so a
scrape costs the same at a thousand jobs and at a million. Counters (`_total`, the duration
histogram) only go up: cleanup does not take them back.
"""
from __future__ import annotations

import logging
from typing import Iterator

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from sqlalchemy import func, select

from renderq import counters, workers
from renderq.broker import BACKGROUND_RUNS_KEY, queue_depth
from renderq.db import constant, db
from renderq.enums import Status
from renderq.jobs.maintenance import LAST_RUN_KEY, MAINTENANCE_TASKS
from renderq.jobs.scheduler import generator_cap
from renderq.models import Job
from renderq.runtime import redis_client
from renderq.stats import counts

log = logging.getLogger(__name__)
blueprint = Blueprint("metrics", __name__)

WAITING = (Status.PENDING, Status.RETRYING, Status.PENDING_BACKGROUND_RETRY)
# The first entry of the pending jobs' index by age: the status is in the statement's text, so
# that the plan a prepared statement keeps can use that partial index (renderq.db.constant)
# rather than read every pending job.
OLDEST_PENDING = select(func.extract("epoch", func.now() - func.min(Job.created_at))).where(
    Job.status == constant(Status.PENDING))


class RenderqCollector:
    def collect(self) -> Iterator:
        try:
            yield from self._jobs()
            yield from self._generator()
            yield from self._attempts()
        finally:
            db.session.rollback()
        yield from self._broker()

    def _jobs(self) -> Iterator:
        by_status, by_kind = counts()
        jobs = GaugeMetricFamily("renderq_jobs", "Jobs kept in PostgreSQL, by kind and status",
                                 labels=["kind", "status"])
        for kind, statuses in by_kind.items():
            for status, count in statuses.items():
                jobs.add_metric([kind, status], count)
        yield jobs
        waiting = GaugeMetricFamily("renderq_jobs_waiting", "The backlog: jobs waiting for an attempt, by status",
                                    labels=["status"])
        for status in WAITING:
            waiting.add_metric([status.value], by_status[status])
        yield waiting
        oldest = db.session.execute(OLDEST_PENDING).scalar()
        age = GaugeMetricFamily("renderq_oldest_waiting_job_age_seconds",
                                "How long the oldest pending job has waited (0 with none waiting)")
        age.add_metric([], float(oldest or 0))
        yield age

    def _generator(self) -> Iterator:
        in_flight = db.session.execute(select(Job.worker_host, func.count()).where(
            Job.status == Status.PROCESSING, Job.lease_token.is_not(None)).group_by(Job.worker_host)).all()
        calls = GaugeMetricFamily("renderq_generator_calls_in_flight", "Attempts calling the generator now")
        calls.add_metric([], sum(count for _, count in in_flight))
        yield calls
        cap = GaugeMetricFamily("renderq_generator_cap", "GENERATOR_MAX_INFLIGHT in force (0: no cap)")
        cap.add_metric([], generator_cap())
        yield cap
        slots = GaugeMetricFamily("renderq_attempt_slots", "Attempts the live workers of a host can run at once",
                                  labels=["host"])
        busy = GaugeMetricFamily("renderq_attempt_slots_busy", "Attempts running on a host's workers",
                                 labels=["host"])
        running = {host: count for host, count in in_flight}
        by_host: dict[str, int] = {}
        for process in workers.live():
            by_host[process.host] = by_host.get(process.host, 0) + process.slots
        for host, total in sorted(by_host.items()):
            slots.add_metric([host], total)
            busy.add_metric([host], running.get(host, 0))
        yield slots
        yield busy

    def _attempts(self) -> Iterator:
        attempts = CounterMetricFamily("renderq_attempts", "Generator calls, by kind, tier, outcome and whether "
                                       "they retried the job", labels=["kind", "tier", "outcome", "retry"])
        totals = counters.attempt_totals()
        for row in totals:
            attempts.add_metric([row.kind, row.tier, row.outcome, str(row.retry).lower()], row.count)
        yield attempts
        sums: dict[str, float] = {}
        for row in totals:
            if row.outcome != "lost":
                sums[row.kind] = sums.get(row.kind, 0) + row.duration_ms / 1000
        durations = HistogramMetricFamily("renderq_attempt_duration_seconds", "How long attempts took, claim to recorded outcome",
                                          labels=["kind"])
        for kind, buckets in sorted(counters.attempt_buckets().items()):
            cumulative, series = 0, []
            for bound in counters.DURATION_BUCKETS_MS:
                cumulative += buckets.get(bound, 0)
                series.append((str(bound / 1000), cumulative))
            series.append(("+Inf", cumulative + buckets.get(-1, 0)))
            durations.add_metric([kind], series, sums.get(kind, 0))
        yield durations

    def _broker(self) -> Iterator:
        # Each series is absent while what it reads is down (/readyz says which).
        try:
            depth = queue_depth()  # the broker in use, Redis or RabbitMQ
        except Exception:  # the broker is down: /readyz says so; here its series are just absent
            log.warning("❌ [ERROR_HANDLER] /metrics could not read the broker", exc_info=True)
        else:
            queue = GaugeMetricFamily("renderq_broker_queue_depth", "Messages waiting in the attempts queue")
            queue.add_metric([], depth)
            yield queue
        try:
            client = redis_client()
            runs = int(client.get(BACKGROUND_RUNS_KEY) or 0)
            last_runs = client.mget([LAST_RUN_KEY % task for task in MAINTENANCE_TASKS])
        except Exception:
            log.warning("❌ [ERROR_HANDLER] /metrics could not read Redis", exc_info=True)
            return
        background = CounterMetricFamily("renderq_background_processor_runs", "Background processor sweeps run")
        background.add_metric([], runs)
        yield background
        last = GaugeMetricFamily("renderq_maintenance_last_run_timestamp_seconds",
                                 "When each maintenance task last ran (Unix time; absent if never)", labels=["task"])
        for task, value in zip(MAINTENANCE_TASKS, last_runs):
            if value is not None:
                last.add_metric([task], float(value))
        yield last


@blueprint.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RenderqCollector())
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
