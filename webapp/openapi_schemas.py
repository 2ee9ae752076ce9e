"""JSON Schemas of what the API answers (OpenAPI 3.1 uses JSON Schema 2020-12 as is)."""
from __future__ import annotations

from config.kinds import KINDS, STYLES
from renderq.enums import Status


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
                      "checks": obj({"database": STRING, "broker": STRING})}),
}

INTERNAL_JOB = obj({**SCHEMAS["Job"]["properties"], "error_code": nullable(STRING),
                    "error_detail": nullable(STRING), "lease_expires_at": nullable(TIME),
                    "dispatched_at": nullable(TIME), "worker_host": nullable(STRING)})

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
