"""Admins replaying failed jobs in bulk, and the record of every replay."""
from __future__ import annotations

from typing import Optional

from flask import Blueprint, Response, g, jsonify, request
from sqlalchemy import select

from renderq.db import db
from renderq.errors import NotFound
from renderq.jobs import replay
from renderq.models import JobReplay
from webapp.auth import admin_required
from webapp.errors import ApiError
from webapp.paging import DEFAULT_LIMIT, MAX_ID, MAX_LIMIT, whole_number
from webapp.resources import iso

blueprint = Blueprint("replays", __name__)


def report_resource(report: replay.ReplayReport, requested_by: str) -> dict:
    """The answer to a replay (or a dry run): the same fields as a recorded replay's."""
    return {
        "id": report.replay_id, "dry_run": report.dry_run, "requested_by": requested_by,
        "created_at": iso(report.created_at),
        "filter": report.spec.as_json(), "replayed": len(report.replayed), "skipped": len(report.skipped),
        "skipped_reasons": report.skipped_reasons, "credits_held": report.credits_held,
        "duration_ms": report.duration_ms, "replayed_jobs": [str(job_id) for job_id in report.replayed],
        "skipped_jobs": [skip.as_json() for skip in report.skipped],
    }


def record_resource(record: JobReplay, with_jobs: bool) -> dict:
    resource = {
        "id": record.id, "dry_run": False, "requested_by": record.requested_by, "created_at": iso(record.created_at),
        "filter": record.filter, "replayed": record.replayed, "skipped": record.skipped,
        "skipped_reasons": record.skipped_reasons, "credits_held": record.credits_held,
        "duration_ms": record.duration_ms,
    }
    if with_jobs:
        resource.update(replayed_jobs=record.job_ids, skipped_jobs=record.skipped_jobs)
    return resource


@blueprint.post("/api/admin/jobs/retry")
@admin_required
def replay_failed_jobs() -> Response:
    if not request.is_json:
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Send a JSON body with Content-Type: application/json.")
    spec, dry_run = replay.parse_request(request.get_json(silent=True))
    requested_by, admin_id = g.user.email, g.user.id
    report = replay.replay(spec, dry_run=dry_run, requested_by=requested_by, admin_id=admin_id)
    return jsonify(report_resource(report, requested_by))


@blueprint.get("/api/admin/replays")
@admin_required
def list_replays() -> Response:
    size = whole_number(request.args.get("limit") or str(DEFAULT_LIMIT), "limit", 1, MAX_LIMIT)
    query = select(JobReplay).order_by(JobReplay.id.desc()).limit(size + 1)
    cursor: Optional[str] = request.args.get("cursor")
    if cursor:
        query = query.where(JobReplay.id < whole_number(cursor, "cursor", 1, MAX_ID))
    rows = list(db.session.execute(query).scalars())
    next_cursor = str(rows[size - 1].id) if len(rows) > size else None
    return jsonify({"items": [record_resource(row, with_jobs=False) for row in rows[:size]],
                    "next_cursor": next_cursor})


@blueprint.get("/api/admin/replays/<int:replay_id>")
@admin_required
def get_replay(replay_id: int) -> Response:
    record = db.session.get(JobReplay, replay_id) if replay_id <= MAX_ID else None
    if record is None:
        raise NotFound("NOT_FOUND", "No replay with id %d." % replay_id)
    return jsonify(record_resource(record, with_jobs=True))
