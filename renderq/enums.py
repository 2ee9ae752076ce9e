"""The names stored in the database and shown to clients. They are strings on the wire and
in the rows; StrEnum members compare equal to those strings."""
from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """A job's status; the legal moves between them are renderq.jobs.lifecycle.TRANSITIONS."""
    PENDING = "pending"
    PROCESSING = "processing"
    RETRYING = "retrying"
    PENDING_BACKGROUND_RETRY = "pending_background_retry"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL_STATUSES = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELED})
ACTIVE_STATUSES = frozenset(Status) - TERMINAL_STATUSES


class Outcome(StrEnum):
    """How a completed job ended."""
    SUCCEEDED = "succeeded"
    BLOCKED = "blocked"


class AttemptOutcome(StrEnum):
    """How one generator call ended; LOST is a worker that died mid-call."""
    SUCCEEDED = "succeeded"
    BLOCKED = "blocked"
    TRANSIENT = "transient"
    FAILED = "failed"
    LOST = "lost"


class Tier(StrEnum):
    """FAST: the first attempt and the retry ladder. BACKGROUND: the background processor's tries."""
    FAST = "fast"
    BACKGROUND = "background"


class EntryKind(StrEnum):
    """Ledger rows: a hold on acceptance, then one capture (success) or one release (anything else)."""
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    TOPUP = "topup"


class Event(StrEnum):
    """What a user is notified of."""
    SUCCEEDED = "succeeded"
    BLOCKED = "blocked"
    FAILED = "failed"
