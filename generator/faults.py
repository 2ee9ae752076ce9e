"""Fault injection for the reference generator: env-wide settings, per-prompt directives, call counters.

The generator stands in for a flaky external API, so the job system's tests need to script its
failures precisely and afterwards prove how often (and how concurrently) each job called it.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Mapping

# Sleeps come from untrusted prompt text; a cap keeps one typo from pinning a worker thread for hours.
MAX_SLOW_MS = 600_000

_FAIL_RE = re.compile(r"\[fail:(\d+)\]")
_BLOCK_RE = re.compile(r"\[block:([A-Z_]+)\]")
_SLOW_RE = re.compile(r"\[slow:(\d+)\]")
_INVALID_RE = re.compile(r"\[invalid\]")
_RATELIMIT_RE = re.compile(r"\[ratelimit:(\d+)\]")
_GARBAGE_RE = re.compile(r"\[garbage\]")


@dataclass(frozen=True)
class Directives:
    """What the prompt asks this call to do; the first occurrence of each directive wins."""

    fail: int = 0
    block: str | None = None
    slow_ms: int = 0
    invalid: bool = False
    ratelimit_seconds: int = 0  # the job's first call answers 429 with this Retry-After
    garbage: bool = False  # the job's first call answers 200 with a body that is no image


def parse_directives(prompt: str) -> Directives:
    """Directives found anywhere in `prompt`; text that is not a directive is ignored."""
    fail = _FAIL_RE.search(prompt)
    block = _BLOCK_RE.search(prompt)
    slow = _SLOW_RE.search(prompt)
    ratelimit = _RATELIMIT_RE.search(prompt)
    return Directives(
        fail=int(fail.group(1)) if fail else 0,
        block=block.group(1) if block else None,
        slow_ms=min(int(slow.group(1)), MAX_SLOW_MS) if slow else 0,
        invalid=_INVALID_RE.search(prompt) is not None,
        ratelimit_seconds=int(ratelimit.group(1)) if ratelimit else 0,
        garbage=_GARBAGE_RE.search(prompt) is not None,
    )


@dataclass(frozen=True)
class FaultSettings:
    """Server-wide faults, fixed when the app is created so a run cannot change behaviour mid-test.

    Beside plain failures and latency, the chaos benchmark needs the ways a real image API
    misbehaves that a job system must survive: random 429s with Retry-After, calls that hang
    far past the caller's timeout, and 200 answers whose body is not an image.
    """

    failure_rate: float = 0.0
    latency_ms: int = 0
    max_concurrency: int = 0  # 0 = unlimited
    rate_limit_rate: float = 0.0  # GENERATOR_429_RATE: this fraction of calls answer 429 at once
    rate_limit_retry_after: int = 1  # GENERATOR_429_RETRY_AFTER: the Retry-After those 429s carry, in seconds
    hang_rate: float = 0.0  # GENERATOR_HANG_RATE: this fraction of calls sleep GENERATOR_HANG_MS first
    hang_ms: int = 120_000
    garbage_rate: float = 0.0  # GENERATOR_GARBAGE_RATE: this fraction of successes answer 200 with a non-image
    seed: int | None = None  # GENERATOR_SEED: the random draws above, reproducible

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "FaultSettings":
        """Read GENERATOR_* variables; a bad value raises ValueError so a misconfigured run fails at start."""
        rates = {}
        for name in ("GENERATOR_FAILURE_RATE", "GENERATOR_429_RATE", "GENERATOR_HANG_RATE", "GENERATOR_GARBAGE_RATE"):
            rates[name] = _read(env, name, "0", float)
            if not 0.0 <= rates[name] <= 1.0:
                raise ValueError("%s must be between 0 and 1, got %r" % (name, rates[name]))
        latency = _read(env, "GENERATOR_LATENCY_MS", "0", int)
        concurrency = _read(env, "GENERATOR_MAX_CONCURRENCY", "0", int)
        if latency < 0 or concurrency < 0:
            raise ValueError("GENERATOR_LATENCY_MS and GENERATOR_MAX_CONCURRENCY must be >= 0")
        retry_after = _read(env, "GENERATOR_429_RETRY_AFTER", "1", int)
        hang_ms = _read(env, "GENERATOR_HANG_MS", "120000", int)
        if retry_after < 0 or not 0 <= hang_ms <= MAX_SLOW_MS:
            raise ValueError("GENERATOR_429_RETRY_AFTER must be >= 0 and GENERATOR_HANG_MS between 0 and %d"
                             % MAX_SLOW_MS)
        seed = _read(env, "GENERATOR_SEED", "", int) if (env.get("GENERATOR_SEED") or "").strip() else None
        return cls(failure_rate=rates["GENERATOR_FAILURE_RATE"], latency_ms=latency, max_concurrency=concurrency,
                   rate_limit_rate=rates["GENERATOR_429_RATE"], rate_limit_retry_after=retry_after,
                   hang_rate=rates["GENERATOR_HANG_RATE"], hang_ms=hang_ms,
                   garbage_rate=rates["GENERATOR_GARBAGE_RATE"], seed=seed)


def _read(env: Mapping[str, str], name: str, default: str, parse: type) -> float | int:
    raw = (env.get(name) or default).strip()
    try:
        return parse(raw)
    except ValueError:
        raise ValueError("%s: cannot parse %r as %s" % (name, raw, parse.__name__)) from None


@dataclass
class _Counts:
    calls: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    # Wall-clock start of each call, so tests can measure the delays between attempts.
    started_at: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"calls": self.calls, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "started_at": list(self.started_at)}


class CallTracker:
    """Counts every POST /v1/renders, per X-Job-Id and in total.

    Rejected calls (429, 503, ...) count too: the tests use these numbers to prove a job was
    attempted exactly N times and never twice at once, and a duplicate that was turned away is
    still a duplicate. Counters live in this process only, hence the single-worker gunicorn.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, _Counts] = {}
        self._total = _Counts()

    def begin(self, job_id: str) -> int:
        """Record a call starting; returns its 1-based number for this job (drives [fail:N])."""
        with self._lock:
            job = self._jobs.setdefault(job_id, _Counts())
            job.started_at.append(time.time())
            for counts in (job, self._total):
                counts.calls += 1
                counts.in_flight += 1
                counts.max_in_flight = max(counts.max_in_flight, counts.in_flight)
            return job.calls

    def end(self, job_id: str) -> None:
        """Record a call finishing; must pair with begin() (call it from a finally block)."""
        with self._lock:
            self._jobs[job_id].in_flight -= 1
            self._total.in_flight -= 1

    def job(self, job_id: str) -> dict[str, int]:
        """Counters for one job; a job never seen reports zeros so "never attempted" is checkable."""
        with self._lock:
            return self._jobs.get(job_id, _Counts()).as_dict()

    def totals(self) -> dict:
        with self._lock:
            totals = self._total.as_dict()
            del totals["started_at"]
            return totals


class ConcurrencyGate:
    """Admits at most `limit` renders at once (0 = unlimited); callers past it are refused, not queued."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._active = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self._limit and self._active >= self._limit:
                return False
            self._active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._active -= 1


class CallLog:
    """GENERATOR_CALL_LOG: one JSON line when a call starts and one when it ends, appended to a file.

    The chaos benchmark's invariant checker compares these calls with the attempts the job
    system recorded. The start line is written first so that a call cut off by the generator
    being killed still counts (it has a start and no end). Each line is a single write() on a
    file opened with O_APPEND, which the kernel keeps whole across threads and processes.

        {"call": "<id>", "job_id": "...", "start": 1700000000.123}
        {"call": "<id>", "job_id": "...", "start": 1700000000.123, "end": 1700000000.456, "status": 200,
         "fault": null}
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def _write(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def begin(self, job_id: str) -> dict:
        record = {"call": uuid.uuid4().hex, "job_id": job_id, "start": time.time()}
        self._write(record)
        return record

    def end(self, record: dict, status: int, fault: str | None) -> None:
        self._write({**record, "end": time.time(), "status": status, "fault": fault})
