"""The baselines' Celery app: a bare task that makes renderq's generator call and one
PostgreSQL UPDATE (no claim, no ledger, no notification), with renderq's reliability flags.

    celery -A bench.raw_celery worker --concurrency N

RAW_BROKER_URL is its broker (its tasks go to the queue `raw`); RAW_DATABASE_URL the database
whose one-row table `raw_done` the task counts itself done in (bench/run.py creates it).
bench/bare_web.py publishes through this app too.
"""
from __future__ import annotations

import os
import threading

import requests
from celery import Celery
from requests.adapters import HTTPAdapter
from sqlalchemy import create_engine, text
from urllib3 import Retry

import celeryconfig
from config import load_settings

# Celery configured as renderq's own app (celeryconfig.from_settings): the same pool and prefetch
# (WORKER_POOL, threads by default, takes a prefetch of 2), reliability flags (acks late, reject
# on worker lost, JSON only), transport options and task events; only the broker, the queue and
# renderq's tasks, routes and beat schedule are not carried over.
config = celeryconfig.from_settings(load_settings())
for renderq_only in ("include", "task_routes", "beat_schedule", "result_backend"):
    config.pop(renderq_only)
app = Celery("raw")
app.conf.update(config, broker_url=os.environ["RAW_BROKER_URL"], task_default_queue="raw")
# A pool larger than the worker's threads, as renderq's (renderq.app.pool_size); connects on first use.
engine = create_engine(os.environ.get("RAW_DATABASE_URL", "postgresql+psycopg://"), pool_size=5, max_overflow=10)
_sessions = threading.local()  # a keep-alive Session per thread, as renderq.generator.client keeps them


@app.task(name="raw.render")
def render(image_path: str, generator_url: str) -> None:
    if not hasattr(_sessions, "session"):
        _sessions.session = requests.Session()
        # A keep-alive connection the generator closes as it is reused (gunicorn's keepalive is
        # 2 s) resets; the baseline tries again rather than lose its count.
        _sessions.session.mount("http://", HTTPAdapter(max_retries=Retry(total=3, allowed_methods=None)))
    with open(image_path, "rb") as image:
        response = _sessions.session.post(generator_url + "/v1/renders", files={"image": image},
                                 data={"kind": "photo.render", "style": "sepia", "prompt": ""}, timeout=60)
    response.raise_for_status()
    with engine.begin() as connection:
        connection.execute(text("UPDATE raw_done SET done = done + 1 WHERE id = 1"))
