"""The attempt task. Task names are a wire contract: they outlive refactors, so they are explicit."""
from __future__ import annotations

import uuid
from typing import Optional

from celery import shared_task
from sqlalchemy.exc import DBAPIError

from renderq.jobs.attempt import run_attempt
from renderq.jobs.policy import RetryLater
from tasks.base import LadderTask


@shared_task(
    bind=True,
    base=LadderTask,
    name="renderq.jobs.attempt",
    # RetryLater (and Throttled) carry their countdown; a database outage retries after the default delay.
    autoretry_for=(RetryLater, DBAPIError),
    default_retry_delay=5,
    max_retries=None,  # the job row counts attempts; a re-published message must not reset them
    acks_late=True,
    reject_on_worker_lost=True,
)
def attempt(self: LadderTask, job_id: str, ticket: Optional[str] = None, kind: Optional[str] = None) -> None:
    """One attempt of a job. `kind` only labels the message, so Flower lists attempts by kind."""
    run_attempt(uuid.UUID(job_id), uuid.UUID(ticket) if ticket else None)
