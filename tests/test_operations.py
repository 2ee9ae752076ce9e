"""Operating renderq: TTL cleanup, /metrics, /readyz, JSON logs, and compose matching the Procfile."""
from __future__ import annotations

import json
import re
import uuid

import yaml
from sqlalchemy import func, select, text

from tests.conftest import job_json, upload, wait_terminal
from tests.support import ROOT, Process, wait_for, worker_command
from renderq.db import db
from renderq.models import Job, LedgerEntry, Notification, Photo
from renderq.storage import storage


def auth(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def stored(app, keys: list[str]) -> list[bool]:
    with app.app_context():
        found = []
        for key in keys:
            try:
                found.append(bool(storage().get(key)))
            except KeyError:
                found.append(False)
        return found


def test_cleanup_purges_old_finished_jobs_and_their_files_but_keeps_the_ledger(app, client, make_user, stack):
    user_id, token = make_user()
    old = wait_terminal(client, token, upload(client, token).get_json()["id"])
    recent = wait_terminal(client, token, upload(client, token).get_json()["id"])
    with app.app_context():
        old_job = db.session.get(Job, uuid.UUID(old["id"]))
        keys = [old_job.result_path, db.session.get(Photo, old_job.photo_id).path]
    assert stored(app, keys) == [True, True]
    with app.app_context():
        db.session.execute(text("UPDATE jobs SET completed_at = now() - interval '2 days' WHERE id = :id"),
                           {"id": old["id"]})
        db.session.commit()
    result = app.extensions["celery"].send_task("renderq.maintenance.cleanup")  # run by the real worker
    wait_for(lambda: client.get("/api/jobs/%s" % old["id"], headers=auth(token)).status_code == 404,
             what="the old job to be purged")
    assert result.id and stored(app, keys) == [False, False]
    assert job_json(client, token, recent["id"])["status"] == "completed"
    with app.app_context():
        kept = db.session.execute(select(func.count()).select_from(LedgerEntry)
                                  .where(LedgerEntry.job_id == uuid.UUID(old["id"]))).scalar()
        told = db.session.execute(select(func.count()).select_from(Notification)
                                  .where(Notification.job_id == uuid.UUID(old["id"]))).scalar()
    assert (kept, told) == (2, 1)  # hold and capture, and the notification, stay


def metric(body: str, name: str, **labels: str) -> float:
    for line in body.splitlines():
        if line.startswith(name) and all('%s="%s"' % item in line for item in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no %s %s in /metrics" % (name, labels))


def test_metrics_count_what_happened(client, make_user, stack):
    _, token = make_user()
    before = client.get("/metrics").get_data(as_text=True)
    done_before = metric(before, "renderq_jobs", status="completed", kind="photo.render")
    for prompt in ("", "[fail:1]"):
        wait_terminal(client, token, upload(client, token, prompt=prompt).get_json()["id"])
    body = client.get("/metrics").get_data(as_text=True)
    assert metric(body, "renderq_jobs", status="completed", kind="photo.render") == done_before + 2
    assert metric(body, "renderq_attempts", kind="photo.render", outcome="transient", retry="false") >= 1
    assert metric(body, "renderq_attempts", kind="photo.render", outcome="succeeded", retry="true") >= 1
    assert metric(body, "renderq_attempt_duration_seconds_count", kind="photo.render") >= 3
    assert metric(body, "renderq_broker_queue_depth") >= 0
    assert metric(body, "renderq_background_processor_runs_total") >= 1
    assert metric(body, "renderq_generator_calls_in_flight") >= 0


def test_readyz_names_what_is_down(client, stack_env):
    from webapp import create_app

    assert client.get("/readyz").status_code == 200
    cut_off = create_app({**stack_env, "REDIS_URL": "redis://127.0.0.1:1/0"}).test_client().get("/readyz")
    assert cut_off.status_code == 503 and cut_off.get_json()["checks"] == {"database": "ok", "broker": "unreachable"}
    no_db = create_app({**stack_env, "DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/x"}).test_client()
    assert no_db.get("/readyz").get_json()["checks"]["database"] == "unreachable"


def test_json_logs_carry_the_job_id(client, make_user, stack, stack_env, log_dir):
    _, token = make_user()
    stack.worker.stop()  # so the JSON-logging worker is the one that runs the job
    worker = Process("json-worker", worker_command(concurrency=1), {**stack_env, "LOG_FORMAT": "json"}, log_dir).start()
    try:
        job_id = upload(client, token, prompt="[fail:1]").get_json()["id"]
        wait_terminal(client, token, job_id)
    finally:
        worker.stop()
        stack.restart_worker()
    entries = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "prefix", "job_id", "request_id", "message"} <= set(entry) for entry in entries)
    mine = [entry for entry in entries if entry["job_id"] == job_id]
    assert {entry["prefix"] for entry in mine} & {"🔧 [JOB_PROCESSOR]", "❌ [ERROR_HANDLER]", "✅ [QUEUED_PHOTO_RENDER]"}


DOCUMENTED_VARIABLES = {
    "DATABASE_URL", "REDIS_URL", "APP_ENV", "MAX_RETRIES", "RETRY_DELAYS", "CONCURRENT_JOBS", "QUEUE_CHECK_INTERVAL",
    "COMPLETED_JOB_TTL", "BACKGROUND_PROCESSING_INTERVAL", "MAX_CONCURRENT_BACKGROUND_TASKS",
    "MAX_BACKGROUND_RETRY_AGE", "MAX_RETRY_ATTEMPTS", "GENERATOR_URL", "GENERATOR_MAX_INFLIGHT", "WEBHOOK_SECRET",
    "FLOWER_BASIC_AUTH", "MEDIA_ROOT", "MAX_UPLOAD_BYTES", "DEFAULT_LOCALE", "NOTIFY_ON_FAILURE", "LOG_FORMAT",
    "PORT", "GENERATOR_PORT", "FLOWER_PORT",
}


def procfile() -> dict:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def test_compose_runs_the_procfile_commands_with_every_setting():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "web", "worker", "maintenance", "webhooks", "beat",
                             "flower", "generator"}
    assert services["postgres"]["healthcheck"] and services["redis"]["healthcheck"]
    assert services["postgres"]["volumes"] and services["redis"]["volumes"]
    assert services["migrate"]["command"] == "flask --app webapp db upgrade"
    for name, command in procfile().items():
        service = services[name]
        environment = service["environment"]
        assert DOCUMENTED_VARIABLES <= set(environment), (name, DOCUMENTED_VARIABLES - set(environment))
        # the Procfile line, with its defaults filled from the container's environment
        values = {key: str(value) for key, value in environment.items()}
        expected = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}",
                          lambda match: values.get(match.group(1)) or match.group(2) or "${%s}" % match.group(1),
                          command)
        actual = re.sub(r"\$\{(\w+)(?::[-?][^}]*)?\}", lambda match: values.get(match.group(1), "${%s}" % match.group(1)),
                        service["command"])
        assert actual == expected, name
    for name in ("web", "worker", "maintenance", "webhooks", "beat", "flower"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_procfile_processes_bind_loopback_by_default():
    for name, command in procfile().items():
        if "--bind" in command or "--address" in command:
            assert "${BIND_HOST:-127.0.0.1}" in command, name
