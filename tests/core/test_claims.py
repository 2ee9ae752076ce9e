"""Claims and leases, called directly: a recovery loses to a lease renewed in the meantime, a
background try that never started is sent again without spending the try, and an attempt that
wakes after its claim was recovered steps aside before it calls the generator."""
from __future__ import annotations

import dataclasses
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text

from renderq import notify, storage, workers
from renderq.db import IDLE_IN_TRANSACTION_SECONDS, db
from renderq.enums import AttemptOutcome, Status
from renderq.jobs import attempt, lease, lifecycle, scheduler
from renderq.jobs.lifecycle import AttemptRecord
from renderq.models import Job, JobAttempt
from renderq.runtime import settings
from tests.conftest import generator_calls
from tests.core.conftest import new_job, new_user


@pytest.fixture(scope="module", autouse=True)
def no_keeper_left_behind():
    """The attempts run here start this process's lease keeper: stop it with the module."""
    yield
    workers.stop_keeper()


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


def test_an_attempt_that_wakes_after_its_claim_was_recovered_does_not_call_the_generator(ctx, generator):
    """The worker froze (SIGSTOP, a long GC pause) between its claim and its generator call, for
    longer than the lease: the reconciler recovered the job meanwhile. The call it would make now
    belongs to no attempt (the next one is the job's), so it makes none and writes nothing."""
    config = dataclasses.replace(settings(), generator_url=generator, job_lease_seconds=30)
    job = new_job(new_user(), Status.PENDING, kind="image.generate", dispatch_token=uuid.uuid4())
    claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    db.session.execute(text("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = :id"),
                       {"id": job.id})
    db.session.commit()
    [expired] = [seen for seen in lease.expired_claims() if seen.job_id == job.id]
    step, _ = lifecycle.record_transient_failure(expired, "WORKER_LOST", "lease expired",
                                                 AttemptRecord(AttemptOutcome.LOST, "WORKER_LOST", 0), config,
                                                 guard=lease.still_expired(expired))
    assert step is not None and step.status == Status.RETRYING

    woken = dataclasses.replace(claim, taken_at=time.monotonic() - config.job_lease_seconds - 1)
    attempt._attempt(woken, config)

    assert generator_calls(generator, str(job.id))["calls"] == 0
    row = db.session.get(Job, job.id, populate_existing=True)
    assert (row.status, row.attempts, row.lease_token) == (Status.RETRYING, 1, None)
    history = db.session.query(JobAttempt.outcome).filter(JobAttempt.job_id == job.id).all()
    assert [outcome for (outcome,) in history] == [AttemptOutcome.LOST]


def test_an_attempt_still_holding_its_claim_after_a_long_pause_calls_the_generator(ctx, generator):
    """The same pause, but no reconciler ran meanwhile: the claim is still the job's, so the
    attempt goes on and its answer is recorded."""
    config = dataclasses.replace(settings(), generator_url=generator, job_lease_seconds=30)
    job = new_job(new_user(), Status.PENDING, kind="image.generate", dispatch_token=uuid.uuid4())
    claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    woken = dataclasses.replace(claim, taken_at=time.monotonic() - config.job_lease_seconds - 1)
    attempt._attempt(woken, config)

    assert generator_calls(generator, str(job.id))["calls"] == 1
    row = db.session.get(Job, job.id, populate_existing=True)
    assert (row.status, row.outcome, row.attempts) == (Status.COMPLETED, "succeeded", 1)


def test_an_attempt_whose_job_was_canceled_mid_call_still_records_its_call(ctx, generator):
    """The user canceled while the generator was answering: the job stays canceled (released,
    not charged), and the call it already made is in the job's history, as every call is."""
    config = dataclasses.replace(settings(), generator_url=generator)
    job = new_job(new_user(), Status.PENDING, kind="image.generate", dispatch_token=uuid.uuid4())
    claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    assert lifecycle.cancel(job.id, config) is not None
    attempt._attempt(claim, config)

    assert generator_calls(generator, str(job.id))["calls"] == 1
    row = db.session.get(Job, job.id, populate_existing=True)
    assert (row.status, row.outcome, row.result_path) == (Status.CANCELED, None, None)
    history = db.session.query(JobAttempt.number, JobAttempt.outcome).filter(JobAttempt.job_id == job.id).all()
    assert history == [(1, AttemptOutcome.SUCCEEDED)]


def test_a_recovered_attempt_records_no_call_once_the_next_attempt_has_started(ctx, generator):
    """The late attempt's record would sit beside the next attempt's: the next one owns the job."""
    config = dataclasses.replace(settings(), generator_url=generator)
    job = new_job(new_user(), Status.PENDING, kind="image.generate", dispatch_token=uuid.uuid4())
    claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    db.session.execute(text("UPDATE jobs SET status = 'pending', dispatch_token = :ticket, lease_token = NULL "
                            "WHERE id = :id"), {"id": job.id, "ticket": job.dispatch_token})
    db.session.commit()
    assert lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host") is not None
    attempt._attempt(claim, config)

    history = db.session.query(JobAttempt.number).filter(JobAttempt.job_id == job.id).all()
    assert history == []


def test_a_claims_clock_starts_before_its_statement(ctx, core_app):
    """A process frozen while its claim is on the wire (committed by the database, not yet read)
    must count that time against the lease: the claim's clock starts before it is sent. Here the
    statement waits 1.5 s for a row lock another transaction holds, as it would for a freeze."""
    import threading

    from renderq.db import db as database

    job = new_job(new_user(), Status.PENDING, dispatch_token=uuid.uuid4())
    job_id, ticket = job.id, job.dispatch_token
    blocker = database.engine.connect()
    blocker.execute(text("SELECT 1 FROM jobs WHERE id = :id FOR UPDATE"), {"id": job_id})
    claimed = []

    def claim_in_another_thread() -> None:
        with core_app.app_context():
            claimed.append(lifecycle.claim(job_id, ticket, 30, "test-host"))

    thread = threading.Thread(target=claim_in_another_thread)
    thread.start()
    time.sleep(1.5)
    released = time.monotonic()
    blocker.rollback()
    blocker.close()
    thread.join(10)
    assert claimed and claimed[0] is not None
    assert time.monotonic() - claimed[0].taken_at >= 1.5
    # the attempt's record starts when the claim took the row, not when it began to wait for it
    waited = db.session.execute(text("SELECT attempt_started_at - now() + make_interval(secs => :ago) FROM jobs "
                                     "WHERE id = :id"), {"id": job_id, "ago": time.monotonic() - released}).scalar()
    assert waited.total_seconds() > -0.1


def test_an_attempts_record_spans_from_its_claim_to_its_outcome(ctx, generator):
    """The history says when an attempt ran: from its claim (the row's started_at) for as long as
    it took, its generator call included, however long the bookkeeping between the two (a slow
    commit, Redis restarting) delayed the call."""
    config = dataclasses.replace(settings(), generator_url=generator)
    job = new_job(new_user(), Status.PENDING, kind="image.generate", dispatch_token=uuid.uuid4())
    claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    time.sleep(0.6)  # between the claim and the call
    attempt._attempt(claim, config)

    [(duration_ms,)] = db.session.query(JobAttempt.duration_ms).filter(JobAttempt.job_id == job.id).all()
    assert duration_ms >= 600


def test_an_attempts_record_spans_its_call_when_the_claims_answer_came_late(ctx, generator):
    """The claim took the row, then its answer was late (here a trigger holds the statement
    0.8 s after the row changed; in a run, a worker whose threads held it up): the record still
    ends after the call, by the database's clock."""
    config = dataclasses.replace(settings(), generator_url=generator)
    job = new_job(new_user(), Status.PENDING, kind="image.generate", dispatch_token=uuid.uuid4())
    db.session.execute(text("""
        CREATE FUNCTION late_claim() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(0.8); RETURN NEW; END $$;
        CREATE TRIGGER late_claim AFTER UPDATE OF attempts ON jobs FOR EACH ROW EXECUTE FUNCTION late_claim();
    """))
    db.session.commit()
    try:
        claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    finally:
        db.session.execute(text("DROP TRIGGER late_claim ON jobs; DROP FUNCTION late_claim()"))
        db.session.commit()
    before_the_call = db.session.execute(text("SELECT clock_timestamp()")).scalar()
    db.session.rollback()
    attempt._attempt(claim, config)

    started_at, duration_ms = db.session.execute(text(
        "SELECT started_at, duration_ms FROM job_attempts WHERE job_id = :id"), {"id": job.id}).one()
    assert started_at < before_the_call
    assert started_at + timedelta(milliseconds=duration_ms) >= before_the_call


def test_an_outcome_recorded_again_after_its_commit_went_unanswered_is_recorded_once(ctx):
    """PostgreSQL crashed after the commit that recorded a transient failure was durable and
    before its answer reached the worker, which records the outcome again once the database is
    back: the job moved on the first time, and its history holds the attempt once."""
    config = settings()
    job = new_job(new_user(), Status.PENDING, dispatch_token=uuid.uuid4())
    claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    outcome = AttemptRecord(AttemptOutcome.TRANSIENT, "GENERATOR_BUSY")
    first, _ = lifecycle.record_transient_failure(claim, "GENERATOR_BUSY", "busy", outcome, config)
    again, _ = lifecycle.record_transient_failure(claim, "GENERATOR_BUSY", "busy", outcome, config)
    assert (first is not None, again) == (True, None)
    assert db.session.query(JobAttempt).filter(JobAttempt.job_id == job.id).count() == 1


def test_a_success_recorded_again_after_its_commit_went_unanswered_keeps_its_result(ctx, tmp_path, monkeypatch):
    """The same for a success, with a storage outside the database: the second recording finds
    the job finished and must not delete the result the first one delivered (and charged)."""
    monkeypatch.setattr(storage, "storage", lambda: storage.FilesystemStorage(str(tmp_path)))
    config = settings()
    job = new_job(new_user(), Status.PENDING, dispatch_token=uuid.uuid4())
    claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    outcome = AttemptRecord(AttemptOutcome.SUCCEEDED, None)
    for _ in range(2):
        attempt._record_success(claim, b"\x89PNG result", outcome, config)
    row = db.session.get(Job, job.id, populate_existing=True)
    assert (row.status, row.outcome) == (Status.COMPLETED, "succeeded")
    assert storage.storage().get(row.result_path) == b"\x89PNG result"
    assert db.session.query(JobAttempt).filter(JobAttempt.job_id == job.id).count() == 1


def test_an_attempt_paused_inside_its_outcomes_transaction_past_the_servers_patience_records_it_on_waking(
        ctx, generator, monkeypatch):
    """PostgreSQL ends a session that stays silent inside a transaction (renderq.db
    IDLE_IN_TRANSACTION_SECONDS) and with it the locks it held; the attempt, once awake, finds its
    session gone, and writes its outcome again, as after a dropped connection. A block's finish
    is such a transaction: its notification, in the user's locale, is written after the UPDATE
    (a success's finish is a single statement, with no transaction to pause in)."""
    config = dataclasses.replace(settings(), generator_url=generator, job_lease_seconds=60)
    job = new_job(new_user(), Status.PENDING, kind="image.generate", dispatch_token=uuid.uuid4())
    job.params = {"style": "sepia", "prompt": "[block:COPYRIGHT_VIOLATION]"}
    db.session.commit()
    claim = lifecycle.claim(job.id, job.dispatch_token, config.job_lease_seconds, "test-host")
    record, pauses = notify.record, []

    def record_after_a_pause(*args):
        if not pauses:  # the job's row is locked by now: the finish's UPDATE ran
            pauses.append(1)
            time.sleep(IDLE_IN_TRANSACTION_SECONDS + 1)
        return record(*args)

    monkeypatch.setattr(notify, "record", record_after_a_pause)
    attempt._attempt(claim, config)

    assert pauses and generator_calls(generator, str(job.id))["calls"] == 1
    row = db.session.get(Job, job.id, populate_existing=True)
    assert (row.status, row.outcome, row.block_reason) == (Status.COMPLETED, "blocked", "COPYRIGHT_VIOLATION")
    assert db.session.execute(text("SELECT count(*) FROM job_attempts WHERE job_id = :id"), {"id": job.id}).scalar() == 1
    assert db.session.execute(text("SELECT count(*) FROM notifications WHERE job_id = :id"),
                              {"id": job.id}).scalar() == 1
