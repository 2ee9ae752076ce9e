"""GET /metrics: Prometheus text, computed at scrape time from PostgreSQL and Redis.

Nothing is counted in process memory, so the figures are the same whichever gunicorn
worker answers and however many Celery processes on however many hosts did the work.
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
from sqlalchemy import text

from renderq.broker import BACKGROUND_RUNS_KEY
from renderq.db import db
from renderq.enums import AttemptOutcome, Status
from renderq.runtime import redis_client
from renderq.stats import counts

log = logging.getLogger(__name__)
blueprint = Blueprint("metrics", __name__)

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

_ATTEMPTS = text("""
    SELECT kind, tier, outcome, number > 1 AS retry, count(*) FROM job_attempts GROUP BY 1, 2, 3, 4
""")
_DURATIONS = text("""
    SELECT kind, count(*) AS total, sum(duration_ms) / 1000.0 AS seconds, %s
      FROM job_attempts WHERE outcome <> :lost GROUP BY kind
""" % ", ".join("count(*) FILTER (WHERE duration_ms <= %d) AS le_%d" % (b * 1000, i)
                for i, b in enumerate(DURATION_BUCKETS))).bindparams(lost=AttemptOutcome.LOST)


class RenderqCollector:
    def collect(self) -> Iterator:
        by_status, by_kind = counts()
        jobs = GaugeMetricFamily("renderq_jobs", "Jobs kept in PostgreSQL, by status and kind", labels=["status", "kind"])
        for kind, statuses in by_kind.items():
            for status, count in statuses.items():
                jobs.add_metric([status, kind], count)
        yield jobs
        in_flight = GaugeMetricFamily("renderq_generator_calls_in_flight", "Attempts calling the generator now")
        in_flight.add_metric([], by_status[Status.PROCESSING])
        yield in_flight

        attempts = GaugeMetricFamily("renderq_attempts", "Generator calls of the jobs kept, by outcome; "
                                     "retry=true for every call after a job's first",
                                     labels=["kind", "tier", "outcome", "retry"])
        for kind, tier, outcome, retry, count in db.session.execute(_ATTEMPTS):
            attempts.add_metric([kind, tier, outcome, str(retry).lower()], count)
        yield attempts

        durations = HistogramMetricFamily("renderq_attempt_duration_seconds", "How long generator calls took, by kind",
                                          labels=["kind"])
        for row in db.session.execute(_DURATIONS).mappings():
            buckets = [(str(bound), row["le_%d" % i]) for i, bound in enumerate(DURATION_BUCKETS)]
            durations.add_metric([row["kind"]], buckets + [("+Inf", row["total"])], float(row["seconds"] or 0))
        yield durations
        db.session.rollback()
        yield from self._broker()

    def _broker(self) -> Iterator:
        try:
            client = redis_client()
            depth, runs = client.llen("celery"), int(client.get(BACKGROUND_RUNS_KEY) or 0)
        except Exception:  # the broker is down: /readyz says so; here its series are just absent
            log.warning("❌ [ERROR_HANDLER] /metrics could not read the broker", exc_info=True)
            return
        queue = GaugeMetricFamily("renderq_broker_queue_depth", "Messages waiting in the Celery queue")
        queue.add_metric([], depth)
        yield queue
        background = CounterMetricFamily("renderq_background_processor_runs", "Background processor sweeps run")
        background.add_metric([], runs)
        yield background


@blueprint.get("/metrics")
def metrics() -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RenderqCollector())
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
