"""The lease of a running attempt: renewed while the attempt runs, so the reconciler can tell
a dead worker (lease expired) from a slow generator (lease renewed)."""
from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

from flask import current_app
from sqlalchemy import and_, func, select

from renderq.db import db
from renderq.enums import Status
from renderq.jobs.lifecycle import CLAIM_COLUMNS, Claim, claim_from, guarded_update
from renderq.logs import job_logging
from renderq.models import Job

log = logging.getLogger(__name__)


def renew(job_id: uuid.UUID, token: uuid.UUID, lease_seconds: float) -> bool:
    return guarded_update(job_id, and_(Job.status == Status.PROCESSING, Job.lease_token == token),
                 dict(lease_expires_at=func.now() + timedelta(seconds=lease_seconds))) is not None


def expired_claims() -> list[Claim]:
    """Attempts whose worker stopped renewing the lease: the worker died or hung."""
    rows = db.session.execute(
        select(Job.id, Job.lease_token, *CLAIM_COLUMNS)
        .where(Job.status == Status.PROCESSING, Job.lease_expires_at < func.now())
        .limit(500)
    ).all()
    db.session.rollback()
    return [claim_from(row, row.lease_token) for row in rows]


class LeaseKeeper:
    """Renews the claim's lease every third of its length while the attempt runs."""

    def __init__(self, claim: Claim, lease_seconds: float):
        self.claim = claim
        self.lease_seconds = lease_seconds
        self.stopped = threading.Event()
        self.app = current_app._get_current_object()
        self.thread = threading.Thread(target=self._renew, name="lease-%s" % claim.job_id, daemon=True)

    def _renew(self) -> None:
        with self.app.app_context(), job_logging(self.claim.job_id):
            while not self.stopped.wait(self.lease_seconds / 3):
                try:
                    if not renew(self.claim.job_id, self.claim.token, self.lease_seconds):
                        return  # the claim was taken away (recovered or canceled): nothing to keep
                except Exception:  # a database hiccup: the next beat tries again before the lease ends
                    log.warning("🔧 [JOB_PROCESSOR] could not renew the lease", exc_info=True)

    def __enter__(self) -> "LeaseKeeper":
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopped.set()
        self.thread.join()
