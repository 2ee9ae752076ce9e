"""The attempt task. Task names are a wire contract: they outlive refactors, so they are explicit."""
from __future__ import annotations

import uuid
from typing import Optional

from celery import shared_task

from renderq import tracing
from renderq.jobs import scheduler
from renderq.jobs.attempt import run_attempt
from renderq.jobs.policy import RetryLater
from renderq.logs import job_logging
from tasks.base import LadderTask


@shared_task(
    bind=True,
    base=LadderTask,
    name="renderq.jobs.attempt",
    autoretry_for=(RetryLater,),  # the fast ladder: the countdown comes from the job row
    max_retries=None,  # the job row counts attempts; a message sent again must not reset them
    acks_late=True,
    reject_on_worker_lost=True,
)
def attempt(self: LadderTask, job_id: str, ticket: Optional[str] = None, kind: Optional[str] = None) -> None:
    """One attempt of a job, for the message carrying the scheduler's `ticket`. A message
    without one is the ladder's countdown running out: the job is due again and the scheduler
    sends it an attempt when a slot is free. `kind` only labels the message for Flower."""
    tracing.mark_job(job_id)  # the task's span; spans started inside get it from job_logging
    if ticket is None:
        with job_logging(job_id):
            scheduler.retry_due(uuid.UUID(job_id))
        return
    run_attempt(uuid.UUID(job_id), uuid.UUID(ticket), self.request.hostname or "unknown")
