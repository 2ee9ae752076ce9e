"""Cursor paging, newest first, stable under inserts: the cursor is the last row's (created_at, id)."""
from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any, Optional

from flask import request
from sqlalchemy import Select, tuple_

from webapp.errors import ApiError
from webapp.extensions import db
from webapp.models import STATUSES, Job

DEFAULT_LIMIT, MAX_LIMIT = 20, 100


def _limit() -> int:
    raw = request.args.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, "INVALID_LIMIT", "limit must be a whole number from 1 to %d." % MAX_LIMIT)
    return int(raw)


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


def page_of_jobs(query: Select) -> tuple[list[Job], Optional[str]]:
    """One page of `query`'s jobs, newest first, and the cursor of the next page (or None)."""
    limit = _limit()
    cursor = request.args.get("cursor")
    if cursor:
        created_at, job_id = _decode(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created_at, job_id))
    rows: list[Any] = list(db.session.execute(
        query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).scalars())
    next_cursor = _encode(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor
