"""What people do to an existing job: its owner cancels it, an admin puts a failed one back."""
from __future__ import annotations

from typing import Optional

from renderq import broker
from renderq.db import db
from renderq.enums import TERMINAL_STATUSES
from renderq.errors import Conflict
from renderq.jobs import lifecycle, replay
from renderq.models import Job
from renderq.runtime import celery_app, settings


def cancel(job: Job) -> None:
    """Cancel a job that has not finished (Conflict if it has): its hold is released, its
    waiting messages revoked, and a running attempt's result will match no row."""
    finished = lifecycle.cancel(job.id, settings()) if job.status not in TERMINAL_STATUSES else None
    if finished is None:
        db.session.rollback()
        status = db.session.get(Job, job.id, populate_existing=True).status
        raise Conflict("JOB_FINISHED", "The job is already %s and cannot be canceled." % status)
    celery_app().control.revoke(str(job.id))  # workers drop its waiting messages
    broker.announce(finished)


def retry_failed(job: Job, requested_by: str, admin_id: Optional[int] = None) -> None:
    """An admin's retry: a failed job back to pending with fresh counters, at the back of its
    user's queue, as a replay of one job (renderq.jobs.replay): recorded, and charged like any
    replay, with a new hold of its price (InsufficientCredits without it; Conflict unless it
    failed)."""
    replay.replay_one(job.id, requested_by=requested_by, admin_id=admin_id)
