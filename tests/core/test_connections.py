"""The connection pool: a connection that was dropped while it sat idle is replaced before a
statement meets it; one in steady use is not pinged first."""
from __future__ import annotations

import time

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.engine import make_url

from renderq.db import IDLE_IN_TRANSACTION_SECONDS, PING_AFTER_IDLE_SECONDS, db, execute_alone
from renderq.jobs import scheduler


def _backend_pid() -> int:
    pid = db.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
    db.session.commit()
    return pid


def _terminate(pid: int) -> None:
    url = make_url(db.engine.url).set(drivername="postgresql").render_as_string(False)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_connection_dropped_while_idle_is_replaced_without_an_error(ctx):
    dropped = _backend_pid()
    _terminate(dropped)  # as a server restart or an idle timeout would
    time.sleep(PING_AFTER_IDLE_SECONDS + 0.1)
    assert _backend_pid() != dropped  # the statement ran, on a new connection


def test_a_connection_in_steady_use_is_not_pinged_first(ctx, monkeypatch):
    pings = []
    ping = db.engine.dialect.do_ping
    monkeypatch.setattr(db.engine.dialect, "do_ping", lambda connection: pings.append(1) or ping(connection))
    _backend_pid()
    for _ in range(5):
        _backend_pid()
        execute_alone(text("SELECT 1"))
    assert pings == []
    time.sleep(PING_AFTER_IDLE_SECONDS + 0.1)
    _backend_pid()
    assert pings == [1]


def test_a_process_gone_silent_inside_a_transaction_holds_its_locks_for_seconds_only(ctx):
    """A worker host cut off from the network, or paused, in the middle of a dispatch round
    would otherwise keep the dispatch lock (and any job row it had locked) until its TCP
    connection timed out, hours later: no round anywhere could run meanwhile."""
    silent = db.engine.connect()
    try:
        silent.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": scheduler.DISPATCH_LOCK})
        started = time.monotonic()
        db.session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": scheduler.DISPATCH_LOCK})
        db.session.commit()
        waited = time.monotonic() - started
        assert IDLE_IN_TRANSACTION_SECONDS - 1 < waited < IDLE_IN_TRANSACTION_SECONDS + 5
        with pytest.raises(DBAPIError) as ended:  # the silent one's session was ended: its next statement learns it
            silent.execute(text("SELECT 1"))
        assert ended.value.connection_invalidated  # as with a dropped connection: the outcome is recorded again
    finally:
        silent.invalidate()
        silent.close()
