"""A status change's event reaches the job's stream, with the stream's lifetime, also right
after Redis restarted and forgot the script that appends it."""
from __future__ import annotations

from renderq import events
from renderq.db import db
from renderq.enums import Status
from renderq.jobs import lifecycle
from renderq.runtime import redis_client, settings
from tests.core.conftest import new_job, new_user


def test_a_cancel_is_appended_to_the_jobs_stream_even_after_redis_forgot_its_scripts(ctx):
    user = new_user()
    jobs = [new_job(user), new_job(user)]
    try:
        assert lifecycle.cancel(jobs[0].id, settings())
        redis_client().script_flush()  # what a restarted Redis has forgotten
        assert lifecycle.cancel(jobs[1].id, settings())
        for job in jobs:
            (_, state), = events.since(job.id, "0")
            assert state["status"] == Status.CANCELED
            assert 0 < redis_client().ttl(events.stream(job.id)) <= events.KEEP_SECONDS
    finally:
        redis_client().delete(*(events.stream(job.id) for job in jobs))


def test_a_batch_of_changes_reaches_each_jobs_own_stream(ctx):
    user = new_user()
    jobs = [new_job(user, Status.PENDING_BACKGROUND_RETRY) for _ in range(3)]
    try:
        claimed = lifecycle.claim_background_batch(3, settings())
        db.session.commit()
        redis_client().script_flush()
        events.record(claimed)
        for job in jobs:
            (_, state), = events.since(job.id, "0")
            assert state["status"] == Status.PROCESSING and state["retry_count"] == 1
    finally:
        redis_client().delete(*(events.stream(job.id) for job in jobs))
