"""The transition table is the state machine: the code follows it to the letter, and it never
lets a job leave a terminal status except by an admin's retry."""
from __future__ import annotations

import uuid
from typing import Callable

import pytest

from renderq.db import db
from renderq.enums import ACTIVE_STATUSES, TERMINAL_STATUSES, AttemptOutcome, Status
from renderq.jobs import lifecycle
from renderq.jobs.lifecycle import TRANSITIONS, AttemptRecord, Claim
from renderq.runtime import settings
from tests.core.conftest import new_job, new_user


def _claim(job) -> Claim:
    return Claim(job.id, job.lease_token, job.kind, job.user_id, None, {}, job.attempts, job.retry_count,
                 job.created_at, job.created_at)


def _attempt(outcome: AttemptOutcome) -> AttemptRecord:
    return AttemptRecord(outcome, None, 0.01)


def _claim_background(job) -> bool:
    claimed = lifecycle.claim_background_batch(10, settings())
    db.session.commit()
    return job.id in [row.id for row in claimed]


def _transient(attempts: int, retry_count: int, expected: Status) -> Callable:
    def drive(job) -> bool:
        step, _ = lifecycle.record_transient_failure(_claim(job), "GENERATOR_BUSY", "503",
                                                     _attempt(AttemptOutcome.TRANSIENT), settings())
        return step is not None and step.status == expected
    drive.shape = dict(attempts=attempts, retry_count=retry_count)
    return drive


DRIVERS: dict[str, Callable] = {
    "claim": lambda job: lifecycle.claim(job.id, job.dispatch_token, 30, "test-host") is not None,
    "claim_background": _claim_background,
    "retry_later": _transient(attempts=1, retry_count=0, expected=Status.RETRYING),
    "to_background": _transient(attempts=6, retry_count=0, expected=Status.PENDING_BACKGROUND_RETRY),
    "succeed": lambda job: lifecycle.succeed(_claim(job), "results/x.png", _attempt(AttemptOutcome.SUCCEEDED),
                                             settings()) is not None,
    "block": lambda job: lifecycle.block(_claim(job), "COPYRIGHT_VIOLATION", _attempt(AttemptOutcome.BLOCKED),
                                         settings()) is not None,
    "fail": lambda job: lifecycle.fail(_claim(job), "INVALID_INPUT", "400", _attempt(AttemptOutcome.FAILED),
                                       settings()) is not None,
    "expire": lambda job: job.id in [finished.job_id for finished in lifecycle.expire_background(settings())],
    "cancel": lambda job: lifecycle.cancel(job.id, settings()) is not None,
    "requeue": lambda job: lifecycle.requeue_failed(job.id, fair_tag=1) is not None,
}
# Rows the background tier has given up on, so that `expire` has something to expire.
SHAPES = {"expire": dict(retry_count=3, attempts=9)}


def test_every_transition_has_a_driver_here():
    assert set(DRIVERS) == set(TRANSITIONS)


def test_no_transition_leaves_a_terminal_status_but_an_admins_retry():
    leaving_terminal = {name for name, move in TRANSITIONS.items() if move.sources & TERMINAL_STATUSES}
    assert leaving_terminal == {"requeue"}


def test_every_status_is_reachable_and_every_active_one_can_finish():
    reachable, frontier = {Status.PENDING}, [Status.PENDING]
    while frontier:
        status = frontier.pop()
        for move in TRANSITIONS.values():
            if status in move.sources and move.target not in reachable:
                reachable.add(move.target)
                frontier.append(move.target)
    assert reachable == set(Status)
    for status in ACTIVE_STATUSES:
        assert any(status in move.sources and move.target in TERMINAL_STATUSES for move in TRANSITIONS.values())


@pytest.mark.parametrize("name", sorted(TRANSITIONS))
@pytest.mark.parametrize("status", list(Status))
def test_the_guarded_update_wins_exactly_from_the_listed_statuses(ctx, name, status):
    user = new_user()
    drive = DRIVERS[name]
    shape = {**getattr(drive, "shape", {}), **SHAPES.get(name, {})}
    job = new_job(user, status, lease_token=uuid.uuid4(), dispatch_token=uuid.uuid4(), **shape)
    won = drive(job)
    assert won == (status in TRANSITIONS[name].sources), "%s from %s" % (name, status)
