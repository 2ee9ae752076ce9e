"""A job's status changes as a stream of events, for clients that watch it live
(GET /api/jobs/{id}/events) and for `Prefer: wait`.

After each committed status change the job's new state is appended to a Redis stream of its
own, kept for a while after its last event: a client that reconnects with the id of the last
event it saw gets what it missed, and one that waits blocks on Redis, not on PostgreSQL.
Appending is best effort: the row stays the truth, and a watcher that finds no event reads it.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from datetime import datetime
from typing import Any, Callable, Iterable

import redis
from redis.commands.core import Script

from renderq.enums import TERMINAL_STATUSES
from renderq.models import Job
from renderq.runtime import REDIS_SOCKET_TIMEOUT, redis_client

log = logging.getLogger(__name__)

KEEP_SECONDS = 3600
KEEP_EVENTS = 50
# The job's fields an event carries: what changes as it moves.
SNAPSHOT = (Job.id, Job.status, Job.outcome, Job.block_reason, Job.attempts, Job.retry_count, Job.next_retry_at,
            Job.error_code, Job.started_at, Job.completed_at, Job.updated_at)


def stream(job_id: object) -> str:
    return "renderq:events:%s" % job_id


def _encode(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


# The append and the stream's new lifetime as one command: an attempt appends twice (its claim
# and its end), and a pipeline of two commands cost the worker twice the Python of one.
_APPEND = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'state', ARGV[1])
return redis.call('EXPIRE', KEYS[1], ARGV[3])
"""


@functools.cache
def _append(client: redis.Redis) -> Script:
    return client.register_script(_APPEND)


def record(rows: Iterable[Any]) -> None:
    """After the commit: append each row's new state (a row of SNAPSHOT columns) to its stream."""
    rows = [row for row in rows if row is not None]
    if not rows:
        return
    try:
        client = redis_client()
        target = client.pipeline(transaction=False) if len(rows) > 1 else client
        for row in rows:
            state = {column.key: _encode(getattr(row, column.key)) for column in SNAPSHOT if column.key != "id"}
            _append(client)(keys=[stream(row.id)], args=[json.dumps(state), KEEP_EVENTS, KEEP_SECONDS], client=target)
        if target is not client:
            target.execute()
    except Exception:
        log.warning("📋 [QUEUE] could not append %d status event(s); watchers read the row", len(rows),
                    exc_info=True)


def decode(fields: dict) -> dict:
    state = json.loads(fields[b"state"])
    for name in ("next_retry_at", "started_at", "completed_at", "updated_at"):
        if state.get(name):
            state[name] = datetime.fromisoformat(state[name])
    return state


def since(job_id: object, last_id: str) -> list[tuple[str, dict]]:
    """Events after `last_id` ("0" for all that are kept)."""
    entries = redis_client().xrange(stream(job_id), min="(" + last_id if last_id != "0" else "-")
    return [(entry_id.decode(), decode(fields)) for entry_id, fields in entries]


def latest_id(job_id: object) -> str:
    entries = redis_client().xrevrange(stream(job_id), count=1)
    return entries[0][0].decode() if entries else "0"


def wait(job_id: object, last_id: str, seconds: float) -> list[tuple[str, dict]]:
    """Events after `last_id`, waiting up to `seconds` for the first one (holding a Redis
    connection only). Each XREAD blocks for less than the client's socket timeout."""
    deadline = time.monotonic() + seconds
    while True:
        block = min(deadline - time.monotonic(), REDIS_SOCKET_TIMEOUT - 1)
        answer = redis_client().xread({stream(job_id): last_id}, block=max(1, int(block * 1000)), count=KEEP_EVENTS)
        if answer or time.monotonic() >= deadline:
            return [(entry_id.decode(), decode(fields)) for _, entries in answer or [] for entry_id, fields in entries]


def is_terminal(state: dict) -> bool:
    return state.get("status") in TERMINAL_STATUSES


def wait_until_terminal(job_id: object, seconds: float, read_status: Callable[[], str]) -> None:
    """Return when the job is terminal or after `seconds`, whichever comes first. The stream's
    position is taken before the status is read, so no finish can slip between the two."""
    try:
        last_id = latest_id(job_id)
        if read_status() in TERMINAL_STATUSES:
            return
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            for last_id, state in wait(job_id, last_id, min(remaining, 5.0)):
                if is_terminal(state):
                    return
    except redis.RedisError:  # the job is accepted all the same: answer with it as it is
        log.warning("📋 [QUEUE] job %s: Redis is unreachable, so Prefer: wait does not wait", job_id, exc_info=True)
