"""HTTP surface of the reference generator: renders, health, and the call counters tests inspect.

Faults are set by the environment (generator.faults.FaultSettings: GENERATOR_FAILURE_RATE,
GENERATOR_LATENCY_MS, GENERATOR_MAX_CONCURRENCY, GENERATOR_429_RATE with
GENERATOR_429_RETRY_AFTER, GENERATOR_HANG_RATE with GENERATOR_HANG_MS, GENERATOR_GARBAGE_RATE,
GENERATOR_SEED) and by directives in the prompt; GENERATOR_CALL_LOG=path appends every call
to a JSON-lines file (generator.faults.CallLog).
"""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Mapping

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from generator import styles
from generator.faults import CallLog, CallTracker, ConcurrencyGate, FaultSettings, parse_directives

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
    env = os.environ if env is None else env
    settings = FaultSettings.from_env(env)
    tracker = CallTracker()
    gate = ConcurrencyGate(settings.max_concurrency)
    rng = random.Random(settings.seed)
    call_log = CallLog(env["GENERATOR_CALL_LOG"]) if env.get("GENERATOR_CALL_LOG") else None

    def chance(rate: float) -> bool:
        # No draw at all for a fault that is off, so setting one fault leaves the others' draws alone.
        return bool(rate) and rng.random() < rate

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    # Exposed so in-process tests can read counters without going through HTTP.
    app.extensions["generator"] = {"settings": settings, "tracker": tracker}
    _ensure_logging()

    def render_png(job_call: int, faults: list[str]) -> bytes:
        directives = parse_directives(request.form.get("prompt", ""))
        # Order is part of the contract: sleeps always happen (a hang is a very long one), then
        # scripted failures, then refusals.
        delay_ms = settings.latency_ms + directives.slow_ms
        if chance(settings.hang_rate):
            faults.append("hang")
            delay_ms += settings.hang_ms
        if delay_ms:
            time.sleep(delay_ms / 1000.0)
        if chance(settings.failure_rate):
            faults.append("failure_rate")
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
        logged = call_log.begin(job_id) if call_log else None
        faults: list[str] = []
        job_call = tracker.begin(job_id)
        try:
            asked = parse_directives(request.form.get("prompt", ""))
            # Refused before any sleep: a rate limit that made callers wait would hide the overload.
            if asked.ratelimit_seconds and job_call == 1:
                faults.append("rate_limit")
                resp = _error(429, "RATE_LIMITED", {"Retry-After": str(asked.ratelimit_seconds)})
            elif chance(settings.rate_limit_rate):
                faults.append("rate_limit")
                resp = _error(429, "RATE_LIMITED", {"Retry-After": str(settings.rate_limit_retry_after)})
            elif not gate.try_enter():
                resp = _error(429, "RATE_LIMITED", {"Retry-After": "1"})
            else:
                try:
                    resp = Response(render_png(job_call, faults), status=200, mimetype="image/png")
                    if chance(settings.garbage_rate) or (asked.garbage and job_call == 1):
                        faults.append("garbage")
                        resp = _garbage(resp.get_data(), rng)
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
        log.info("render job=%s call=%d status=%d ms=%d traceparent=%s%s", job_id, job_call, resp.status_code,
                 (time.monotonic() - started) * 1000, request.headers.get("traceparent", "-"),
                 " fault=" + ",".join(faults) if faults else "")
        if logged is not None:
            call_log.end(logged, resp.status_code, ",".join(faults) or None)
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

    log.info("generator ready: failure_rate=%s latency_ms=%d max_concurrency=%d 429_rate=%s hang_rate=%s "
             "hang_ms=%d garbage_rate=%s call_log=%s", settings.failure_rate, settings.latency_ms,
             settings.max_concurrency, settings.rate_limit_rate, settings.hang_rate, settings.hang_ms,
             settings.garbage_rate, env.get("GENERATOR_CALL_LOG") or "-")
    return app


def _garbage(png: bytes, rng: random.Random) -> Response:
    """A 200 that is not an image, as a misbehaving API or proxy sends one: either an HTML
    error page, or a PNG cut short under the image/png type."""
    if rng.random() < 0.5:
        return Response("<html><body><h1>502 Bad Gateway</h1></body></html>", status=200, mimetype="text/html")
    return Response(png[:max(8, len(png) // 3)], status=200, mimetype="image/png")


def _ensure_logging() -> None:
    # gunicorn configures only its own loggers; without this our per-call lines would be dropped.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
