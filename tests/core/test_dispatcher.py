"""The dispatcher thread: asking for a round returns at once; a process that is leaving lets
the rounds it asked for end first."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, select

from renderq.db import db
from renderq.enums import Status
from renderq.jobs import scheduler
from renderq.models import Job, WorkerHost
from tests.core.conftest import new_job, new_user


def test_a_process_that_is_leaving_lets_the_round_it_asked_for_end(ctx):
    host = WorkerHost(name="test-dispatcher/1", slots=1, pool="threads",
                      expires_at=datetime.now(timezone.utc) + timedelta(minutes=5))
    db.session.add(host)
    job = new_job(new_user(), Status.PENDING)
    try:
        scheduler.dispatch_soon()
        scheduler.finish_dispatching(timeout=10)
        assert db.session.execute(select(Job.dispatch_token).where(Job.id == job.id)).scalar() is not None
    finally:
        db.session.rollback()
        db.session.execute(delete(WorkerHost).where(WorkerHost.name == host.name))
        db.session.commit()
