"""Cursor paging, newest first, stable under inserts: the cursor is the last row's (created_at, id)."""
from __future__ import annotations

import base64
import re
import uuid
from datetime import datetime
from typing import Any, Callable, Optional

from sqlalchemy import Select, tuple_

from renderq.db import db
from renderq.enums import Status
from renderq.models import Job
from webapp.errors import ApiError

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
MAX_ID = 2 ** 63 - 1  # PostgreSQL's bigint: no larger id can exist
_WHOLE = re.compile(r"[0-9]{1,19}")


def whole_number(raw: str, name: str, low: int, high: int) -> int:
    """`raw` as an int from low to high, or a 400 naming the parameter (ASCII digits only:
    str.isdigit() would let '²' through to int())."""
    if not _WHOLE.fullmatch(raw) or not low <= int(raw) <= high:
        raise ApiError(400, "INVALID_%s" % name.upper(), "%s must be a whole number from %d to %d." % (name, low, high))
    return int(raw)


def _decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "INVALID_CURSOR", "cursor is not one this API handed out; start again without it.") from None


def _encode(job: Job) -> str:
    return base64.urlsafe_b64encode(("%s|%s" % (job.created_at.isoformat(), job.id)).encode()).decode()


def filtered_by_status(query: Select, status: Optional[str]) -> Select:
    """`query` narrowed to `status`, if given; 400 for a status that does not exist."""
    if not status:
        return query
    if status not in frozenset(Status):
        raise ApiError(400, "INVALID_STATUS", "Unknown status %r; valid: %s." % (status, ", ".join(Status)))
    return query.where(Job.status == status)


def page_of_jobs(query: Select, render: Callable[[list[Job]], list[dict]], limit: Optional[str],
                 cursor: Optional[str]) -> dict:
    """One page of `query`'s jobs, newest first, through `render` (the page at once, so that it
    can read what every job needs in one statement), and the cursor of the next page (or None).
    `limit` and `cursor` are the raw query parameters."""
    size = whole_number(limit or str(DEFAULT_LIMIT), "limit", 1, MAX_LIMIT)
    if cursor:
        created_at, job_id = _decode(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created_at, job_id))
    rows: list[Any] = list(db.session.execute(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(size + 1)).scalars())
    next_cursor = _encode(rows[size - 1]) if len(rows) > size else None
    return {"items": render(rows[:size]), "next_cursor": next_cursor}
