"""What people do to an existing job: its owner cancels it, an admin puts a failed one back."""
from __future__ import annotations

from renderq import billing, broker
from renderq.db import db
from renderq.enums import TERMINAL_STATUSES
from renderq.errors import Conflict
from renderq.jobs import lifecycle, scheduler, submit
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


def retry_failed(job: Job) -> None:
    """An admin's retry: a failed job back to pending with fresh counters, at the back of its
    user's queue (Conflict unless it failed). Not charged again: see lifecycle.requeue_failed."""
    user = billing.lock_user(job.user_id)
    if not lifecycle.requeue_failed(job.id, scheduler.next_tag(user)):
        db.session.rollback()
        raise Conflict("JOB_NOT_FAILED", "Only failed jobs can be retried; this one is %s." % job.status)
    db.session.commit()
    submit.dispatch_soon()
