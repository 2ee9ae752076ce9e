"""The job resource, as the status endpoints show it."""
from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace
from typing import Optional

from renderq.enums import Outcome, Status
from renderq.jobs.scheduler import queue_position, queue_positions
from renderq.messages import block_message, public_error
from renderq.models import Job, User

SHOWS_LAST_ERROR = frozenset({Status.RETRYING, Status.PENDING_BACKGROUND_RETRY, Status.FAILED})


def iso(moment: Optional[datetime]) -> Optional[str]:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


def locale_of(user: User, default_locale: str) -> str:
    return user.locale or default_locale


def job_resource(job: Job, locale: str, position: Optional[int] = None, read_position: bool = True) -> dict:
    """The job as clients see it. `read_position=False` leaves `queue_position` as given
    (a status event is rendered without asking the database)."""
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
        "message": block_message(job.block_reason, locale) if job.outcome == Outcome.BLOCKED else None,
        "result_url": job.result_url,
        "price": job.price,
        "queue_position": queue_position(job) if read_position else position,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "updated_at": iso(job.updated_at),
    }


def job_resources(jobs: list[Job], locale: str) -> list[dict]:
    """A page of jobs as clients see them, their queue positions read in one statement."""
    positions = queue_positions(jobs)
    return [job_resource(job, locale, positions[job.id], read_position=False) for job in jobs]


def job_resource_at(job: Job, state: dict, locale: str) -> dict:
    """The job as a status event saw it: its fixed fields from `job`, the changing ones from
    `state` (renderq.events)."""
    moment = SimpleNamespace(**{column: getattr(job, column) for column in ("id", "photo_id", "user_id", "kind",
                                                                              "price", "created_at")}, **state)
    moment.result_url = Job.result_url.fget(moment)
    return job_resource(moment, locale, read_position=False)
