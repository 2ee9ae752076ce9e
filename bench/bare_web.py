"""The submit baseline: a bare Flask app that does what a submission must do at the least (read
the upload or the JSON body, INSERT a row, commit, publish a Celery message) and nothing of
renderq's (no token, no credit hold, no image check, no photo stored, no fair queue).

    gunicorn --workers 2 --threads 16 "bench.bare_web:app"

Its rows go to `bare_jobs` in RAW_DATABASE_URL (bench/run.py creates the table); its messages
to the `bare` queue of RAW_BROKER_URL, which nobody consumes.
"""
from __future__ import annotations

import json
import uuid

from flask import Flask, Response, jsonify, request
from sqlalchemy import text

from bench.raw_celery import app as celery_app
from bench.raw_celery import engine

_INSERT = text("INSERT INTO bare_jobs (id, kind, params, size) VALUES (:id, :kind, :params, :size)")

app = Flask(__name__)


def _accept(kind: str, params: dict, size: int | None) -> Response:
    job_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(_INSERT, {"id": job_id, "kind": kind, "params": json.dumps(params), "size": size})
    celery_app.send_task("bare.submitted", args=[str(job_id)], queue="bare", ignore_result=True)
    response = jsonify({"id": str(job_id), "status": "pending"})
    response.status_code = 202
    return response


@app.post("/photos")
def photos() -> Response:
    data = request.files["file"].read()
    return _accept("photo.render", {"style": request.form.get("style", ""), "prompt": request.form.get("prompt", "")},
                   len(data))


@app.post("/jobs")
def jobs() -> Response:
    body = request.get_json()
    return _accept(body.get("kind", "image.generate"), body.get("params") or {}, None)
