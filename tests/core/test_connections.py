"""The connection pool: a connection that was dropped while it sat idle is replaced before a
statement meets it; one in steady use is not pinged first."""
from __future__ import annotations

import time

import psycopg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from renderq.db import PING_AFTER_IDLE_SECONDS, db, execute_alone


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
