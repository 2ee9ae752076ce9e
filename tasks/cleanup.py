"""Purging what is past COMPLETED_JOB_TTL: terminal jobs and their files. The ledger and
the notifications stay (they are the record of what was charged and said)."""
from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from sqlalchemy import delete, func, select

from tasks.attempts import settings
from webapp import storage
from webapp.extensions import db
from webapp.models import TERMINAL_STATUSES, IdempotencyKey, Job, Photo

log = logging.getLogger(__name__)

BATCH = 500


def purge_expired(ttl_seconds: int) -> int:
    """Delete terminal jobs finished more than `ttl_seconds` ago, their results, and photos
    no job refers to any more; returns how many jobs went."""
    media_root = settings().media_root
    cutoff = func.now() - timedelta(seconds=ttl_seconds)
    purged = 0
    while True:
        rows = db.session.execute(
            delete(Job).where(Job.id.in_(
                select(Job.id).where(Job.status.in_(TERMINAL_STATUSES), Job.completed_at < cutoff).limit(BATCH)))
            .returning(Job.id, Job.result_path, Job.photo_id)).all()
        orphans = {row.photo_id for row in rows if row.photo_id} - set(db.session.execute(
            select(Job.photo_id).where(Job.photo_id.in_({row.photo_id for row in rows if row.photo_id}))).scalars())
        photos = db.session.execute(delete(Photo).where(Photo.id.in_(orphans)).returning(Photo.path)).scalars().all()
        db.session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < func.now() - timedelta(days=1)))
        db.session.commit()
        for relative in [row.result_path for row in rows] + list(photos):
            storage.delete(media_root, relative)  # after the commit: a rolled-back purge keeps its files
        purged += len(rows)
        if len(rows) < BATCH:
            return purged


@shared_task(name="renderq.maintenance.cleanup", ignore_result=True)
def cleanup() -> int:
    purged = purge_expired(settings().completed_job_ttl)
    if purged:
        log.info("📋 [QUEUE] purged %d finished job(s) older than COMPLETED_JOB_TTL", purged)
    return purged
