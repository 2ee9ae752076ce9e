"""HTTP surface of the reference generator: renders, health, and the call counters tests inspect."""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Mapping

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from generator import styles
from generator.faults import CallTracker, ConcurrencyGate, FaultSettings, parse_directives

log = logging.getLogger("generator")

KINDS = ("photo.render", "image.generate")
# Far above any photo a test sends, but bounded so one upload cannot exhaust memory.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024


class ApiError(Exception):
    """A refusal with a JSON body {"error": code}; raised anywhere in a render, answered in one place."""

    def __init__(self, status: int, code: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.headers = dict(headers or {})


def _error(status: int, code: str, headers: Mapping[str, str] | None = None) -> Response:
    resp = jsonify({"error": code})
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    """Build the app; faults come from `env` (default os.environ) and are fixed for the app's life."""
    settings = FaultSettings.from_env(os.environ if env is None else env)
    tracker = CallTracker()
    gate = ConcurrencyGate(settings.max_concurrency)
    rng = random.Random()

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    # Exposed so in-process tests can read counters without going through HTTP.
    app.extensions["generator"] = {"settings": settings, "tracker": tracker}
    _ensure_logging()

    def render_png(job_call: int) -> bytes:
        directives = parse_directives(request.form.get("prompt", ""))
        # Order is part of the contract: sleeps always happen, then scripted failures, then refusals.
        delay_ms = settings.latency_ms + directives.slow_ms
        if delay_ms:
            time.sleep(delay_ms / 1000.0)
        if settings.failure_rate and rng.random() < settings.failure_rate:
            raise ApiError(503, "GENERATOR_BUSY")
        if job_call <= directives.fail:
            raise ApiError(503, "GENERATOR_BUSY")
        if directives.block:
            raise ApiError(422, directives.block)
        if directives.invalid:
            raise ApiError(400, "INVALID_INPUT")

        kind = request.form.get("kind", "")
        style = request.form.get("style", "")
        if kind not in KINDS or style not in styles.STYLES:
            raise ApiError(400, "INVALID_INPUT")
        if style == "unfiltered" and request.form.get("safety_agreed", "").strip().lower() != "true":
            raise ApiError(422, "SAFETY_AGREEMENT_REQUIRED")

        if kind == "photo.render":
            upload = request.files.get("image")
            if upload is None:
                raise ApiError(400, "INVALID_INPUT")
            try:
                base = styles.load_image(upload.read())
            except styles.InvalidImage as exc:
                log.info("rejecting upload: %s", exc)
                raise ApiError(400, "INVALID_INPUT") from None
        else:
            base = styles.generate_base(request.form.get("prompt", ""))
        return styles.to_png(styles.apply_style(style, base))

    @app.post("/v1/renders")
    def renders() -> Response:
        job_id = request.headers.get("X-Job-Id", "").strip() or "anonymous"
        started = time.monotonic()
        job_call = tracker.begin(job_id)
        try:
            # Refused before any sleep: a rate limit that made callers wait would hide the overload.
            if not gate.try_enter():
                resp = _error(429, "RATE_LIMITED", {"Retry-After": "1"})
            else:
                try:
                    resp = Response(render_png(job_call), status=200, mimetype="image/png")
                except ApiError as exc:
                    resp = _error(exc.status, exc.code, exc.headers)
                except HTTPException as exc:  # e.g. 413 or a malformed multipart body
                    resp = _error(exc.code or 400, "INVALID_INPUT")
                finally:
                    gate.leave()
        finally:
            # Decremented before the response is written, so a caller's prompt retry never looks concurrent.
            tracker.end(job_id)
        # The caller's trace context (W3C), so a render can be found from the caller's trace.
        log.info("render job=%s call=%d status=%d ms=%d traceparent=%s", job_id, job_call, resp.status_code,
                 (time.monotonic() - started) * 1000, request.headers.get("traceparent", "-"))
        return resp

    @app.get("/v1/calls/<job_id>")
    def job_calls(job_id: str) -> Response:
        return jsonify({"job_id": job_id, **tracker.job(job_id)})

    @app.get("/v1/stats")
    def stats() -> Response:
        return jsonify(tracker.totals())

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        # Clients parse every error body as JSON, including 404/405 from a wrong URL.
        return _error(exc.code or 500, (exc.name or "ERROR").upper().replace(" ", "_"))

    log.info("generator ready: failure_rate=%s latency_ms=%d max_concurrency=%d",
             settings.failure_rate, settings.latency_ms, settings.max_concurrency)
    return app


def _ensure_logging() -> None:
    # gunicorn configures only its own loggers; without this our per-call lines would be dropped.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
