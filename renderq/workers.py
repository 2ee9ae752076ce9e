"""The processes that run attempts, and the one thread in each that says they are alive.

Each attempts process announces its slots (how many attempts it runs at once: 1 for a prefork
child, the thread count for a threads pool) in `worker_hosts`, and renews the leases of the
attempts it runs, all in one short transaction every third of JOB_LEASE_SECONDS. Rows and
leases expire by the database's clock: a process that died, hangs or is cut off stops counting
as capacity and its attempts are recovered, whatever the hosts' own clocks say.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from datetime import timedelta
from typing import Iterator, Optional

from celery.worker import state as celery_state
from flask import Flask, current_app
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert

from renderq import tracing
from renderq.db import db
from renderq.enums import Status
from renderq.models import Job, WorkerHost

log = logging.getLogger(__name__)


class ProcessKeeper:
    """Announces this process's slots and renews its running attempts' leases."""

    def __init__(self, app: Flask, name: str, slots: int, pool: str):
        self.app, self.name, self.slots, self.pool = app, name, slots, pool
        self.lease_seconds = app.extensions["renderq.settings"].job_lease_seconds
        self.generator_cap = app.extensions["renderq.settings"].generator_max_inflight
        self.leases: set[uuid.UUID] = set()
        self.draining = False  # a warm shutdown began: start no more attempts than the messages ask
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="renderq-keeper", daemon=True)

    def start(self) -> "ProcessKeeper":
        self.beat()
        self.thread.start()
        return self

    @contextlib.contextmanager
    def holding(self, lease_token: uuid.UUID) -> Iterator[None]:
        with self.lock:
            self.leases.add(lease_token)
        try:
            yield
        finally:
            with self.lock:
                self.leases.discard(lease_token)

    def _run(self) -> None:
        with tracing.untraced():  # a renewal every few seconds is not worth a trace of its own
            while not self.stopped.wait(self.lease_seconds / 3):
                self.beat()

    def beat(self) -> None:
        with self.lock:
            tokens = list(self.leases)
        until = func.now() + timedelta(seconds=self.lease_seconds)
        try:  # a connection of its own: a failed round leaves nothing behind for the next
            with self.app.app_context(), db.engine.begin() as connection:
                connection.execute(insert(WorkerHost).values(name=self.name, slots=self.slots, pool=self.pool,
                                                             generator_cap=self.generator_cap, expires_at=until)
                                   .on_conflict_do_update(index_elements=[WorkerHost.name],
                                                          set_={"slots": self.slots, "expires_at": until}))
                if tokens:
                    connection.execute(update(Job).where(Job.lease_token.in_(tokens), Job.status == Status.PROCESSING)
                                       .values(lease_expires_at=until))
        except Exception:  # the database is away: the next round tries again before anything expires
            log.warning("🔧 [JOB_PROCESSOR] could not renew this process's slots and %d lease(s)", len(tokens),
                        exc_info=True)

    def stop(self) -> None:
        """This process is leaving: its slots stop counting at once."""
        self.stopped.set()
        try:
            with self.app.app_context(), db.engine.begin() as connection:
                connection.execute(delete(WorkerHost).where(WorkerHost.name == self.name))
        except Exception:
            log.warning("🔧 [JOB_PROCESSOR] could not withdraw this process's slots; they expire shortly",
                        exc_info=True)


_keeper: Optional[ProcessKeeper] = None


def start_keeper(app: Flask, hostname: str, slots: int, pool: str) -> ProcessKeeper:
    global _keeper
    _keeper = ProcessKeeper(app, "%s/%d" % (hostname, os.getpid()), slots, pool).start()
    return _keeper


def keeper() -> Optional[ProcessKeeper]:
    """This process's keeper, if it is an attempts process (a forked child has its own)."""
    if _keeper is not None and _keeper.name.endswith("/%d" % os.getpid()):
        return _keeper
    return None


def lease_keeper() -> ProcessKeeper:
    """The keeper that renews this process's leases: an attempt that runs outside an attempts
    worker's process (a solo pool, a shell) gets one that announces no slots."""
    if keeper() is None:
        start_keeper(current_app._get_current_object(), socket.gethostname(), 0, "none")
    return keeper()


def keeps_slots() -> bool:
    """Whether an attempt's thread goes on to the next job its slot is handed: in a threads
    pool, which sets no time limit on a task; not once the worker is shutting down; and not
    while a message this process has taken from the broker waits for a thread (it went out
    for a free slot, and would wait for as long as every thread kept its own)."""
    current = keeper()
    return (current is not None and current.pool == "thread" and not current.draining
            and len(celery_state.reserved_requests) <= len(celery_state.active_requests))


def stop_keeper() -> None:
    global _keeper
    if keeper() is not None:
        keeper().stop()
        _keeper = None


def live() -> list[WorkerHost]:
    hosts = list(db.session.execute(select(WorkerHost).where(WorkerHost.expires_at > func.now())
                                    .order_by(WorkerHost.name)).scalars())
    db.session.rollback()
    return hosts
