"""`Idempotency-Key`: the same key and body within 24 h give back the same job, no second hold."""
from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Optional

from renderq.db import db
from renderq.errors import IdempotencyKeyReused
from renderq.models import IdempotencyKey, Job

KEY_LIFETIME = timedelta(hours=24)
MAX_KEY_LENGTH = 255


def fingerprint(**parts: object) -> str:
    """A digest of what was asked for: the same key with another body is a client error."""
    canonical = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def replayed_job(user_id: int, key: str, digest: str) -> Optional[uuid.UUID]:
    """The job an earlier request with this key made, if the key is younger than a day and the
    job is still kept; IdempotencyKeyReused if the body differs. Runs under the user's row lock, so two requests with one key cannot both miss."""
    existing = db.session.get(IdempotencyKey, (user_id, key), populate_existing=True)
    if existing is None:
        return None
    expired = existing.created_at < datetime.now(timezone.utc) - KEY_LIFETIME
    if expired or db.session.get(Job, existing.job_id) is None:  # or its job was purged after its TTL
        db.session.delete(existing)
        db.session.flush()
        return None
    if existing.fingerprint != digest:
        raise IdempotencyKeyReused()
    return existing.job_id


def remember(user_id: int, key: str, digest: str, job_id: uuid.UUID) -> None:
    db.session.add(IdempotencyKey(user_id=user_id, key=key, fingerprint=digest, job_id=job_id))
