"""When a job is tried again: the fast ladder, the background tier, and their limits.

The fast ladder is the first attempt and up to MAX_RETRIES retries, RETRY_DELAYS apart (1, 5,
15, 60, 300 s by default), each at least as late as a 429's Retry-After (up to the
ladder's longest step); Celery's
`autoretry_for` carries the countdown (RetryLater). Then the background tier: the background
processor gives the job up to MAX_RETRY_ATTEMPTS more tries, while it is younger than
MAX_BACKGROUND_RETRY_AGE. The counters live in the job row (`attempts` counts every call,
`retry_count` the background ones), never in a message, so a re-published message cannot
reset them.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

from sqlalchemy import func, or_

from config import Settings
from renderq.enums import Status, Tier
from renderq.models import Job


class RetryLater(Exception):
    """The job was moved to `retrying`; Celery's autoretry re-sends its message after `countdown` seconds."""

    def __init__(self, countdown: float):
        super().__init__("retry in %.3fs" % countdown)
        self.countdown = countdown


@dataclass(frozen=True)
class NextStep:
    """Where a transient failure sends a job: a fast-ladder retry in `retry_in` seconds, the
    background tier, or failed."""
    status: Status
    retry_in: Optional[float] = None


def tier(retry_count: int) -> Tier:
    """A job's attempts belong to the background tier once the background processor has claimed it."""
    return Tier.BACKGROUND if retry_count > 0 else Tier.FAST


def max_background_age(settings: Settings) -> timedelta:
    return timedelta(milliseconds=settings.max_background_retry_age_ms)


def background_exhausted(settings: Settings) -> Any:
    """SQL: the job may not have another background try (out of tries, or too old)."""
    return or_(Job.retry_count >= settings.max_retry_attempts,
               Job.created_at <= func.now() - max_background_age(settings))


def plan_after_transient_failure(attempts: int, retry_count: int, age: timedelta,
                                 settings: Settings, retry_after: float = 0) -> NextStep:
    """The next step after the transient failure of attempt number `attempts`."""
    if tier(retry_count) is Tier.BACKGROUND:
        if retry_count >= settings.max_retry_attempts or age >= max_background_age(settings):
            return NextStep(Status.FAILED)
        return NextStep(Status.PENDING_BACKGROUND_RETRY)
    retries_used = attempts - 1
    if retries_used < settings.max_retries:
        # A 429's Retry-After is honoured up to the ladder's longest step: one header cannot
        # park a job (and the credits it holds) for longer than the ladder would.
        honoured = min(retry_after, max(settings.retry_delays))
        return NextStep(Status.RETRYING, max(settings.retry_delay(retries_used + 1), honoured))
    if settings.max_retry_attempts == 0:
        return NextStep(Status.FAILED)
    return NextStep(Status.PENDING_BACKGROUND_RETRY)
