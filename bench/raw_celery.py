"""The baseline: a bare Celery task that makes the same generator call, and nothing else
(no database, no claim, no ledger). Started as `celery -A bench.raw_celery worker`."""
from __future__ import annotations

import os

import redis
import requests
from celery import Celery

app = Celery("raw", broker=os.environ["RAW_BROKER_URL"])
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                task_acks_late=True, worker_prefetch_multiplier=1)
_done = redis.Redis.from_url(os.environ["RAW_BROKER_URL"])
_session = requests.Session()


@app.task(name="raw.render")
def render(image_path: str, generator_url: str) -> None:
    with open(image_path, "rb") as image:
        response = _session.post(generator_url + "/v1/renders", files={"image": image},
                                 data={"kind": "photo.render", "style": "sepia", "prompt": ""}, timeout=60)
    response.raise_for_status()
    _done.incr("raw:done")
