"""queue_position read for a page of jobs at once: the same figures as one job at a time, in one
statement however many of the page's jobs wait; a submission's own position read on the fair
queue's index."""
from __future__ import annotations

import uuid

from sqlalchemy import event, text

from renderq.db import db
from renderq.enums import EntryKind, Status
from renderq.jobs import scheduler, submit
from tests.core.conftest import generic_plan, new_job, new_user


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


def test_a_submissions_place_is_counted_on_the_fair_queue_by_the_plan_a_prepared_statement_keeps(ctx):
    """psycopg prepares a statement run often, and PostgreSQL may then keep one generic plan for
    it. The submission's count of the jobs ahead must still read only waiting jobs: thousands of
    pending jobs whose messages are out (a busy farm) are not ahead of anyone."""
    user = new_user(balance=10)
    db.session.execute(text(
        "INSERT INTO jobs (id, user_id, kind, params, price, status, attempts, retry_count, fair_tag, dispatch_token) "
        "SELECT gen_random_uuid(), :user_id, 'image.generate', '{}', 1, 'pending', 0, 0, number, gen_random_uuid() "
        "FROM generate_series(1, 5000) AS number"), {"user_id": user.id})
    db.session.execute(text("ANALYZE jobs"))
    plan = generic_plan(submit._accept_statement(False, False), {
        "user_id": user.id, "job_id": uuid.uuid4(), "kind": "image.generate", "params": "{}", "price": 1,
        "photo_id": None, "trace_parent": None, "tag_step": scheduler.TAG_STEP, "hold": EntryKind.HOLD})
    assert "ix_jobs_fair_queue" in plan and "ix_jobs_status_kind" not in plan and "Seq Scan on jobs" not in plan, plan
