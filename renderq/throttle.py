"""GENERATOR_MAX_INFLIGHT: a cap on generator calls in flight across every worker.

Slots are members of a Redis sorted set scored by their expiry, taken and freed atomically
in Lua, so a worker that dies mid-call frees its slot when the call could no longer be
running. One user holds at most `limit - 1` slots: a burst from one user always leaves
room for somebody else's job.
"""
from __future__ import annotations

import contextlib
import random
import time
import uuid
from typing import Iterator

from config import Settings
from config.kinds import get_kind
from renderq.jobs.policy import Throttled
from renderq.runtime import redis_client

SLOTS_KEY = "renderq:generator-slots"
USER_SLOTS_KEY = "renderq:generator-slots:user:%s"

_ACQUIRE = """
local now, expires, limit, user_limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= limit or redis.call('ZCARD', KEYS[2]) >= user_limit then
  return 0
end
redis.call('ZADD', KEYS[1], expires, ARGV[5])
redis.call('ZADD', KEYS[2], expires, ARGV[5])
redis.call('PEXPIREAT', KEYS[2], math.ceil(expires * 1000))
return 1
"""


def user_share(limit: int) -> int:
    return max(1, limit - 1)


@contextlib.contextmanager
def generator_slot(settings: Settings, user_id: int, kind: str) -> Iterator[None]:
    """Hold one of the GENERATOR_MAX_INFLIGHT slots; raises Throttled when none is free."""
    limit = settings.generator_max_inflight
    if not limit:
        yield
        return
    client = redis_client()
    token = uuid.uuid4().hex
    user_key = USER_SLOTS_KEY % user_id
    now = time.time()
    expires = now + get_kind(kind).hard_time_limit  # no attempt of this kind can outlive it
    if not client.eval(_ACQUIRE, 2, SLOTS_KEY, user_key, now, expires, limit, user_share(limit), token):
        raise Throttled(random.uniform(0.2, 1.0))  # jitter, so waiting messages do not return in step
    try:
        yield
    finally:
        client.zrem(SLOTS_KEY, token)
        client.zrem(user_key, token)


def in_flight() -> int:
    client = redis_client()
    client.zremrangebyscore(SLOTS_KEY, "-inf", time.time())
    return int(client.zcard(SLOTS_KEY))
