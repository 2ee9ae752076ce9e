"""The HTTP API: submitting work, reading and canceling jobs, health."""
from __future__ import annotations

import io
import uuid
from typing import Callable, Optional

from flask import Blueprint, Response, g, jsonify, request, send_file
from sqlalchemy import select, text

from renderq import broker, events, storage
from renderq.db import db
from renderq.enums import TERMINAL_STATUSES, Outcome
from renderq.errors import Conflict, InvalidInput, NotFound
from renderq.images import check_image
from renderq.jobs import control, scheduler, submit
from renderq.logs import job_logging
from renderq.models import Job, Photo, User
from renderq.runtime import redis_client, settings
from webapp import headers
from webapp.auth import ensure_owner_or_admin, login_required, submission_login_required
from webapp.errors import ApiError
from webapp.paging import MAX_ID, filtered_by_status, page_of_jobs
from webapp.resources import job_resource, job_resources, locale_of

blueprint = Blueprint("api", __name__)


def _visible(model: type, raw_id: str, what: str):
    """The row with that id if the caller may see it: NotFound, or Forbidden for another user's."""
    try:
        row = db.session.get(model, uuid.UUID(raw_id))
    except ValueError:
        row = None
    if row is None:
        raise NotFound("NOT_FOUND", "No %s with id %r." % (what, raw_id))
    ensure_owner_or_admin(row.user_id)
    return row


def visible_photo(photo_id: str) -> Photo:
    return _visible(Photo, photo_id, "photo")


def visible_job(job_id: str) -> Job:
    return _visible(Job, job_id, "job")


def _latest_job(photo: Photo) -> Job:
    job = db.session.execute(
        select(Job).where(Job.photo_id == photo.id).order_by(Job.created_at.desc()).limit(1)
    ).scalar()
    if job is None:
        raise NotFound("NOT_FOUND", "Photo %s has no job." % photo.id)
    return job


def job_json(job: Job, status: int = 200) -> Response:
    response = jsonify(job_resource(job, locale_of(g.user, settings().default_locale)))
    response.status_code = status
    return response


def _result_file(job: Job) -> Response:
    if job.outcome != Outcome.SUCCEEDED or not job.result_path:
        raise Conflict("RESULT_NOT_READY", "The job is %s; the result exists once it has succeeded." % job.status)
    try:
        image = storage.storage().get(job.result_path)
    except KeyError:
        raise Conflict("RESULT_GONE", "The job's result is no longer stored.") from None
    return send_file(io.BytesIO(image), mimetype="image/png")


def _accepted(accepted: submit.Accepted) -> Response:
    """202 with the job; with `Prefer: wait=N`, 200 if it became terminal within N seconds."""
    job, position = accepted.job, accepted.queue_position
    with job_logging(job.id):  # the answer's statements belong to the job too (in logs and traces)
        wait = headers.prefer_wait()
        if wait and job.status not in TERMINAL_STATUSES:
            with headers.waiting_room.enter() as admitted:  # past the bound: an immediate 202
                if admitted:
                    job_id = job.id
                    events.wait_until_terminal(job_id, wait, lambda: _status_without_a_connection(job_id))
                    job = db.session.get(Job, job_id)
                    position = scheduler.queue_position(job)
        response = jsonify(job_resource(job, locale_of(g.user, settings().default_locale), position,
                                        read_position=False))
        if job.status in TERMINAL_STATUSES and wait is not None:
            return response
        response.status_code = 202
        response.headers["Location"] = "/api/jobs/%s" % job.id
        return response


def _status_without_a_connection(job_id: uuid.UUID) -> str:
    status = db.session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()
    db.session.close()  # give the connection back before waiting
    return status


@blueprint.post("/api/photos")
@submission_login_required
def upload_photo() -> Response:
    upload = request.files.get("file")
    if upload is None:
        raise InvalidInput("FILE_REQUIRED", "Send the photo as a multipart/form-data field named 'file'.")
    kind = submit.resolve_kind(request.form.get("kind"), default="photo.render")
    params = submit.check_params(request.form.get("style"), request.form.get("prompt"))
    image = check_image(upload.read(), settings().max_upload_bytes)
    key = headers.idempotency_key()
    return _accepted(submit.submit(g.user.id, kind, params, image=image, idempotency_key=key))


@blueprint.post("/api/jobs")
@submission_login_required
def create_job() -> Response:
    if not request.is_json:
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Send a JSON body with Content-Type: application/json.")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise InvalidInput("INVALID_BODY", "The body must be a JSON object: {kind, params, photo_id?}.")
    unknown = set(body) - {"kind", "params", "photo_id"}
    if unknown:
        raise InvalidInput("INVALID_BODY", "Unknown fields: %s; expected kind, params, photo_id."
                           % ", ".join(sorted(unknown)))
    kind = submit.resolve_kind(body.get("kind"), default="image.generate")
    params = body.get("params") or {}
    if not isinstance(params, dict) or set(params) - {"style", "prompt"} or \
            not all(isinstance(value, str) for value in params.values()):
        raise InvalidInput("INVALID_PARAMS", "params must be an object with string fields 'style' and 'prompt'.")
    params = submit.check_params(params.get("style"), params.get("prompt"))
    photo = None
    if body.get("photo_id") is not None:
        if not isinstance(body["photo_id"], str):
            raise InvalidInput("INVALID_PHOTO_ID", "photo_id must be a string id from POST /api/photos.")
        photo = visible_photo(body["photo_id"])
    key = headers.idempotency_key()
    return _accepted(submit.submit(g.user.id, kind, params, photo=photo, idempotency_key=key))


@blueprint.post("/api/jobs/<job_id>/cancel")
@login_required
def cancel_job(job_id: str) -> Response:
    job = visible_job(job_id)
    control.cancel(job)
    return job_json(db.session.get(Job, job.id, populate_existing=True))


@blueprint.get("/api/users/<int:user_id>/jobs")
@login_required
def list_user_jobs(user_id: int) -> Response:
    ensure_owner_or_admin(user_id)  # first, so others cannot probe which user ids exist
    if user_id > MAX_ID or db.session.get(User, user_id) is None:
        raise NotFound("NOT_FOUND", "No user with id %d." % user_id)
    query = filtered_by_status(select(Job).where(Job.user_id == user_id), request.args.get("status"))
    kind = request.args.get("kind")
    if kind:
        query = query.where(Job.kind == submit.resolve_kind(kind, default=kind).name)
    locale = locale_of(g.user, settings().default_locale)
    return jsonify(page_of_jobs(query, lambda jobs: job_resources(jobs, locale), request.args.get("limit"),
                                request.args.get("cursor")))


@blueprint.get("/api/photos/<photo_id>/status")
@login_required
def photo_status(photo_id: str) -> Response:
    return job_json(_latest_job(visible_photo(photo_id)))


@blueprint.get("/api/photos/<photo_id>/result")
@login_required
def photo_result(photo_id: str) -> Response:
    return _result_file(_latest_job(visible_photo(photo_id)))


@blueprint.get("/api/jobs/<job_id>")
@login_required
def get_job(job_id: str) -> Response:
    return job_json(visible_job(job_id))


@blueprint.get("/api/jobs/<job_id>/result")
@login_required
def job_result(job_id: str) -> Response:
    return _result_file(visible_job(job_id))


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


def _down(check: Callable[[], object]) -> Optional[str]:
    try:
        check()
        return None
    except Exception:
        return "unreachable"


@blueprint.get("/readyz")
def readyz() -> Response:
    config = settings()
    checks = {
        "database": _down(lambda: db.session.execute(text("SELECT 1"))),
        "broker": _down(broker.queue_depth),  # the broker in use, Redis or RabbitMQ
    }
    db.session.rollback()
    if config.broker_url != config.redis_url:  # Redis is still needed: `Prefer: wait`, counters
        checks["redis"] = _down(lambda: redis_client().ping())
    if config.storage_backend == "s3":
        checks["storage"] = _down(lambda: storage.storage().check())  # the bucket, with these credentials
    ready = not any(checks.values())
    response = jsonify({"status": "ready" if ready else "not ready",
                        "checks": {name: problem or "ok" for name, problem in checks.items()}})
    response.status_code = 200 if ready else 503
    return response
