"""`Prefer: wait=N`: hold the answer until the job is terminal or N seconds pass.

The request waits on a Redis channel the worker publishes to when the job finishes, with no
database connection held and no polling (tasks.dispatch.announce publishes).
"""
from __future__ import annotations

import re
import time
import uuid
from typing import Optional

from flask import request

from tasks.dispatch import finished_channel, redis_client
from webapp.errors import ApiError
from webapp.extensions import db
from webapp.models import TERMINAL_STATUSES, Job

MAX_WAIT_SECONDS = 30
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([^,;\s]+)", re.IGNORECASE)


def requested_wait() -> Optional[float]:
    header = request.headers.get("Prefer")
    if not header:
        return None
    match = _WAIT.search(header)
    if match is None:
        return None
    try:
        seconds = float(match.group(1))
    except ValueError:
        raise ApiError(400, "INVALID_PREFER", "Prefer: wait=N takes a number of seconds from 0 to 30.") from None
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise ApiError(400, "INVALID_PREFER", "Prefer: wait=N takes a number of seconds from 0 to 30.")
    return seconds


def _status(job_id: uuid.UUID) -> str:
    status = db.session.execute(db.select(Job.status).where(Job.id == job_id)).scalar_one()
    db.session.close()  # give the connection back before waiting
    return status


def wait_until_terminal(job_id: uuid.UUID, seconds: float) -> None:
    """Return when the job is terminal or after `seconds`, whichever is first."""
    pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(finished_channel(job_id))  # before reading, so no finish slips between
        if _status(job_id) in TERMINAL_STATUSES:
            return
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if pubsub.get_message(timeout=min(remaining, 1.0)) is not None:
                return
    finally:
        pubsub.close()
