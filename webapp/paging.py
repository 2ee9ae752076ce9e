"""Cursor paging, newest first, stable under inserts: the cursor is the last row's (created_at, id)."""
from __future__ import annotations

import base64
import re
import uuid
from datetime import datetime
from typing import Any, Callable

from flask import request
from sqlalchemy import Select, tuple_

from webapp.errors import ApiError
from webapp.extensions import db
from webapp.models import STATUSES, Job

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
MAX_ID = 2 ** 63 - 1  # PostgreSQL's bigint: no larger id can exist
_WHOLE = re.compile(r"[0-9]{1,19}")


def whole_number(raw: str, name: str, low: int, high: int) -> int:
    """`raw` as an int from low to high, or a 400 naming the parameter (ASCII digits only:
    str.isdigit() would let '²' through to int())."""
    if not _WHOLE.fullmatch(raw) or not low <= int(raw) <= high:
        raise ApiError(400, "INVALID_%s" % name.upper(), "%s must be a whole number from %d to %d." % (name, low, high))
    return int(raw)


def _limit() -> int:
    return whole_number(request.args.get("limit", str(DEFAULT_LIMIT)), "limit", 1, MAX_LIMIT)


def _decode(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "INVALID_CURSOR", "cursor is not one this API handed out; start again without it.") from None


def _encode(job: Job) -> str:
    return base64.urlsafe_b64encode(("%s|%s" % (job.created_at.isoformat(), job.id)).encode()).decode()


def filtered_by_status(query: Select) -> Select:
    """`query` narrowed to `?status=`, if given; 400 for a status that does not exist."""
    status = request.args.get("status")
    if not status:
        return query
    if status not in STATUSES:
        raise ApiError(400, "INVALID_STATUS", "Unknown status %r; valid: %s." % (status, ", ".join(STATUSES)))
    return query.where(Job.status == status)


def page_of_jobs(query: Select, render: Callable[[Job], dict]) -> dict:
    """One page of `query`'s jobs, newest first, each through `render`, and the cursor of the
    next page (or None)."""
    limit = _limit()
    cursor = request.args.get("cursor")
    if cursor:
        created_at, job_id = _decode(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created_at, job_id))
    rows: list[Any] = list(db.session.execute(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).scalars())
    next_cursor = _encode(rows[limit - 1]) if len(rows) > limit else None
    return {"items": [render(job) for job in rows[:limit]], "next_cursor": next_cursor}
