"""Ledger arithmetic and notification idempotency, on the real database, with no worker."""
from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
from sqlalchemy import event, func, select

from config import load_settings
from config.kinds import get_kind
from renderq import billing, notify, storage
from renderq.db import db
from renderq.enums import AttemptOutcome, EntryKind, Event, Outcome, Status
from renderq.errors import InsufficientCredits
from renderq.jobs import lifecycle, submit
from renderq.jobs.lifecycle import AttemptRecord
from renderq.models import Job, LedgerEntry, Notification, User
from tests.core.conftest import new_job, new_user


def balances(user_id: int) -> tuple[int, int]:
    user = db.session.get(User, user_id, populate_existing=True)
    return user.balance, user.balance - user.held


def entries(job_id: uuid.UUID) -> list[str]:
    return sorted(db.session.execute(select(LedgerEntry.entry_type).where(LedgerEntry.job_id == job_id)).scalars())


def test_a_hold_lowers_available_and_a_capture_charges_once(ctx):
    user = new_user(balance=5)
    job = new_job(user, price=2)
    assert balances(user.id) == (5, 3)
    assert billing.settle(job.id, EntryKind.CAPTURE)
    assert not billing.settle(job.id, EntryKind.CAPTURE)  # a redelivered finish
    assert not billing.settle(job.id, EntryKind.RELEASE)  # and a racing one of the other kind
    db.session.commit()
    assert balances(user.id) == (3, 3)
    assert entries(job.id) == ["capture", "hold"]


def test_a_release_gives_the_hold_back_and_charges_nothing(ctx):
    user = new_user(balance=5)
    job = new_job(user, price=2)
    assert billing.settle(job.id, EntryKind.RELEASE)
    assert not billing.settle(job.id, EntryKind.CAPTURE)
    db.session.commit()
    assert balances(user.id) == (5, 5)


def test_a_submission_past_what_is_available_is_refused_and_writes_nothing(ctx):
    user = new_user(balance=3)
    new_job(user, price=2)
    with pytest.raises(InsufficientCredits) as refused:
        submit.submit(user.id, get_kind("image.generate"), {"style": "sepia", "prompt": ""})  # costs 2
    assert (refused.value.price, refused.value.available) == (2, 1)
    assert db.session.execute(select(func.count()).select_from(LedgerEntry)
                              .where(LedgerEntry.user_id == user.id)).scalar() == 2  # the topup and one hold
    assert db.session.execute(select(func.count()).select_from(Job).where(Job.user_id == user.id)).scalar() == 1
    assert balances(user.id) == (3, 1)


def test_balance_is_topups_minus_captures_and_available_subtracts_open_holds(ctx):
    user = new_user(balance=10)
    jobs = [new_job(user, price=price) for price in (1, 2, 3)]
    billing.settle(jobs[0].id, EntryKind.CAPTURE)
    billing.settle(jobs[1].id, EntryKind.RELEASE)
    billing.top_up(billing.lock_user(user.id), 4)
    db.session.commit()
    sums = dict(db.session.execute(select(LedgerEntry.entry_type, func.sum(LedgerEntry.amount))
                                   .where(LedgerEntry.user_id == user.id).group_by(LedgerEntry.entry_type)).all())
    assert balances(user.id) == (sums["topup"] - sums["capture"], 14 - 1 - 3)


@pytest.mark.parametrize("status, outcome, notify_on_failure, event", [
    (Status.COMPLETED, Outcome.SUCCEEDED, False, Event.SUCCEEDED),
    (Status.COMPLETED, Outcome.BLOCKED, False, Event.BLOCKED),
    (Status.FAILED, None, False, None),
    (Status.FAILED, None, True, Event.FAILED),
    (Status.CANCELED, None, True, None),
])
def test_who_is_told_what(status, outcome, notify_on_failure, event):
    settings = load_settings({"NOTIFY_ON_FAILURE": str(notify_on_failure)})
    assert notify.event_for(status, outcome, settings) == event


def as_finished(job, user) -> SimpleNamespace:
    """The row the UPDATE that finishes a job returns (notify.JOB_COLUMNS and USER_COLUMNS)."""
    return SimpleNamespace(**{column.key: getattr(job, column.key) for column in notify.JOB_COLUMNS},
                           **{column.key: getattr(user, column.key) for column in notify.USER_COLUMNS})


def test_one_notification_per_job_and_event_however_often_it_is_recorded(ctx, core_app):
    user = new_user()
    user.webhook_url = "https://93.184.216.34/hooks"
    job = new_job(user, Status.COMPLETED, outcome=Outcome.BLOCKED, block_reason="COPYRIGHT_VIOLATION")
    settings = core_app.extensions["renderq.settings"]
    first = notify.record(as_finished(job, user), Event.BLOCKED, settings)
    second = notify.record(as_finished(job, user), Event.BLOCKED, settings)
    db.session.commit()
    assert first is not None and second is None  # the first is to be delivered; the second is no new row
    rows = db.session.execute(select(Notification).where(Notification.job_id == job.id)).scalars().all()
    assert len(rows) == 1 and rows[0].payload["block_reason"] == "COPYRIGHT_VIOLATION"
    assert rows[0].payload["message"].startswith("🚫 This image cannot be processed")


def test_a_user_without_a_webhook_gets_the_row_and_no_delivery(ctx, core_app):
    user = new_user()
    job = new_job(user, Status.COMPLETED, outcome=Outcome.SUCCEEDED)
    assert notify.record(as_finished(job, user), Event.SUCCEEDED, core_app.extensions["renderq.settings"]) is None
    db.session.commit()
    row = db.session.execute(select(Notification).where(Notification.job_id == job.id)).scalar_one()
    assert row.next_delivery_at is None and row.payload["result_url"] == "/api/jobs/%s/result" % job.id


def test_a_success_and_its_result_are_recorded_by_one_statement(ctx, core_app):
    """Where the database is the store, the statement that finishes a success also writes its
    result, and it is the whole finish: one round trip, no transaction around it. An attempt
    whose claim was lost stores nothing."""
    user = new_user()
    settings = core_app.extensions["renderq.settings"]
    job, late = (new_job(user, Status.PENDING, dispatch_token=uuid.uuid4()) for _ in range(2))
    claim = lifecycle.claim(job.id, job.dispatch_token, settings.job_lease_seconds, "test-host")
    key = storage.result_key(job.id, claim.token)
    statements = []

    def record(connection, cursor, statement, *rest):
        statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        finished = lifecycle.succeed(claim, key, AttemptRecord(AttemptOutcome.SUCCEEDED, None), settings,
                                     result=b"the image")
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert finished is not None and len(statements) == 1, statements
    assert storage.storage().get(key) == b"the image"
    assert db.session.execute(select(Job.status, Job.result_path).where(Job.id == job.id)).one() == (
        Status.COMPLETED, key)
    assert entries(job.id) == [EntryKind.CAPTURE, EntryKind.HOLD] and balances(user.id) == (9, 8)

    lost = lifecycle.claim(late.id, late.dispatch_token, settings.job_lease_seconds, "test-host")
    lifecycle.cancel(late.id, settings)  # the job leaves the attempt's hands while it runs
    lost_key = storage.result_key(late.id, lost.token)
    assert lifecycle.succeed(lost, lost_key, AttemptRecord(AttemptOutcome.SUCCEEDED, None), settings,
                             result=b"too late") is None
    with pytest.raises(KeyError):
        storage.storage().get(lost_key)
    assert entries(late.id) == [EntryKind.HOLD, EntryKind.RELEASE] and balances(user.id) == (9, 9)


@pytest.mark.parametrize("webhook_url", ["https://93.184.216.34/hooks", None])
def test_a_success_is_charged_and_notified_by_the_statement_that_finishes_it(ctx, core_app, webhook_url):
    user = new_user()
    user.webhook_url = webhook_url
    job = new_job(user, Status.PENDING, kind="image.generate", dispatch_token=uuid.uuid4())
    settings = core_app.extensions["renderq.settings"]
    claim = lifecycle.claim(job.id, job.dispatch_token, settings.job_lease_seconds, "test-host")
    finished = lifecycle.succeed(claim, "results/%s.png" % job.id, AttemptRecord(AttemptOutcome.SUCCEEDED, None),
                                 settings)
    row = db.session.execute(select(Notification).where(Notification.job_id == job.id)).scalar_one()
    assert row.payload == {"event": "job.succeeded", "job_id": str(job.id), "status": "completed",
                           "outcome": "succeeded", "kind": "image.generate",
                           "result_url": "/api/jobs/%s/result" % job.id}
    assert (row.user_id, row.event, row.webhook_id.startswith("msg_")) == (user.id, "succeeded", True)
    assert finished.notification_id == (row.id if webhook_url else None)
    assert (row.next_delivery_at is not None) == bool(webhook_url)
    assert entries(job.id) == [EntryKind.CAPTURE, EntryKind.HOLD] and balances(user.id) == (9, 9)
