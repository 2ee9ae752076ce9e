"""Request headers the submissions understand: `Idempotency-Key` and `Prefer: wait=N`."""
from __future__ import annotations

import re
from typing import Optional

from flask import request

from renderq.jobs.submit import check_idempotency_key
from webapp.admission import Admission
from webapp.errors import ApiError

MAX_WAIT_SECONDS = 30
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*([^,;\s]+)", re.IGNORECASE)


def idempotency_key() -> Optional[str]:
    return check_idempotency_key(request.headers.get("Idempotency-Key"))


def prefer_wait() -> Optional[float]:
    """Seconds asked for by `Prefer: wait=N` (0 to 30), or None."""
    header = request.headers.get("Prefer")
    match = _WAIT.search(header) if header else None
    if match is None:
        return None
    try:
        seconds = float(match.group(1))
    except ValueError:
        seconds = -1
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise ApiError(400, "INVALID_PREFER", "Prefer: wait=N takes a number of seconds from 0 to %d." % MAX_WAIT_SECONDS)
    return seconds


# At most MAX_WAITING_REQUESTS requests per process hold their answer at once.
waiting_room = Admission(lambda config: config.max_waiting_requests)
