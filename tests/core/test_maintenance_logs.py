"""Beat's maintenance runs every few seconds: a run logs one INFO line when it did something,
and nothing at INFO when it did not."""
from __future__ import annotations

import logging
import threading
import uuid
from datetime import datetime, timedelta, timezone

from renderq.enums import Status
from renderq.jobs import maintenance
from tests.core.conftest import new_job, new_user


def maintenance_lines(caplog, level: int) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == maintenance.log.name and record.levelno == level]


def test_idle_runs_log_nothing_at_info(ctx, caplog):
    caplog.set_level(logging.DEBUG)
    maintenance.reconcile()
    maintenance.process_background()
    # This thread's: another app's dispatcher thread in this test process may still be logging.
    assert not [record for record in caplog.records
                if record.levelno >= logging.INFO and record.thread == threading.get_ident()]
    assert maintenance_lines(caplog, logging.DEBUG) == ["📋 [QUEUE] reconcile: nothing to do",
                                                        "🔁 [BACKGROUND] sweep: nothing to do"]


def test_a_run_that_did_something_says_what_in_one_line(ctx, caplog):
    caplog.set_level(logging.DEBUG)
    # an attempt message sent an hour ago that never started anything: lost
    new_job(new_user(), Status.PENDING, dispatch_token=uuid.uuid4(),
            dispatched_at=datetime.now(timezone.utc) - timedelta(hours=1))
    maintenance.reconcile()
    assert maintenance_lines(caplog, logging.INFO) == ["📋 [QUEUE] reconcile: re-sent 1"]
