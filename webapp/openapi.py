"""GET /openapi.json: the OpenAPI 3.1 description of every endpoint.

tests/test_openapi.py checks it against the app's URL map and real answers, so it cannot drift.
"""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from webapp.openapi_schemas import (
    INTERNAL_JOB,
    JOB_REQUEST,
    ME_PATCH,
    PHOTO_REQUEST,
    REPLAY_REQUEST,
    SCHEMAS,
)

blueprint = Blueprint("openapi", __name__)


def ref(name: str) -> dict:
    return {"$ref": "#/components/schemas/%s" % name}


def json_body(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def page_of(schema: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["items", "next_cursor"],
            "properties": {"items": {"type": "array", "items": schema},
                           "next_cursor": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}


ERRORS = {
    "400": "The request is malformed; the message says what to fix",
    "401": "No valid bearer token",
    "402": "Not enough credits available",
    "403": "Not yours (or not an admin)",
    "404": "No such id",
    "405": "Method not allowed",
    "409": "The job is not in a state that allows it",
    "413": "The upload is larger than MAX_UPLOAD_BYTES",
    "415": "The body is not JSON",
    "422": "The Idempotency-Key was used with another body",
    "503": "The database is briefly unavailable (a restart); try again after Retry-After seconds",
}


def operation(summary: str, ok: dict, errors: str = "", *, public: bool = False, parameters: list | None = None,
              body: dict | None = None, ok_status: str = "200", extra: dict | None = None) -> dict:
    responses = {ok_status: ok, **(extra or {})}
    for status in errors.split() + ([] if public else ["503"]):  # every signed-in call reads PostgreSQL
        responses[status] = json_body(ref("Error"), ERRORS[status])
    spec: dict = {"summary": summary, "responses": responses}
    if public:
        spec["security"] = []
    if parameters:
        spec["parameters"] = parameters
    if body:
        spec["requestBody"] = body
    return spec


def path_id(name: str, schema: dict) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


JOB_ID = path_id("job_id", {"type": "string", "format": "uuid"})
PHOTO_ID = path_id("photo_id", {"type": "string", "format": "uuid"})
PAGING = [query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "page size (20)"),
          query("cursor", {"type": "string"}, "next_cursor of the previous page")]
STATUS = query("status", {"type": "string", "enum": list(SCHEMAS["Job"]["properties"]["status"]["enum"])}, "only this status")
USER_FILTER = query("user_id", {"type": "integer", "minimum": 1}, "only this user's jobs")
SUBMIT_HEADERS = [
    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "minLength": 1, "maxLength": 255},
     "description": "same key and body within 24 h: the same job, no second hold"},
    {"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string", "pattern": "^wait=([0-9]|[12][0-9]|30)$"},
     "description": "wait=N (N <= 30): hold the answer up to N seconds for a terminal state"},
]
JOB = json_body(ref("Job"), "The job")
ACCEPTED = {"202": json_body(ref("Job"), "Accepted: the job, still running")}
PNG = {"description": "The rendered image", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}


def document() -> dict:
    submit = dict(errors="400 401 402 404 413 415 422", parameters=SUBMIT_HEADERS, extra=ACCEPTED)
    paths = {
        "/api/photos": {"post": operation(
            "Upload a photo and render it", json_body(ref("Job"), "Finished within Prefer: wait"),
            body={"required": True, "content": {"multipart/form-data": {"schema": PHOTO_REQUEST}}}, **submit)},
        "/api/jobs": {"post": operation(
            "Create a job from JSON (kinds that need no upload, or an uploaded photo_id)",
            json_body(ref("Job"), "Finished within Prefer: wait"),
            body={"required": True, "content": {"application/json": {"schema": JOB_REQUEST}}}, **submit)},
        "/api/photos/{photo_id}/status": {"get": operation(
            "The latest job of a photo", JOB, "401 403 404", parameters=[PHOTO_ID])},
        "/api/photos/{photo_id}/result": {"get": operation(
            "The rendered image of a photo's latest job", PNG, "401 403 404 409", parameters=[PHOTO_ID])},
        "/api/jobs/{job_id}": {"get": operation("A job", JOB, "401 403 404", parameters=[JOB_ID])},
        "/api/jobs/{job_id}/result": {"get": operation(
            "A job's rendered image", PNG, "401 403 404 409", parameters=[JOB_ID])},
        "/api/jobs/{job_id}/events": {"get": operation(
            "The job's status changes as Server-Sent Events: `event: status`, `data` the job, until it is terminal",
            {"description": "text/event-stream; reconnect with Last-Event-ID to get what was missed",
             "content": {"text/event-stream": {"schema": {"type": "string"}}}}, "401 403 404 503",
            parameters=[JOB_ID, {"name": "Last-Event-ID", "in": "header", "required": False,
                                 "schema": {"type": "string"}, "description": "the id of the last event seen"}])},
        "/api/jobs/{job_id}/cancel": {"post": operation(
            "Cancel a job that has not finished", JOB, "401 403 404 409", parameters=[JOB_ID])},
        "/api/users/{user_id}/jobs": {"get": operation(
            "A user's jobs, newest first", json_body(page_of(ref("Job")), "A page of jobs"), "400 401 403 404",
            parameters=[path_id("user_id", {"type": "integer", "minimum": 1}), STATUS,
                        query("kind", {"type": "string"}, "only this kind"), *PAGING])},
        "/api/me": {
            "get": operation("Your profile, balance and available credits", json_body(ref("Me"), "You"), "401"),
            "patch": operation("Change your webhook_url or locale", json_body(ref("Me"), "You"), "400 401",
                               body={"required": True, "content": {"application/json": {"schema": ME_PATCH}}}),
        },
        "/api/me/notifications": {"get": operation(
            "Your notifications, newest first", json_body(page_of(ref("Notification")) | {
                "required": ["items"], "properties": {"items": {"type": "array", "items": ref("Notification")}}},
                "Notifications"), "400 401",
            parameters=[query("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "how many (50)")])},
        "/api/me/safety-agreement": {"post": operation(
            "Record your consent to the safety rules", json_body(ref("Me"), "You"), "401")},
        "/api/queue/stats": {"get": operation(
            "Jobs by status and kind, broker depth, workers online, attempt durations",
            json_body(ref("QueueStats"), "Statistics"), "401")},
        "/api/admin/background-stats": {"get": operation(
            "The background processor's view", json_body(ref("BackgroundStats"), "Statistics"), "400 401 403 404",
            parameters=[USER_FILTER])},
        "/api/admin/api-requests": {"get": operation(
            "Jobs with their internal fields", json_body(page_of(INTERNAL_JOB), "A page of jobs"), "400 401 403 404",
            parameters=[USER_FILTER, STATUS, *PAGING])},
        "/api/admin/jobs/{job_id}/retry": {"post": operation(
            "Replay one failed job: back to pending with fresh counters and a new hold of its price", JOB,
            "401 402 403 404 409", parameters=[JOB_ID])},
        "/api/admin/jobs/retry": {"post": operation(
            "Replay the failed jobs a filter matches (or, with dry_run, say which would be replayed and skipped)",
            json_body(ref("Replay"), "What was replayed and skipped, and why"), "400 401 403 404 415",
            body={"required": True, "content": {"application/json": {"schema": REPLAY_REQUEST}}})},
        "/api/admin/replays": {"get": operation(
            "The replays of failed jobs, newest first", json_body(page_of(ref("ReplaySummary")), "A page of replays"),
            "400 401 403", parameters=[query("limit", {"type": "integer", "minimum": 1, "maximum": 100}, "page size (20)"),
                                       query("cursor", {"type": "string", "pattern": "^[0-9]{1,19}$"},
                                             "next_cursor of the previous page")])},
        "/api/admin/replays/{replay_id}": {"get": operation(
            "One replay, with the jobs it replayed and skipped", json_body(ref("Replay"), "The replay"), "401 403 404",
            parameters=[path_id("replay_id", {"type": "integer", "minimum": 1})])},
        "/healthz": {"get": operation("Liveness", json_body(ref("Health"), "Alive"), public=True)},
        "/readyz": {"get": operation("Database and broker reachable", json_body(ref("Readiness"), "Ready"), public=True,
                                     extra={"503": json_body(ref("Readiness"), "Not ready: which one is down")})},
        "/metrics": {"get": operation("Prometheus metrics", {"description": "Prometheus text format", "content": {
            "text/plain": {"schema": {"type": "string"}}}}, public=True)},
        "/openapi.json": {"get": operation("This document", json_body({"type": "object"}, "OpenAPI 3.1"), public=True)},
        "/": {"get": operation("The web page", {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                               public=True)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "renderq", "version": "1.0.0",
                 "description": "Reliable background jobs for image generation. Every error is "
                                "{\"error\": {code, message, request_id}}."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@blueprint.get("/openapi.json")
def openapi_json() -> Response:
    return jsonify(document())
