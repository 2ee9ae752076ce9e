"""Traces: one job followed across the real processes by its trace.

The stack here is the test's own (a database, a private Redis, a generator, gunicorn, a
prefork attempts worker, the maintenance and webhooks consumers and beat), started with
OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/HTTP receiver in this process, which decodes
the protobuf export requests the processes send. The shared stack of the other tests runs with
tracing off and is what the last tests look at.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Iterator

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from config import ConfigError, load_settings
from tests.conftest import (
    BASE_DATABASE_URL,
    FAST_TIMINGS,
    WEBHOOK_ALLOWED_NETWORKS,
    WEBHOOK_SECRET,
    png_bytes,
)
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
from tests.test_webhook_delivery import Receiver, answer

ATTEMPT_RUN = "run/renderq.jobs.attempt"
DELIVERY_RUN = "run/renderq.notifications.deliver"
SPAN_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(any_value) -> object:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def decode(body: bytes) -> list[Span]:
    """The spans of one OTLP/HTTP protobuf export request."""
    export = ExportTraceServiceRequest()
    export.ParseFromString(body)
    spans = []
    for resource_spans in export.resource_spans:
        resource = {item.key: _value(item.value) for item in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(Span(str(resource.get("service.name")), span.trace_id.hex(), span.span_id.hex(),
                                  span.parent_span_id.hex(), span.name, SPAN_KINDS.get(span.kind, str(span.kind)),
                                  span.start_time_unix_nano, span.end_time_unix_nano,
                                  {item.key: _value(item.value) for item in span.attributes}))
    return spans


def otlp_answer(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
    body = ExportTraceServiceResponse().SerializeToString()
    handler.send_response(200 if handler.path == "/v1/traces" else 404)
    handler.send_header("Content-Type", "application/x-protobuf")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Collector:
    """An OTLP/HTTP traces endpoint: every span the traced processes export."""

    def __init__(self) -> None:
        self.receiver = Receiver(otlp_answer)
        self.endpoint = "http://127.0.0.1:%d" % self.receiver.port

    def spans(self) -> list[Span]:
        return [span for request in list(self.receiver.requests) if request.method == "POST"
                for span in decode(request.body)]

    def trace(self, trace_id: str) -> list[Span]:
        return sorted((span for span in self.spans() if span.trace_id == trace_id), key=lambda span: span.start_ns)

    def submission(self, job_id: str) -> Span:
        """The POST that made the job, once the web process has exported it."""
        return wait_for(lambda: next((span for span in self.spans() if span.name == "POST /api/photos"
                                      and span.attributes.get("job.id") == job_id), None),
                        timeout=20, what="the POST span of job %s" % job_id)

    def wait_for_trace(self, trace_id: str, complete, what: str) -> list[Span]:
        return wait_for(lambda: (lambda spans: spans if complete(spans) else None)(self.trace(trace_id)),
                        timeout=30, what=what)


@dataclass
class TracedStack:
    url: str
    token: str
    collector: Collector
    webhooks: Receiver
    log_dir: Path

    def submit(self, prompt: str = "") -> str:
        response = requests.post(self.url + "/api/photos", headers={"Authorization": "Bearer " + self.token},
                                 files={"file": ("photo.png", io.BytesIO(png_bytes()), "image/png")},
                                 data={"style": "sepia", "prompt": prompt}, timeout=30)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return requests.get(self.url + "/api/jobs/" + job_id, headers={"Authorization": "Bearer " + self.token},
                            timeout=10).json()

    def wait_completed(self, job_id: str, timeout: float = 60) -> dict:
        job = wait_for(lambda: (lambda job: job if job["status"] in ("completed", "failed", "canceled") else None)(
            self.job(job_id)), timeout=timeout, what="job %s to finish" % job_id)
        assert job["status"] == "completed", job
        return job


def untraced_environment(base: dict | None = None) -> dict:
    return {key: value for key, value in (os.environ if base is None else base).items()
            if not key.startswith(("OTEL_", "GENERATOR_"))}


def run(command: list[str], env: dict) -> str:
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Iterator[TracedStack]:
    log_dir = tmp_path_factory.mktemp("traced-logs")
    collector, webhooks = Collector(), Receiver(answer(204))
    database_url = create_database(BASE_DATABASE_URL)
    redis = PrivateRedis(tmp_path_factory.mktemp("traced-redis"), log_dir).start()
    env = {**untraced_environment(), **FAST_TIMINGS, "DATABASE_URL": database_url, "REDIS_URL": redis.url,
           "APP_ENV": "production", "WEBHOOK_SECRET": WEBHOOK_SECRET,
           "WEBHOOK_ALLOWED_NETWORKS": WEBHOOK_ALLOWED_NETWORKS,
           "MEDIA_ROOT": str(tmp_path_factory.mktemp("traced-media"))}
    processes: list[Process] = []
    try:
        run([str(BIN / "flask"), "--app", "webapp", "db", "upgrade"], env)
        token = run([str(BIN / "flask"), "--app", "webapp", "users", "create", "--email", "traced@example.com",
                     "--balance", "100", "--webhook-url", webhooks.url], env).strip().splitlines()[-1]
        generator, generator_url = start_generator(env, log_dir)
        processes.append(generator)
        # Spans leave each process within 0.2 s rather than the default 5 s.
        traced_env = {**env, "GENERATOR_URL": generator_url, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                      "OTEL_BSP_SCHEDULE_DELAY": "200"}
        url = "http://127.0.0.1:%d" % free_port()
        processes += [Process("worker", worker_command(2), traced_env, log_dir).start(),
                      *(process.start() for process in side_processes(traced_env, log_dir)),
                      Process("web", [str(BIN / "gunicorn"), "--bind", url[7:], "--workers", "2", "--threads", "4",
                                      "webapp:create_app()"], traced_env, log_dir).start()]
        wait_for_health(url, timeout=30, what="gunicorn")
        yield TracedStack(url, token, collector, webhooks, log_dir)
    finally:
        for process in reversed(processes):
            process.stop()
        redis.process.stop()
        drop_database(database_url)
        collector.receiver.close()
        webhooks.close()


def describe(spans: list[Span]) -> str:
    """The trace as an operator's tracing UI lists it: offset, duration, service, span, job."""
    by_id = {span.span_id: span for span in spans}
    start = min(span.start_ns for span in spans)

    def depth(span: Span) -> int:
        return 0 if span.parent_id not in by_id else 1 + depth(by_id[span.parent_id])

    return "\n".join("%8.1f ms %8.1f ms  %-19s %s%s [%s]%s" % (
        (span.start_ns - start) / 1e6, span.ms, span.service, "  " * depth(span), span.name, span.kind,
        "" if "job.id" in span.attributes else "  (no job.id)") for span in spans)


def only(spans: list[Span], **match: object) -> list[Span]:
    return [span for span in spans if all(getattr(span, key) == value for key, value in match.items())]


def generator_calls(spans: list[Span]) -> list[Span]:
    return [span for span in spans if span.kind == "client" and "/v1/renders" in str(span.attributes.get("http.url"))]


def test_one_trace_follows_a_job_from_its_post_to_the_generator_and_the_webhook(traced):
    job_id = traced.submit()
    traced.wait_completed(job_id)
    post = traced.collector.submission(job_id)
    assert (post.service, post.kind) == ("renderq-web", "server")

    def complete(spans: list[Span]) -> bool:
        return all((only(spans, name=ATTEMPT_RUN), generator_calls(spans), only(spans, name=DELIVERY_RUN),
                    only(spans, name="POST webhook")))

    spans = traced.collector.wait_for_trace(post.trace_id, complete, "the attempt, generator call and webhook spans")
    print("\ntrace %s of job %s:\n%s" % (post.trace_id, job_id, describe(spans)))
    attempt, = only(spans, name=ATTEMPT_RUN)
    call, = generator_calls(spans)
    delivery, = only(spans, name=DELIVERY_RUN)
    webhook, = only(spans, name="POST webhook")
    assert (attempt.service, attempt.kind) == ("renderq-worker", "consumer")
    assert (call.service, call.parent_id, call.attributes["http.status_code"]) == (
        "renderq-worker", attempt.span_id, 200)
    assert (delivery.service, webhook.service, webhook.parent_id) == ("renderq-webhooks", "renderq-webhooks",
                                                                       delivery.span_id)
    for span in (post, attempt, call, delivery, webhook):
        assert span.attributes.get("job.id") == job_id, span
    # Everything the worker did for the job carries its id, the database statements included.
    worker_spans = only(spans, service="renderq-worker")
    assert any(span.name.startswith("UPDATE") for span in worker_spans)
    assert all(span.attributes.get("job.id") == job_id for span in worker_spans), describe(worker_spans)
    # The generator and the webhook receiver were handed the trace (W3C traceparent).
    assert any(request.headers.get("traceparent", "").startswith("00-%s-" % post.trace_id)
               for request in traced.webhooks.requests)
    # Each process is a service of its own; beat's sweeps are traces of their own.
    wait_for(lambda: {"renderq-beat", "renderq-maintenance"} <= {span.service for span in traced.collector.spans()},
             timeout=20, what="beat's and the maintenance consumer's spans")
    generator_log = (traced.log_dir / "generator.log").read_text()
    handed = r"render job=%s call=1 status=200 .*traceparent=00-%s-%s-[0-9a-f]{2}" % (job_id, post.trace_id,
                                                                                    call.span_id)
    assert re.search(handed, generator_log), generator_log[-2000:]


def test_a_retry_keeps_both_attempts_in_the_submissions_trace(traced):
    job_id = traced.submit(prompt="[fail:1]")
    assert traced.wait_completed(job_id)["attempts"] == 2
    post = traced.collector.submission(job_id)

    def both_attempts(spans: list[Span]) -> bool:
        parents = {span.parent_id for span in generator_calls(spans)}
        return len(parents) == 2 and parents <= {span.span_id for span in spans}

    spans = traced.collector.wait_for_trace(post.trace_id, both_attempts, "both attempts in the submission's trace")
    print("\ntrace %s of job %s ([fail:1]):\n%s" % (post.trace_id, job_id, describe(spans)))
    first, second = generator_calls(spans)
    assert (first.attributes["http.status_code"], second.attributes["http.status_code"]) == (503, 200)
    runs = {span.span_id: span for span in only(spans, name=ATTEMPT_RUN, service="renderq-worker")}
    assert first.parent_id in runs and second.parent_id in runs and first.parent_id != second.parent_id
    for span in (first, second, runs[first.parent_id], runs[second.parent_id]):
        assert span.attributes.get("job.id") == job_id, span


def test_a_job_that_waited_for_a_slot_joins_its_own_submissions_trace(traced):
    """The worker that finishes one job runs the next one's attempt (its thread is handed the
    slot) or sends its message: either way in the next one's trace, not the finished one's."""
    slow = [traced.submit(prompt="[slow:1500]") for _ in range(2)]  # both of the worker's slots
    waiting = traced.submit()
    assert traced.job(waiting)["status"] == "pending"
    traced.wait_completed(waiting)
    post = traced.collector.submission(waiting)

    def run(spans: list[Span]) -> bool:
        runs = only(spans, name=ATTEMPT_RUN)
        return bool(runs and generator_calls(spans) and any(span.span_id == runs[0].parent_id for span in spans))

    spans = traced.collector.wait_for_trace(post.trace_id, run, "the waiting job's attempt in its own trace")
    attempt, = only(spans, name=ATTEMPT_RUN)
    parent, = [span for span in spans if span.span_id == attempt.parent_id]
    assert attempt.service == "renderq-worker" and attempt.attributes.get("job.id") == waiting
    if attempt.attributes.get("renderq.handed_over"):  # run by the thread whose slot it was handed, no message
        assert parent.span_id == post.span_id
    else:  # sent by another process than the POST (the worker, or the reconciler), yet in this trace
        assert parent.service != "renderq-web" and parent.kind == "producer" and parent.attributes.get("job.id") == waiting
    slow_traces = {traced.collector.submission(job_id).trace_id for job_id in slow}
    assert post.trace_id not in slow_traces
    for job_id in slow:
        traced.wait_completed(job_id)


def test_tracing_is_off_without_the_variables(client, make_user, stack, app):
    """The shared stack runs without OTEL_*: nothing is set up, instrumented or stored."""
    from sqlalchemy import select

    from renderq.db import db
    from renderq.models import Job
    from tests.conftest import upload, wait_terminal

    _, token = make_user()
    job_id = upload(client, token).get_json()["id"]
    assert wait_terminal(client, token, job_id)["status"] == "completed"
    with app.app_context():
        assert db.session.execute(select(Job.trace_parent).where(Job.id == uuid.UUID(job_id))).scalar() is None
    probe = """
import json, sys
import requests
from opentelemetry import trace
import tasks.celery
from renderq import tracing
from webapp import create_app
app = create_app()
print(json.dumps({"enabled": tracing.enabled(), "sdk": "opentelemetry.sdk" in sys.modules,
                  "instrumentation": [name for name in sys.modules if name.startswith("opentelemetry.instrumentation")],
                  "flask": getattr(app, "_is_instrumented_by_opentelemetry", False),
                  "requests": hasattr(requests.Session.send, "__wrapped__"),
                  "provider": type(trace.get_tracer_provider()).__name__}))
"""
    seen = json.loads(run([sys.executable, "-c", probe], untraced_environment(stack.env)).splitlines()[-1])
    assert seen == {"enabled": False, "sdk": False, "instrumentation": [], "flask": False, "requests": False,
                    "provider": "ProxyTracerProvider"}


def test_the_console_exporter_writes_one_json_line_a_span(stack):
    probe = """
from webapp import create_app
assert create_app().test_client().get("/openapi.json").status_code == 200
"""
    env = {**untraced_environment(stack.env), "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "renderq-probe"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    spans = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    request, = [span for span in spans if span["name"] == "GET /openapi.json"]
    assert request["resource"]["attributes"]["service.name"] == "renderq-probe"
    assert request["kind"] == "SpanKind.SERVER"


@pytest.mark.parametrize("variables, exporter, endpoint", [
    ({}, "", ""),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "otlp", "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector/traces"}, "otlp", "https://collector/traces"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console", ""),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, "", "http://c:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, "", "http://c:4318/v1/traces"),
])
def test_the_variables_that_turn_traces_on(variables: dict, exporter: str, endpoint: str):
    settings = load_settings(variables)
    assert (settings.traces_exporter, settings.traces_endpoint) == (exporter, endpoint)


@pytest.mark.parametrize("name, value", [
    ("OTEL_TRACES_EXPORTER", "zipkin"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
    ("OTEL_SDK_DISABLED", "maybe"),
])
def test_a_tracing_variable_renderq_cannot_use_stops_it_at_start_up(name: str, value: str):
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})


def test_two_runs_of_one_task_id_at_once_each_end_their_own_span():
    """Every message of a job shares its task id (a cancel revokes them all): a countdown
    message still finishing in one thread while the attempt it dispatched starts in another
    must not end the attempt's span."""
    import threading

    from celery import Celery, signals
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from renderq import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = tracing._celery_instrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        app = Celery("overlap", set_as_current=False)

        @app.task(name="renderq.jobs.attempt", shared=False)
        def attempt_task() -> None:
            pass

        app.finalize()
        task = app.tasks["renderq.jobs.attempt"]
        started, first_ended = threading.Event(), threading.Event()
        ended_early: list[int] = []

        def countdown() -> None:
            signals.task_prerun.send(sender=task, task_id="job-1", task=task, args=(), kwargs={})
            started.wait(5)
            signals.task_postrun.send(sender=task, task_id="job-1", task=task, args=(), kwargs={}, retval=None)
            first_ended.set()

        def attempt() -> None:
            signals.task_prerun.send(sender=task, task_id="job-1", task=task, args=(), kwargs={})
            started.set()
            first_ended.wait(5)
            ended_early.append(len(exporter.get_finished_spans()) - 1)  # any but the countdown's
            signals.task_postrun.send(sender=task, task_id="job-1", task=task, args=(), kwargs={}, retval=None)

        threads = [threading.Thread(target=countdown), threading.Thread(target=attempt)]
        threads[0].start()
        threads[1].start()
        for thread in threads:
            thread.join(10)
        assert ended_early == [0], "the attempt's span ended with the countdown's"
        assert len(exporter.get_finished_spans()) == 2
    finally:
        instrumentor.uninstrument()
