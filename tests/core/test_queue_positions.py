"""queue_position read for a page of jobs at once: the same figures as one job at a time, in one
statement however many of the page's jobs wait."""
from __future__ import annotations

import uuid

from sqlalchemy import event

from renderq.db import db
from renderq.enums import Status
from renderq.jobs import scheduler
from tests.core.conftest import new_job, new_user


def test_a_pages_positions_equal_each_jobs_own_and_take_one_statement(ctx):
    users = [new_user(balance=20) for _ in range(3)]
    waiting = [new_job(users[index % 3], Status.PENDING, fair_tag=index // 3) for index in range(12)]
    sent = new_job(users[0], Status.PENDING, dispatch_token=uuid.uuid4())  # its message is out: 0
    done = new_job(users[1], Status.COMPLETED, hold=False)  # not waiting: no position
    page = [done, *reversed(waiting), sent]
    alone = {job.id: scheduler.queue_position(job) for job in page}

    statements = []
    listen = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(db.engine, "before_cursor_execute", listen)
    try:
        together = scheduler.queue_positions(page)
    finally:
        event.remove(db.engine, "before_cursor_execute", listen)

    assert together == alone
    assert sorted(alone[job.id] for job in waiting) == list(range(12))
    assert (alone[sent.id], alone[done.id]) == (0, None)
    assert len(statements) == 1
