"""The HTTP API of SPEC §6 (this module: submitting photos and reading job status)."""
from __future__ import annotations

import uuid
from typing import Optional

from flask import Blueprint, Response, current_app, g, jsonify, request, send_file
from sqlalchemy import select, text

from tasks.dispatch import redis_client
from webapp import storage, submissions
from webapp.auth import ensure_owner_or_admin, login_required
from webapp.errors import ApiError
from webapp.extensions import db
from webapp.models import SUCCEEDED, Job, Photo
from webapp.resources import job_resource, locale_of
from webapp.uploads import check_image

blueprint = Blueprint("api", __name__)


def _settings():
    return current_app.extensions["renderq.settings"]


def _uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, "NOT_FOUND", "No %s with id %r." % (what, raw)) from None


def _visible_photo(photo_id: str) -> Photo:
    photo = db.session.get(Photo, _uuid(photo_id, "photo"))
    if photo is None:
        raise ApiError(404, "NOT_FOUND", "No photo with id %r." % photo_id)
    ensure_owner_or_admin(photo.user_id)
    return photo


def _visible_job(job_id: str) -> Job:
    job = db.session.get(Job, _uuid(job_id, "job"))
    if job is None:
        raise ApiError(404, "NOT_FOUND", "No job with id %r." % job_id)
    ensure_owner_or_admin(job.user_id)
    return job


def _latest_job(photo: Photo) -> Job:
    job = db.session.execute(
        select(Job).where(Job.photo_id == photo.id).order_by(Job.created_at.desc()).limit(1)
    ).scalar()
    if job is None:
        raise ApiError(404, "NOT_FOUND", "Photo %s has no job." % photo.id)
    return job


def _job_json(job: Job, status: int = 200) -> Response:
    response = jsonify(job_resource(job, locale_of(g.user, _settings().default_locale)))
    response.status_code = status
    return response


def _result_file(job: Job) -> Response:
    if job.outcome != SUCCEEDED or not job.result_path:
        raise ApiError(409, "RESULT_NOT_READY", "The job is %s; the result exists once it has succeeded." % job.status)
    return send_file(storage.absolute_path(_settings().media_root, job.result_path), mimetype="image/png")


@blueprint.post("/api/photos")
@login_required
def upload_photo() -> Response:
    upload = request.files.get("file")
    if upload is None:
        raise ApiError(400, "FILE_REQUIRED", "Send the photo as a multipart/form-data field named 'file'.")
    kind = submissions.resolve_kind(request.form.get("kind"), default="photo.render")
    params = submissions.check_params(request.form.get("style"), request.form.get("prompt"))
    image = check_image(upload.read(), _settings().max_upload_bytes)
    job = submissions.submit(g.user.id, kind, params, _settings(), image=image)
    return _job_json(job, 202)


@blueprint.get("/api/photos/<photo_id>/status")
@login_required
def photo_status(photo_id: str) -> Response:
    return _job_json(_latest_job(_visible_photo(photo_id)))


@blueprint.get("/api/photos/<photo_id>/result")
@login_required
def photo_result(photo_id: str) -> Response:
    return _result_file(_latest_job(_visible_photo(photo_id)))


@blueprint.get("/api/jobs/<job_id>")
@login_required
def get_job(job_id: str) -> Response:
    return _job_json(_visible_job(job_id))


@blueprint.get("/api/jobs/<job_id>/result")
@login_required
def job_result(job_id: str) -> Response:
    return _result_file(_visible_job(job_id))


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


def _down(check) -> Optional[str]:
    try:
        check()
        return None
    except Exception:
        return "unreachable"


@blueprint.get("/readyz")
def readyz() -> Response:
    checks = {
        "database": _down(lambda: db.session.execute(text("SELECT 1"))),
        "broker": _down(lambda: redis_client().ping()),
    }
    db.session.rollback()
    ready = not any(checks.values())
    response = jsonify({"status": "ready" if ready else "not ready",
                        "checks": {name: problem or "ok" for name, problem in checks.items()}})
    response.status_code = 200 if ready else 503
    return response
