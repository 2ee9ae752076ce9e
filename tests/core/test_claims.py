"""Claims and leases, called directly: a recovery loses to a lease renewed in the meantime, and
a background try that never started is sent again without spending the try."""
from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import text

from renderq.db import db
from renderq.enums import AttemptOutcome, Status
from renderq.jobs import lease, lifecycle, scheduler
from renderq.jobs.lifecycle import AttemptRecord
from renderq.models import Job
from renderq.runtime import settings
from tests.core.conftest import new_job, new_user


def test_a_recovery_loses_to_a_lease_renewed_after_it_was_seen_expired(ctx):
    job = new_job(new_user(), Status.PENDING, dispatch_token=uuid.uuid4())
    claim = lifecycle.claim(job.id, job.dispatch_token, 30, "test-host")
    db.session.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                       {"id": job.id})
    db.session.commit()
    seen = [expired for expired in lease.expired_claims() if expired.job_id == job.id]
    assert len(seen) == 1
    # the worker was only slow: its renewal lands between the reconciler's read and its UPDATE
    db.session.execute(text("UPDATE jobs SET lease_expires_at = now() + interval '30 seconds' WHERE id = :id"),
                       {"id": job.id})
    db.session.commit()
    step, _ = lifecycle.record_transient_failure(seen[0], "WORKER_LOST", "lease expired",
                                                 AttemptRecord(AttemptOutcome.LOST, "WORKER_LOST", 0), settings(),
                                                 guard=lease.still_expired(seen[0]))
    assert step is None
    row = db.session.get(Job, job.id, populate_existing=True)
    assert (row.status, row.lease_token, row.attempts) == (Status.PROCESSING, claim.token, 1)


def test_a_background_try_that_never_started_is_sent_again_and_not_spent(ctx):
    job = new_job(new_user(), Status.PENDING_BACKGROUND_RETRY, retry_count=1, attempts=7)
    claimed = lifecycle.claim_background_batch(1, settings())
    db.session.commit()
    assert [row.id for row in claimed] == [job.id]
    db.session.execute(text("UPDATE jobs SET dispatched_at = now() - interval '10 minutes' WHERE id = :id"),
                       {"id": job.id})
    db.session.commit()
    assert job.id not in [expired.job_id for expired in lease.expired_claims()]  # no lease, so never "lost"
    assert scheduler.recover_lost_dispatches(timedelta(seconds=5)) >= 1
    row = db.session.get(Job, job.id, populate_existing=True)
    assert (row.status, row.retry_count, row.attempts) == (Status.PROCESSING, 2, 7)
    assert row.dispatch_token != claimed[0].dispatch_token  # a new message: the lost one's token is void
