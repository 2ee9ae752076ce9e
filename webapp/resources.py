"""The job resource of SPEC §6, as the status endpoints show it."""
from __future__ import annotations

from datetime import datetime
from typing import Optional

from sqlalchemy import Select, func, select, tuple_

from webapp.extensions import db
from webapp.messages import block_message, public_error
from webapp.models import BLOCKED, FAILED, PENDING, PENDING_BACKGROUND_RETRY, RETRYING, SUCCEEDED, Job, User

SHOWS_LAST_ERROR = (RETRYING, PENDING_BACKGROUND_RETRY, FAILED)


def iso(moment: Optional[datetime]) -> Optional[str]:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def jobs_ahead(job: Job) -> Select:
    """The count of pending jobs taken before `job`: it reads the partial index of pending jobs
    (ix_jobs_pending_queue), so finished jobs, however many, cost nothing."""
    return select(func.count()).select_from(Job).where(
        Job.status == PENDING, tuple_(Job.created_at, Job.id) < tuple_(job.created_at, job.id))


def queue_position(job: Job) -> Optional[int]:
    return db.session.execute(jobs_ahead(job)).scalar_one() if job.status == PENDING else None


def result_url(job: Job) -> Optional[str]:
    if job.outcome != SUCCEEDED:
        return None
    if job.photo_id is not None:
        return "/api/photos/%s/result" % job.photo_id
    return "/api/jobs/%s/result" % job.id


def locale_of(user: User, default_locale: str) -> str:
    return user.locale or default_locale


def job_resource(job: Job, locale: str) -> dict:
    return {
        "id": str(job.id),
        "photo_id": str(job.photo_id) if job.photo_id else None,
        "user_id": job.user_id,
        "kind": job.kind,
        "status": job.status,
        "outcome": job.outcome,
        "block_reason": job.block_reason,
        "attempts": job.attempts,
        "retry_count": job.retry_count,
        "next_retry_at": iso(job.next_retry_at),
        "error": public_error(job.error_code, locale) if job.error_code and job.status in SHOWS_LAST_ERROR else None,
        "message": block_message(job.block_reason, locale) if job.outcome == BLOCKED else None,
        "result_url": result_url(job),
        "price": job.price,
        "queue_position": queue_position(job),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "updated_at": iso(job.updated_at),
    }
