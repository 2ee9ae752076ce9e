"""Monitoring for users and admins (the seed's views, snake_case), and the admin's retry."""
from __future__ import annotations

from typing import Optional

from flask import Blueprint, Response, g, jsonify, request
from sqlalchemy import select

from renderq import broker, stats, workers
from renderq.db import db
from renderq.errors import NotFound
from renderq.jobs import control
from renderq.models import Job, User
from renderq.runtime import settings
from webapp.api import job_json, visible_job
from webapp.auth import admin_required, login_required
from webapp.paging import MAX_ID, filtered_by_status, page_of_jobs, whole_number
from webapp.resources import iso, job_resources, locale_of

blueprint = Blueprint("monitoring", __name__)


def _broker_queue_depth() -> Optional[int]:
    try:
        return broker.queue_depth()
    except Exception:  # the broker is down: say so with null rather than fail the whole view
        return None


def _workers_online() -> int:
    """Attempts workers whose processes announced themselves alive (renderq.workers)."""
    return len({process.host for process in workers.live()})


@blueprint.get("/api/queue/stats")
@login_required
def queue_stats() -> Response:
    by_status, by_kind = stats.counts()
    return jsonify({
        "counts_by_status": by_status,
        "counts_by_kind": by_kind,
        "broker_queue_depth": _broker_queue_depth(),
        "workers_online": _workers_online(),
        "attempt_duration_last_hour": stats.attempt_durations(),
    })


def _user_filter() -> Optional[int]:
    raw = request.args.get("user_id")
    if raw is None or raw == "":
        return None
    user_id = whole_number(raw, "user_id", 1, MAX_ID)
    if db.session.get(User, user_id) is None:
        raise NotFound("NOT_FOUND", "No user with id %d." % user_id)
    return user_id


@blueprint.get("/api/admin/background-stats")
@admin_required
def background_stats() -> Response:
    user_id = _user_filter()
    return jsonify({"user_id": user_id, **stats.background(user_id)})


def _internal(jobs: list[Job], locale: str) -> list[dict]:
    return [{**public, "error_code": job.error_code, "error_detail": job.error_detail,
             "lease_expires_at": iso(job.lease_expires_at), "dispatched_at": iso(job.dispatched_at),
             "worker_host": job.worker_host, "generation": job.generation}
            for job, public in zip(jobs, job_resources(jobs, locale))]


@blueprint.get("/api/admin/api-requests")
@admin_required
def api_requests() -> Response:
    query = filtered_by_status(select(Job), request.args.get("status"))
    user_id = _user_filter()
    if user_id is not None:
        query = query.where(Job.user_id == user_id)
    locale = locale_of(g.user, settings().default_locale)
    return jsonify(page_of_jobs(query, lambda jobs: _internal(jobs, locale), request.args.get("limit"),
                                request.args.get("cursor")))


@blueprint.post("/api/admin/jobs/<job_id>/retry")
@admin_required
def retry_job(job_id: str) -> Response:
    job = visible_job(job_id)
    control.retry_failed(job, requested_by=g.user.email, admin_id=g.user.id)
    return job_json(db.session.get(Job, job.id, populate_existing=True))
