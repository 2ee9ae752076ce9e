"""OpenTelemetry traces: one trace follows a job from its POST through every attempt, the
generator call and the webhook, across the web, worker and webhooks processes.

Off unless the settings name an exporter (OTEL_EXPORTER_OTLP_ENDPOINT, or
OTEL_TRACES_EXPORTER=console). Off, only the OpenTelemetry API is imported: its tracer makes
no spans, nothing is instrumented and nothing is exported. On, `setup` gives the process a
tracer provider (after any fork: each process exports on its own), instruments Flask, Celery,
requests and SQLAlchemy, and adds renderq's part:

- every span started while a job's work runs (renderq.logs.current_job_id is set) carries
  `job.id`, and so does the span that work runs inside (the request that made the job, the
  task that runs it) once the job is known (`mark_job`);
- the submitting request's W3C traceparent is stored on the job row, and every message sent
  for the job is sent in that trace (`job_context`), whichever process sends it: a worker that
  finishes one job and dispatches the next sends the next one's attempt in the next one's trace.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import uuid
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Union

from flask import Flask
from opentelemetry import context, trace
from opentelemetry.propagate import inject
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from renderq.logs import current_job_id, job_logging

log = logging.getLogger(__name__)

JOB_ID = "job.id"
# Probes and scrapes would each make a trace of their own, every few seconds, about nothing.
DEFAULT_EXCLUDED_URLS = "healthz,readyz,metrics"

_W3C = TraceContextTextMapPropagator()  # what the job row stores, whatever OTEL_PROPAGATORS says
_state: dict[str, Any] = {}  # this process's provider once set up
_publishing = threading.local()  # the producer span of the message this thread is sending


def enabled() -> bool:
    return "provider" in _state


def setup(app: Flask, service: str) -> bool:
    """Trace this process as `service` (OTEL_SERVICE_NAME overrides it) if the settings turn
    traces on; True if they do. Call it in the process that does the work, after any fork."""
    settings = app.extensions["renderq.settings"]
    if not settings.traces_exporter:
        return False
    if enabled():
        return True
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = settings.service_name or service
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(_job_id_processor())
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
    trace.set_tracer_provider(provider)
    _state["provider"] = provider
    _instrument(app)
    log.info("traces on: %s as %s to %s", settings.traces_exporter, name,
             settings.traces_endpoint if settings.traces_exporter == "otlp" else "stderr")
    return True


def shutdown() -> None:
    """Export what is left before the process ends (a prefork child may skip atexit)."""
    provider = _state.pop("provider", None)
    if provider is not None:
        provider.shutdown()


def _exporter(settings: Any) -> Any:
    if settings.traces_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # One JSON line a span, on the real stderr: Celery redirects sys.stdout into its log.
        return ConsoleSpanExporter(out=sys.__stderr__, formatter=lambda span: span.to_json(indent=None) + os.linesep)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # Headers, timeout, compression and certificates come from the OTEL_EXPORTER_OTLP_* variables.
    return OTLPSpanExporter(endpoint=settings.traces_endpoint)


def _instrument(app: Flask) -> None:
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    from renderq.db import db

    FlaskInstrumentor.instrument_app(
        app, enable_commenter=False,
        excluded_urls=os.environ.get("OTEL_PYTHON_FLASK_EXCLUDED_URLS", DEFAULT_EXCLUDED_URLS))
    _celery_instrumentor().instrument()
    RequestsInstrumentor().instrument()
    with app.app_context():
        SQLAlchemyInstrumentor().instrument(engine=db.engine)


def _job_id_processor() -> Any:
    from opentelemetry.sdk.trace import SpanProcessor

    class JobIdSpanProcessor(SpanProcessor):
        """Stamps the job the current work belongs to on every span it starts: the job of the
        logging context, or else the job of the parent span in this process (a task's span is
        marked as the task starts; Celery's retry publishes outside renderq's code)."""

        def on_start(self, span: Any, parent_context: Optional[context.Context] = None) -> None:
            parent_attributes = getattr(trace.get_current_span(parent_context), "attributes", None) or {}
            job_id = current_job_id.get() or parent_attributes.get(JOB_ID)
            if job_id:
                span.set_attribute(JOB_ID, job_id)

    return JobIdSpanProcessor()


def _celery_instrumentor() -> Any:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor, utils

    class RenderqCeleryInstrumentor(CeleryInstrumentor):
        """The maintained instrumentation, but publishing is traced the same way whether or not
        this process defines the task: the web sends attempts by name, and for a task it does
        not know the upstream handler leaves its producer span open and current forever. And a
        run's span is kept by task id and thread: every message of a job has the job's id as its
        task id, and the upstream key (the task id alone) let a countdown message finishing in
        one thread end the span of the attempt it had just dispatched in another."""

        def _trace_prerun(self, *args: Any, **kwargs: Any) -> None:
            super()._trace_prerun(*args, **_run_keyed(kwargs))

        def _trace_postrun(self, *args: Any, **kwargs: Any) -> None:
            super()._trace_postrun(*args, **_run_keyed(kwargs))

        @staticmethod
        def _trace_failure(*args: Any, **kwargs: Any) -> None:
            CeleryInstrumentor._trace_failure(*args, **_run_keyed(kwargs))

        @staticmethod
        def _trace_retry(*args: Any, **kwargs: Any) -> None:
            request = kwargs.get("request")
            if request is not None:
                kwargs = {**kwargs, "request": SimpleNamespace(id=_run_key(request.id))}
            CeleryInstrumentor._trace_retry(*args, **kwargs)

        def _trace_before_publish(self, *args: Any, **kwargs: Any) -> None:
            headers, name = kwargs.get("headers"), kwargs.get("sender")
            if not headers or not headers.get("id"):
                return
            span = self._tracer.start_span("apply_async/%s" % name, kind=trace.SpanKind.PRODUCER, attributes={
                "celery.action": "apply_async", "celery.task_name": str(name),
                "messaging.message.id": headers["id"]})
            utils.set_attributes_from_context(span, kwargs)
            inject(headers, context=trace.set_span_in_context(span))  # the consumer's span is its child
            _end_publish_span(failed=True)  # a send that raised before its after_task_publish
            _publishing.span = span

        @staticmethod
        def _trace_after_publish(*args: Any, **kwargs: Any) -> None:
            _end_publish_span(failed=False)

    return RenderqCeleryInstrumentor()


def _run_key(task_id: Optional[str]) -> Optional[str]:
    return None if task_id is None else "%s@%d" % (task_id, threading.get_ident())


def _run_keyed(kwargs: dict) -> dict:
    return {**kwargs, "task_id": _run_key(kwargs.get("task_id"))}


def _end_publish_span(failed: bool) -> None:
    span = getattr(_publishing, "span", None)
    _publishing.span = None
    if span is not None:
        if failed:
            span.set_status(trace.Status(trace.StatusCode.ERROR, "the message was not published"))
        span.end()


def mark_job(job_id: Union[uuid.UUID, str]) -> None:
    """Put `job.id` on the span the current work runs in: the request that made the job, the
    task that runs its attempt or delivers its webhook. Spans started inside it get it anyway."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(JOB_ID, str(job_id))


def current_traceparent() -> Optional[str]:
    """The W3C traceparent of the current span, to store on a job; None when nothing traces."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def job_context(job_id: Optional[uuid.UUID], trace_parent: Optional[str]) -> Iterator[None]:
    """Send a message for a job inside the job's own trace: where the current span belongs to
    another trace (a worker dispatching the next job, the reconciler), the stored traceparent
    of the submission is the parent (no stored one: a trace of the job's own); spans started
    inside carry the job's id."""
    if not enabled() or job_id is None:
        yield
        return
    stored = _W3C.extract({"traceparent": trace_parent}) if trace_parent else context.Context()
    stored_trace = trace.get_current_span(stored).get_span_context()
    current_trace = trace.get_current_span().get_span_context()
    same_trace = stored_trace.is_valid and current_trace.is_valid and stored_trace.trace_id == current_trace.trace_id
    token = None if same_trace else context.attach(stored)
    try:
        with job_logging(job_id):
            yield
    finally:
        if token is not None:
            context.detach(token)


@contextlib.contextmanager
def handed_over_attempt(job_id: uuid.UUID, trace_parent: Optional[str]) -> Iterator[None]:
    """An attempt a worker thread runs because its slot was handed to the job, with no message
    of its own: in the job's trace, a span named as the attempt task's run would be."""
    with job_context(job_id, trace_parent):
        if not enabled():
            yield
            return
        with trace.get_tracer(__name__).start_as_current_span(
                "run/renderq.jobs.attempt", kind=trace.SpanKind.CONSUMER,
                attributes={JOB_ID: str(job_id), "renderq.handed_over": True}):
            yield


class ClientCall:
    """An outgoing HTTP call's span, and the headers that carry its context to the server."""

    def __init__(self, span: trace.Span, headers: dict[str, str]):
        self.span = span
        self.headers = headers

    def answered(self, status: int) -> None:
        if self.span.is_recording():
            self.span.set_attribute("http.status_code", status)
            if status >= 400:
                self.span.set_status(trace.Status(trace.StatusCode.ERROR))


@contextlib.contextmanager
def client_call(name: str, method: str, url: str) -> Iterator[ClientCall]:
    """A CLIENT span `name` for an HTTP call renderq makes without requests (webhooks use
    http.client). Only the scheme, host and port are recorded: a receiver's path or query may
    hold a secret."""
    if not enabled():
        yield ClientCall(trace.INVALID_SPAN, {})
        return
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    attributes = {"http.method": method, "server.address": parts.hostname or "", "url.scheme": parts.scheme}
    if parts.port:
        attributes["server.port"] = parts.port
    with trace.get_tracer(__name__).start_as_current_span(name, kind=trace.SpanKind.CLIENT,
                                                          attributes=attributes) as span:
        headers: dict[str, str] = {}
        inject(headers)
        yield ClientCall(span, headers)


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Housekeeping that would only add a trace of its own every few seconds (a worker's lease
    renewals) runs with instrumentation suppressed."""
    if not enabled():
        yield
        return
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield
