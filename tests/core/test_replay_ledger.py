"""A replay's ledger and its batch, on the real database with no worker: each generation of a
job has its own hold and its own capture or release; the credit check, the skip reasons and
the most jobs one replay may take (10,000 in one transaction)."""
from __future__ import annotations

import uuid

from sqlalchemy import func, select, text

from renderq import billing
from renderq.db import db
from renderq.enums import EntryKind, Status
from renderq.jobs import lifecycle, replay
from renderq.models import Job, JobReplay, LedgerEntry, User
from tests.core.conftest import new_job, new_user


def failed_job(user: User, price: int = 1, kind: str = "image.generate") -> Job:
    """A job that was held for, failed and released, as a real failure leaves it (a
    photo.render one without its photo, as if the photo were gone)."""
    job = new_job(user, price=price)
    db.session.execute(text("UPDATE jobs SET status = 'failed', error_code = 'GENERATOR_BUSY', completed_at = now(), "
                            "kind = :kind WHERE id = :id"), {"id": job.id, "kind": kind})
    assert billing.settle(job.id, EntryKind.RELEASE)
    db.session.commit()
    return job


def ledger(job_id: uuid.UUID) -> list[tuple[int, str]]:
    return sorted(db.session.execute(select(LedgerEntry.generation, LedgerEntry.entry_type)
                                     .where(LedgerEntry.job_id == job_id)).all())


def balances(user_id: int) -> tuple[int, int]:
    user = db.session.get(User, user_id, populate_existing=True)
    return user.balance, user.balance - user.held


def test_each_generation_is_held_and_settled_once(ctx):
    user = new_user(balance=3)
    job = failed_job(user, price=2)
    report = replay.replay(replay.ReplayFilter(limit=5, user_id=user.id), dry_run=False, requested_by="test")
    assert (report.replayed, report.credits_held) == ([job.id], 2)
    assert balances(user.id) == (3, 1)
    db.session.execute(text("UPDATE jobs SET status = 'processing' WHERE id = :id"), {"id": job.id})
    assert billing.settle(job.id, EntryKind.CAPTURE)
    assert not billing.settle(job.id, EntryKind.CAPTURE) and not billing.settle(job.id, EntryKind.RELEASE)
    db.session.commit()
    assert balances(user.id) == (1, 1)
    assert ledger(job.id) == [(0, "hold"), (0, "release"), (1, "capture"), (1, "hold")]


def test_jobs_that_cannot_be_replayed_are_skipped_with_their_reason(ctx):
    user = new_user(balance=2)
    fits, too_dear = failed_job(user, price=1), failed_job(user, price=2)
    photo_gone = failed_job(user, kind="photo.render")
    still_held = new_job(user, price=0)  # failed, yet its hold was never settled
    db.session.execute(text("UPDATE jobs SET status = 'failed', completed_at = now(), kind = 'image.generate' "
                            "WHERE id = :id"), {"id": still_held.id})
    db.session.commit()
    report = replay.replay(replay.ReplayFilter(limit=10, user_id=user.id), dry_run=False, requested_by="test")
    assert report.replayed == [fits.id]
    assert [(skip.job_id, skip.reason) for skip in report.skipped] == [
        (too_dear.id, "INSUFFICIENT_CREDITS"), (photo_gone.id, "PHOTO_GONE"), (still_held.id, "HOLD_NOT_RELEASED")]
    record = db.session.get(JobReplay, report.replay_id)
    assert record.skipped_reasons == {"INSUFFICIENT_CREDITS": 1, "PHOTO_GONE": 1, "HOLD_NOT_RELEASED": 1}
    assert db.session.get(Job, too_dear.id, populate_existing=True).status == Status.FAILED


def test_a_requeue_of_a_job_that_is_no_longer_failed_changes_nothing(ctx):
    user = new_user()
    job = failed_job(user)
    assert lifecycle.requeue_failed_batch({job.id: 7})
    db.session.commit()
    assert lifecycle.requeue_failed_batch({job.id: 8}) == []
    job = db.session.get(Job, job.id, populate_existing=True)
    assert (job.status, job.generation, job.fair_tag) == (Status.PENDING, 1, 7)


def test_ten_thousand_failed_jobs_in_one_replay(ctx):
    rich, poor = new_user(balance=20_000), new_user(balance=100)
    for user, count in ((rich, 9_800), (poor, 200)):
        db.session.execute(text("""
            WITH made AS (
                INSERT INTO jobs (id, user_id, kind, params, price, status, error_code, completed_at, attempts,
                                  retry_count, fair_tag, generation, created_at, updated_at)
                SELECT gen_random_uuid(), :user_id, 'image.generate', '{}', 1, 'failed', 'GENERATOR_BUSY',
                       now() - make_interval(secs => n), 9, 3, 0, 0, now(), now()
                  FROM generate_series(1, :count) AS n RETURNING id)
            INSERT INTO ledger_entries (user_id, job_id, generation, entry_type, amount)
            SELECT :user_id, id, 0, kind, 1 FROM made, (VALUES ('hold'), ('release')) AS kinds(kind)
        """), {"user_id": user.id, "count": count})
    db.session.commit()
    spec = replay.ReplayFilter(limit=replay.MAX_LIMIT, error_code=replay.GENERATOR_UNAVAILABLE)
    report = replay.replay(spec, dry_run=False, requested_by="test")
    assert (len(report.replayed), report.credits_held) == (9_900, 9_900)
    assert report.skipped_reasons == {"INSUFFICIENT_CREDITS": 100}  # the poorer user's newest failures
    assert balances(rich.id) == (20_000, 20_000 - 9_800) and balances(poor.id) == (100, 0)
    holds = db.session.execute(select(func.count()).select_from(LedgerEntry).where(
        LedgerEntry.entry_type == EntryKind.HOLD, LedgerEntry.generation == 1)).scalar()
    assert holds == 9_900
    tags = db.session.execute(select(Job.fair_tag).where(Job.user_id == rich.id, Job.generation == 1)
                              .order_by(Job.completed_at)).scalars().all()
    assert len(set(tags)) == 9_800  # each at its own place in the fair queue
