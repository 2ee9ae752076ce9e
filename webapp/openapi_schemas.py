"""JSON Schemas of what the API answers (OpenAPI 3.1 uses JSON Schema 2020-12 as is)."""
from __future__ import annotations

from config.kinds import KINDS, STYLES
from renderq.enums import Status
from renderq.jobs.replay import MAX_ID
from renderq.jobs.replay import MAX_LIMIT as MAX_REPLAY_LIMIT


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(properties: dict, required: list[str] | None = None, strict: bool = True) -> dict:
    schema = {"type": "object", "properties": properties, "required": required or list(properties)}
    if strict:
        schema["additionalProperties"] = False
    return schema


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
UUID = {"type": "string", "format": "uuid"}
TIME = {"type": "string", "format": "date-time"}
COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
PUBLIC_ERROR = obj({"code": STRING, "message": STRING})

SCHEMAS = {
    "Error": obj({"error": obj({"code": STRING, "message": STRING, "request_id": STRING, "detail": STRING},
                               required=["code", "message", "request_id"])}),
    "Job": obj({
        "id": UUID,
        "photo_id": nullable(UUID),
        "user_id": INTEGER,
        "kind": {"type": "string", "enum": sorted(KINDS)},
        "status": {"type": "string", "enum": [status.value for status in Status]},
        "outcome": nullable({"type": "string", "enum": ["succeeded", "blocked"]}),
        "block_reason": nullable(STRING),
        "attempts": {"type": "integer", "minimum": 0},
        "retry_count": {"type": "integer", "minimum": 0},
        "next_retry_at": nullable(TIME),
        "error": nullable(PUBLIC_ERROR),
        "message": nullable(STRING),
        "result_url": nullable(STRING),
        "price": {"type": "integer", "minimum": 0},
        "queue_position": nullable({"type": "integer", "minimum": 0}),
        "created_at": TIME,
        "started_at": nullable(TIME),
        "completed_at": nullable(TIME),
        "updated_at": TIME,
    }),
    "Me": obj({
        "id": INTEGER, "email": STRING, "is_admin": {"type": "boolean"}, "balance": INTEGER,
        "available": INTEGER, "locale": {"type": "string", "enum": ["en", "ru"]}, "webhook_url": nullable(STRING),
        "safety_agreed_at": nullable(TIME), "created_at": TIME,
    }),
    "Notification": obj({
        "id": INTEGER, "job_id": UUID, "event": {"type": "string", "enum": ["succeeded", "blocked", "failed"]},
        "payload": {"type": "object"}, "webhook_id": STRING, "delivered_at": nullable(TIME),
        "delivery": obj({"state": {"type": "string", "enum": ["delivered", "pending", "failed", "none"]},
                         "attempts": {"type": "integer", "minimum": 0}, "last_error": nullable(STRING)}),
        "created_at": TIME,
    }),
    "QueueStats": obj({
        "counts_by_status": COUNTS,
        "counts_by_kind": {"type": "object", "additionalProperties": COUNTS},
        "broker_queue_depth": nullable({"type": "integer", "minimum": 0}),
        "workers_online": nullable({"type": "integer", "minimum": 0}),
        "attempt_duration_last_hour": obj({"samples": INTEGER, "p50_ms": nullable(INTEGER), "p95_ms": nullable(INTEGER)}),
    }),
    "BackgroundStats": obj({
        "user_id": nullable(INTEGER), "pending_background_retry": INTEGER, "processing": INTEGER, "failed": INTEGER,
        "completed": INTEGER, "blocked": INTEGER, "retry_count_histogram": COUNTS, "by_kind": COUNTS,
    }),
    "Health": obj({"status": STRING}),
    "Readiness": obj({"status": {"type": "string", "enum": ["ready", "not ready"]},
                      # `redis` when the broker is not REDIS_URL; `storage` with STORAGE_BACKEND=s3
                      "checks": obj({"database": STRING, "broker": STRING, "redis": STRING, "storage": STRING},
                                    required=["database", "broker"])}),
}

INTERNAL_JOB = obj({**SCHEMAS["Job"]["properties"], "error_code": nullable(STRING),
                    "error_detail": nullable(STRING), "lease_expires_at": nullable(TIME),
                    "dispatched_at": nullable(TIME), "worker_host": nullable(STRING),
                    "generation": {"type": "integer", "minimum": 0}})

_REPLAY_FILTER = {
    "status": {"type": "string", "enum": ["failed"], "description": "only failed jobs can be replayed"},
    "error_code": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]{0,63}$",
                   "description": "an internal error code (GENERATOR_BUSY, TIME_LIMIT, WORKER_LOST, TOO_OLD, "
                                  "INVALID_INPUT, ...) or GENERATOR_UNAVAILABLE: every failure but the user's input"},
    "kind": {"type": "string", "enum": sorted(KINDS)},
    "user_id": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
    "failed_after": {**TIME, "description": "failed at or after (ISO 8601 with a UTC offset)"},
    "failed_before": {**TIME, "description": "failed before (ISO 8601 with a UTC offset)"},
    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_REPLAY_LIMIT,
              "description": "the most failed jobs examined, oldest failure first"},
}

REPLAY_REQUEST = obj({**_REPLAY_FILTER, "dry_run": {"type": "boolean", "description": "say what would happen, change nothing"}},
                     required=["limit"])

_SKIPPED_JOB = obj({"job_id": UUID, "user_id": INTEGER,
                    "reason": {"type": "string", "enum": ["INSUFFICIENT_CREDITS", "PHOTO_GONE", "HOLD_NOT_RELEASED"]},
                    "message": STRING})

_REPLAY_SUMMARY = {
    "id": nullable(INTEGER), "dry_run": {"type": "boolean"}, "requested_by": STRING, "created_at": nullable(TIME),
    "filter": obj({**_REPLAY_FILTER, "job_id": UUID}, required=["status", "limit"]),
    "replayed": {"type": "integer", "minimum": 0}, "skipped": {"type": "integer", "minimum": 0},
    "skipped_reasons": COUNTS, "credits_held": {"type": "integer", "minimum": 0},
    "duration_ms": {"type": "integer", "minimum": 0},
}
SCHEMAS["ReplaySummary"] = obj(_REPLAY_SUMMARY)
SCHEMAS["Replay"] = obj({**_REPLAY_SUMMARY, "replayed_jobs": {"type": "array", "items": UUID},
                         "skipped_jobs": {"type": "array", "items": _SKIPPED_JOB}})

JOB_REQUEST = obj({
    "kind": {"type": "string", "enum": sorted(KINDS)},
    "params": obj({"style": {"type": "string", "enum": list(STYLES)}, "prompt": {"type": "string", "maxLength": 2000}},
                  required=[]),
    "photo_id": nullable(UUID),
}, required=["kind"])

PHOTO_REQUEST = obj({
    "file": {"type": "string", "contentMediaType": "application/octet-stream"},
    "style": {"type": "string", "enum": list(STYLES)},
    "prompt": {"type": "string", "maxLength": 2000},
    "kind": {"type": "string", "enum": sorted(KINDS)},
}, required=["file"])

ME_PATCH = obj({"webhook_url": nullable({"type": "string", "format": "uri", "maxLength": 2000}),
                "locale": nullable({"type": "string", "enum": ["en", "ru"]})}, required=[])
