"""Operating renderq: TTL cleanup, /metrics, /readyz, JSON logs, and compose matching the Procfile."""
from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
import redis
import requests
import yaml
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from renderq.broker import BACKGROUND_RUNS_KEY
from renderq.db import db
from renderq.models import Job, LedgerEntry, Notification, Photo
from renderq.storage import storage
from tests.conftest import BASE_DATABASE_URL, job_json, png_bytes, upload, wait_terminal
from tests.support import (
    BIN,
    ROOT,
    PrivateRedis,
    Process,
    create_database,
    drop_database,
    free_port,
    side_processes,
    start_generator,
    wait_for,
    wait_for_health,
    worker_command,
)


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
    assert "# TYPE renderq_attempts_total counter" in body
    assert metric(body, "renderq_attempts_total", kind="photo.render", outcome="transient", retry="false") >= 1
    assert metric(body, "renderq_attempts_total", kind="photo.render", outcome="succeeded", retry="true") >= 1
    assert metric(body, "renderq_attempt_duration_seconds_count", kind="photo.render") >= 3
    assert metric(body, "renderq_jobs_waiting", status="pending") >= 0
    assert metric(body, "renderq_oldest_waiting_job_age_seconds") >= 0
    assert metric(body, "renderq_attempt_slots") == 2 and metric(body, "renderq_attempt_slots_busy") >= 0
    assert metric(body, "renderq_generator_calls_in_flight") >= 0 and metric(body, "renderq_generator_cap") == 0
    assert metric(body, "renderq_broker_queue_depth") >= 0
    assert metric(body, "renderq_background_processor_runs_total") >= 1
    assert time.time() - metric(body, "renderq_maintenance_last_run_timestamp_seconds", task="reconcile") < 10


def test_counts_equal_a_full_count_after_a_mixed_run_and_a_cleanup(app, client, make_user, stack):
    _, token = make_user(balance=100)
    prompts = ["", "[fail:1]", "[invalid]", "[block:COPYRIGHT_VIOLATION]", "[fail:99]"] * 4
    jobs = [upload(client, token, prompt=prompt).get_json()["id"] for prompt in prompts]
    for job_id in jobs[:8]:
        client.post("/api/jobs/%s/cancel" % job_id, headers=auth(token))
    for job_id in jobs[8:16]:
        wait_terminal(client, token, job_id)
    with app.app_context():  # half of those finished are past COMPLETED_JOB_TTL; cleanup takes them
        db.session.execute(text("UPDATE jobs SET completed_at = now() - interval '2 days' WHERE id = ANY(:ids) "
                                "AND completed_at IS NOT NULL"), {"ids": [uuid.UUID(j) for j in jobs[8:12]]})
        db.session.commit()
    app.extensions["celery"].send_task("renderq.maintenance.cleanup")
    wait_for(lambda: client.get("/api/jobs/%s" % jobs[8], headers=auth(token)).status_code == 404,
             what="cleanup to purge the old jobs")
    # jobs are still moving (retries of [fail:99]) while the counts are compared: each read is one
    # snapshot of the counters, compared with a GROUP BY in the same snapshot
    for _ in range(5):
        with app.app_context():
            db.session.execute(text("BEGIN ISOLATION LEVEL REPEATABLE READ"))
            from renderq.stats import counts

            by_status, by_kind = counts()
            full = dict(db.session.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
            kinds = {(kind, status): count for kind, status, count in db.session.execute(
                text("SELECT kind, status, count(*) FROM jobs GROUP BY 1, 2")).all()}
            db.session.rollback()
        assert {status: count for status, count in by_status.items() if count} == full
        assert {(kind, status): count for kind, statuses in by_kind.items() for status, count in statuses.items()
                if count} == kinds
        time.sleep(0.3)
    for job_id in jobs:
        client.post("/api/jobs/%s/cancel" % job_id, headers=auth(token))


def test_readyz_names_what_is_down(client, stack_env):
    from webapp import create_app

    assert client.get("/readyz").status_code == 200
    cut_off = create_app({**stack_env, "REDIS_URL": "redis://127.0.0.1:1/0"}).test_client().get("/readyz")
    assert cut_off.status_code == 503 and cut_off.get_json()["checks"] == {"database": "ok", "broker": "unreachable"}
    no_db = create_app({**stack_env, "DATABASE_URL": "postgresql+psycopg://postgres@127.0.0.1:1/x"}).test_client()
    assert no_db.get("/readyz").get_json()["checks"]["database"] == "unreachable"


class WebhookReceiver:
    """A real HTTP endpoint that accepts every webhook and keeps the bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = "http://127.0.0.1:%d/hooks" % self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def json_entries(path: Path) -> tuple[list[dict], list[str]]:
    """A log's lines as JSON objects, and the lines that are not one."""
    entries, others = [], []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        (entries.append(entry) if isinstance(entry, dict) else others.append(line))
    return entries, others


class JsonSystem:
    """Every process of the Procfile but Flower with LOG_FORMAT=json, on a database and a Redis
    of their own, with DATABASE_URL as users write it (postgresql://, no driver)."""

    NAMES = ("migrate", "cli", "web", "generator", "worker", "maintenance", "webhooks", "beat")

    def __init__(self, stack_env: dict, tmp_path: Path):
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.database_url = create_database(BASE_DATABASE_URL, prefix="renderq_json")
        self.broker = PrivateRedis(tmp_path, tmp_path).start()
        plain = make_url(self.database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.env = {**stack_env, "LOG_FORMAT": "json", "REDIS_URL": self.broker.url, "DATABASE_URL": plain,
                    "MEDIA_ROOT": str(tmp_path / "media")}
        self.web = "http://127.0.0.1:%d" % free_port()
        self.processes: list[Process] = []

    def start(self) -> "JsonSystem":
        self.flask("migrate", "db", "upgrade")  # compose's one-shot migrate service
        generator, self.env["GENERATOR_URL"] = start_generator(self.env, self.logs)
        web = Process("web", [str(BIN / "gunicorn"), "--bind", self.web[7:], "--workers", "1", "--threads", "4",
                              "webapp:create_app()"], self.env, self.logs)
        worker = Process("worker", worker_command(concurrency=1), self.env, self.logs)
        self.processes = [generator] + [process.start() for process in [web, worker, *side_processes(self.env, self.logs)]]
        wait_for_health(self.web, timeout=30, what="the JSON-logging web process")
        return self

    def flask(self, log_name: str, *args: str) -> str:
        """A flask command; its log lines (stderr) go to `log_name`.log, its answer is returned."""
        done = subprocess.run([str(BIN / "flask"), "--app", "webapp", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        (self.logs / ("%s.log" % log_name)).write_text(done.stderr)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes = []

    def remove(self) -> None:
        self.stop()
        self.broker.process.kill()
        drop_database(self.database_url)

    def entries(self) -> dict[str, list[dict]]:
        """Each process's log as JSON objects; fails naming every line that is not one."""
        entries, others = {}, {}
        for name in self.NAMES:
            entries[name], others[name] = json_entries(self.logs / ("%s.log" % name))
        assert not any(others.values()), {name: lines[:5] for name, lines in others.items() if lines}
        return entries


@pytest.fixture()
def json_system(stack_env, tmp_path) -> Iterator[JsonSystem]:
    system = JsonSystem(stack_env, tmp_path)
    try:
        yield system.start()
    finally:
        system.remove()


def test_with_log_format_json_every_line_every_process_writes_is_json(json_system):
    system, web = json_system, json_system.web
    token = system.flask("cli", "users", "create", "--email", "json@example.com", "--balance", "5").split()[-1]
    headers = {"Authorization": "Bearer " + token}
    receiver = WebhookReceiver()
    try:
        assert requests.patch(web + "/api/me", json={"webhook_url": receiver.url}, headers=headers,
                              timeout=10).status_code == 200
        submitted = requests.post(web + "/api/photos", headers={**headers, "X-Request-Id": "json-logs-test"},
                                  files={"file": ("p.png", png_bytes())}, data={"prompt": "[fail:1]"}, timeout=10)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        wait_for(lambda: requests.get(web + "/api/jobs/" + job_id, headers=headers, timeout=10).json()["status"]
                 == "completed", timeout=60, what="the job to complete")
        wait_for(lambda: receiver.bodies, timeout=30, what="its webhook")
        sweeps = redis.Redis.from_url(system.env["REDIS_URL"])
        wait_for(lambda: int(sweeps.get(BACKGROUND_RUNS_KEY) or 0) >= 4, timeout=30, what="beat's sweeps to run a while")
    finally:
        receiver.server.shutdown()
    system.stop()  # their shutdown lines too
    logs = system.entries()

    assert all({"time", "level", "logger", "prefix", "job_id", "request_id", "message"} <= set(entry)
               for name in logs for entry in logs[name])
    assert {name for name in logs if not logs[name]} == {"cli"}  # users create has nothing to log
    assert any("Running upgrade" in entry["message"] for entry in logs["migrate"])
    # gunicorn's access log: the request, with the id the caller sent
    access = [entry for entry in logs["web"] if entry["logger"] == "gunicorn.access"]
    assert {"method": "POST", "path": "/api/photos", "status": 202, "request_id": "json-logs-test"}.items() <= \
        next(entry for entry in access if entry["path"] == "/api/photos").items()
    assert all(isinstance(entry["duration_ms"], float) for entry in access)
    assert any(entry["logger"] == "gunicorn.error" and entry["message"].startswith("Booting worker") for entry in logs["web"])
    assert any(entry.get("path") == "/v1/renders" and entry["status"] == 503 for entry in logs["generator"])
    # the attempts, by job id; Celery's own lines, start-up to shutdown
    mine = {entry["prefix"] for entry in logs["worker"] if entry["job_id"] == job_id}
    assert {"🔧 [JOB_PROCESSOR]", "❌ [ERROR_HANDLER]", "✅ [QUEUED_PHOTO_RENDER]"} <= mine
    for name in ("worker", "maintenance", "webhooks"):
        messages = [entry["message"] for entry in logs[name]]
        assert any(" ready." in message for message in messages) and "worker: Warm shutdown (MainProcess)" in messages
    assert any("webhook" in entry["message"] and "delivered" in entry["message"] for entry in logs["webhooks"])
    assert any(entry["message"] == "beat: Starting..." for entry in logs["beat"])
    # beat's sweeps ran every half second all along and said nothing: they did nothing
    for name in ("maintenance", "beat"):
        assert not [entry for entry in logs[name] if "renderq.queue.reconcile" in entry["message"]
                    or "renderq.background.process" in entry["message"] or "nothing to do" in entry["message"]], name
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
    # what dies is started again; a worker stopping gets longer than any attempt may run
    for name in set(services) - {"migrate"}:
        assert services[name]["restart"] == "unless-stopped", name
    from config.kinds import longest_hard_time_limit

    assert int(services["worker"]["stop_grace_period"].rstrip("s")) > longest_hard_time_limit()


def test_procfile_processes_bind_loopback_by_default():
    for name, command in procfile().items():
        if "--bind" in command or "--address" in command:
            assert "${BIND_HOST:-127.0.0.1}" in command, name
