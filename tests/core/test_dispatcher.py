"""The dispatcher thread: asking for a round returns at once; a process that is leaving lets
the rounds it asked for end first; a round's messages leave together."""
from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
import redis
from kombu.transport.redis import Channel as RedisChannel
from kombu.transport.redis import PublishBatch
from sqlalchemy import delete, event, select
from sqlalchemy.engine import make_url

from renderq import broker
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


def _slot_for(name: str) -> WorkerHost:
    host = WorkerHost(name=name, slots=1, pool="threads", expires_at=datetime.now(timezone.utc) + timedelta(minutes=5))
    db.session.add(host)
    db.session.commit()
    return host


def _withdraw(host: WorkerHost) -> None:
    db.session.rollback()
    db.session.execute(delete(WorkerHost).where(WorkerHost.name == host.name))
    db.session.commit()


def test_an_ask_a_later_round_already_answered_starts_no_round_of_its_own(ctx, monkeypatch):
    dispatcher = scheduler.dispatcher()
    rounds = []
    run_round = dispatcher._round
    monkeypatch.setattr(dispatcher, "_round", lambda look_first: rounds.append(1) or run_round(look_first))
    host = _slot_for("test-dispatcher/2")
    try:
        first = new_job(new_user(), Status.PENDING)
        queued_at = time.monotonic()  # after the commit that queued it
        scheduler.dispatch_soon()
        scheduler.finish_dispatching(timeout=10)
        assert len(rounds) == 1
        assert db.session.execute(select(Job.dispatch_token).where(Job.id == first.id)).scalar() is not None

        dispatcher.ask(queued_at)  # a second ask about the same commit: that round saw it
        scheduler.finish_dispatching(timeout=10)
        assert len(rounds) == 1

        db.session.execute(delete(Job).where(Job.id == first.id))  # its slot comes free
        db.session.commit()
        second = new_job(new_user(), Status.PENDING)
        scheduler.dispatch_soon()  # this commit is newer than any round's read: a round runs
        scheduler.finish_dispatching(timeout=10)
        assert len(rounds) == 2
        assert db.session.execute(select(Job.dispatch_token).where(Job.id == second.id)).scalar() is not None
    finally:
        _withdraw(host)


def test_an_attempts_outcome_asks_for_a_round_as_it_commits(ctx):
    host = _slot_for("test-dispatcher/3")
    try:
        running = new_job(new_user(), Status.PROCESSING)
        waiting = new_job(new_user(), Status.PENDING)
        scheduler.dispatch_on_next_commit()
        db.session.execute(delete(Job).where(Job.id == running.id))
        db.session.commit()  # its slot is free, and nobody calls dispatch_soon
        scheduler.finish_dispatching(timeout=10)
        assert db.session.execute(select(Job.dispatch_token).where(Job.id == waiting.id)).scalar() is not None
    finally:
        _withdraw(host)


def test_while_no_slot_is_free_a_round_does_not_wait_for_the_lock(ctx):
    """Under a backlog every submission asks for a round: with all slots taken, the rounds
    after one that found nothing look without the dispatch lock, which another process holds."""
    dispatcher = scheduler.dispatcher()
    new_job(new_user(), Status.PENDING)  # waiting, and no worker announces a slot
    scheduler.dispatch_soon()
    assert scheduler.finish_dispatching(timeout=10) is None and dispatcher.idle.is_set()
    url = make_url(db.engine.url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (scheduler.DISPATCH_LOCK,))  # a long round elsewhere
        new_job(new_user(), Status.PENDING)
        scheduler.dispatch_soon()
        scheduler.finish_dispatching(timeout=5)
        assert dispatcher.idle.is_set()  # the round ended without the lock
        other.execute("SELECT pg_advisory_unlock(%s)", (scheduler.DISPATCH_LOCK,))


def test_a_thread_that_freed_its_slot_is_handed_the_fairest_job_claimed_and_only_the_rest_go_to_the_broker(
        ctx, monkeypatch):
    sent = []
    publish = broker.publish_attempt
    monkeypatch.setattr(broker, "publish_attempt", lambda job_id, *rest: sent.append(job_id) or publish(job_id, *rest))
    host = _slot_for("test-dispatcher/4")
    host.slots = 2
    db.session.commit()
    try:
        first = new_job(new_user(), Status.PENDING, fair_tag=1)
        second = new_job(new_user(), Status.PENDING, fair_tag=2)
        handed = scheduler.dispatcher().take("worker-a@host", timeout=30)
        assert isinstance(handed, scheduler.HandedClaim)
        assert (handed.id, handed.kind) == (first.id, "photo.render")
        claimed = db.session.execute(select(Job).where(Job.id == first.id)).scalar_one()
        assert (claimed.status, claimed.attempts, claimed.worker_host, claimed.dispatch_token) == (
            Status.PROCESSING, 1, "worker-a@host", None)
        assert claimed.lease_token == handed.row.lease_token and claimed.lease_expires_at is not None
        assert sent == [second.id]
        assert db.session.execute(select(Job.dispatch_token).where(Job.id == second.id)).scalar() is not None
    finally:
        _withdraw(host)


def test_a_round_claims_no_job_for_a_thread_that_is_not_waiting_for_one(ctx, monkeypatch):
    """Without a thread in `take`, every job a round picks goes out as a message, unclaimed."""
    sent = []
    monkeypatch.setattr(broker, "publish_attempt", lambda job_id, *rest: sent.append(job_id))
    host = _slot_for("test-dispatcher/6")
    try:
        waiting = new_job(new_user(), Status.PENDING)
        scheduler.dispatch_soon()
        scheduler.finish_dispatching(timeout=10)
        assert sent == [waiting.id]
        assert db.session.execute(select(Job.status).where(Job.id == waiting.id)).scalar() == Status.PENDING
    finally:
        _withdraw(host)


def test_a_round_reads_the_waiting_jobs_once_when_its_first_read_had_them_all(ctx, monkeypatch):
    """A round reads the first waiting jobs with the state. When that read had every waiting
    job, it reads none again, however many slots are free: under load that is every round of
    the web process, each finding the few jobs submitted since the last."""
    sent = []
    monkeypatch.setattr(broker, "publish_attempt", lambda job_id, *rest: sent.append(job_id))
    host = _slot_for("test-dispatcher/7")
    host.slots = 50
    db.session.commit()
    statements = []

    def record(connection, cursor, statement, *rest):
        statements.append(statement)

    try:
        waiting = [new_job(new_user(), Status.PENDING, fair_tag=tag).id for tag in range(1, 6)]
        scheduler.finish_dispatching(timeout=10)  # no round of the dispatcher thread runs beside this one
        event.listen(db.engine, "before_cursor_execute", record)
        try:
            assert scheduler.dispatch() == 5
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
        assert sent == waiting  # in their fair order
        assert sum(" LIMIT " in statement for statement in statements) == 1, statements
    finally:
        _withdraw(host)


def test_a_thread_that_freed_its_slot_is_told_when_no_job_waits(ctx):
    host = _slot_for("test-dispatcher/5")
    try:
        asked = time.monotonic()
        assert scheduler.dispatcher().take("worker-a@host", timeout=30) is None
        assert time.monotonic() - asked < 30  # answered by the round, not given up on
        assert scheduler.dispatcher().takers == []
    finally:
        _withdraw(host)


def test_a_thread_whose_round_runs_past_its_wait_still_gets_the_job_the_round_claimed_for_it(ctx, monkeypatch):
    """Nobody else would run a job claimed for a thread: it waits for the round's answer."""
    hand_out = scheduler._hand_out_slots
    monkeypatch.setattr(scheduler, "_hand_out_slots", lambda *args: time.sleep(1.5) or hand_out(*args))
    host = _slot_for("test-dispatcher/7")
    try:
        waiting = new_job(new_user(), Status.PENDING)
        handed = scheduler.dispatcher().take("worker-a@host", timeout=0.5)
        assert isinstance(handed, scheduler.HandedClaim) and handed.id == waiting.id
        assert scheduler.dispatcher().takers == []
    finally:
        _withdraw(host)


@pytest.fixture()
def puts(monkeypatch) -> list:
    """Every attempt message this process writes to the Redis broker: (job id, ticket, whether
    it was part of a batch). Other tests' workers consume the same queue, so the test reads the
    messages as they are written, and they are written for real."""
    written = []
    put = RedisChannel._put

    def recorded(channel: RedisChannel, queue: str, message: dict, **options: object) -> None:
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        if "ticket" in kwargs:
            written.append((uuid.UUID(args[0]), uuid.UUID(kwargs["ticket"]), "_publish_batch" in options))
        return put(channel, queue, message, **options)

    monkeypatch.setattr(RedisChannel, "_put", recorded)
    return written


def _one_round_sending(count: int, host_name: str) -> dict:
    """`count` waiting jobs, as many free slots, and a round: each job's ticket."""
    host = _slot_for(host_name)
    host.slots = count
    db.session.commit()
    try:
        job_ids = {new_job(new_user(), Status.PENDING).id for _ in range(count)}
        scheduler.dispatch_soon()
        scheduler.finish_dispatching(timeout=10)
        return dict(db.session.execute(select(Job.id, Job.dispatch_token).where(Job.id.in_(job_ids))).all())
    finally:
        _withdraw(host)


def test_a_rounds_messages_leave_together_each_with_its_ticket(ctx, puts, monkeypatch):
    flushes = []
    flush = PublishBatch.flush
    monkeypatch.setattr(PublishBatch, "flush", lambda batch: flushes.append(batch._buffered) or flush(batch))
    tickets = _one_round_sending(3, "test-dispatcher/7")
    assert None not in tickets.values()
    assert sorted(puts) == sorted((job_id, ticket, True) for job_id, ticket in tickets.items())
    assert flushes == [3]  # one pipeline for the three


def test_when_the_broker_refuses_a_batch_its_messages_go_one_by_one(ctx, puts, monkeypatch):
    def refuse(batch: object) -> None:
        raise redis.ConnectionError("the broker went away")

    monkeypatch.setattr(PublishBatch, "flush", refuse)
    tickets = _one_round_sending(2, "test-dispatcher/8")
    assert sorted(written for written in puts if not written[2]) == sorted(
        (job_id, ticket, False) for job_id, ticket in tickets.items())
