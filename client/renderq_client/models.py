"""The API's resources as small dataclasses: the job and the caller's account.

Fields follow docs/api.md; times are timezone-aware datetimes (UTC). `raw` keeps the JSON as
the server sent it, so fields added to the API later are still reachable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Optional

TERMINAL_STATUSES = frozenset({"completed", "failed", "canceled"})


def parse_time(value: Optional[str]) -> Optional[datetime]:
    """An ISO 8601 time from the API ('...Z'); fromisoformat only reads 'Z' from Python 3.11 on."""
    if not value:
        return None
    return datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)


@dataclass(frozen=True)
class JobError:
    """Why a job failed, or why its last attempt did while it is retrying."""
    code: str
    message: str


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    kind: str
    user_id: int
    photo_id: Optional[str] = None
    outcome: Optional[str] = None
    block_reason: Optional[str] = None
    message: Optional[str] = None
    attempts: int = 0
    retry_count: int = 0
    next_retry_at: Optional[datetime] = None
    error: Optional[JobError] = None
    result_url: Optional[str] = None
    price: int = 0
    queue_position: Optional[int] = None
    created_at: Optional[datetime] = None
    started_at: Optional[datetime] = None
    completed_at: Optional[datetime] = None
    updated_at: Optional[datetime] = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Job":
        error = data.get("error")
        return cls(
            id=data["id"], status=data["status"], kind=data["kind"], user_id=data["user_id"],
            photo_id=data.get("photo_id"), outcome=data.get("outcome"), block_reason=data.get("block_reason"),
            message=data.get("message"), attempts=data.get("attempts") or 0, retry_count=data.get("retry_count") or 0,
            next_retry_at=parse_time(data.get("next_retry_at")),
            error=JobError(str(error.get("code")), str(error.get("message"))) if isinstance(error, dict) else None,
            result_url=data.get("result_url"), price=data.get("price") or 0, queue_position=data.get("queue_position"),
            created_at=parse_time(data.get("created_at")), started_at=parse_time(data.get("started_at")),
            completed_at=parse_time(data.get("completed_at")), updated_at=parse_time(data.get("updated_at")),
            raw=dict(data),
        )

    @property
    def is_terminal(self) -> bool:
        """Completed, failed or canceled: nothing about the job changes any more."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        """Completed with a result to download."""
        return self.status == "completed" and self.outcome == "succeeded"

    @property
    def blocked(self) -> bool:
        """Completed without a result: the generator refused it; `message` says why."""
        return self.status == "completed" and self.outcome == "blocked"


@dataclass(frozen=True)
class Account:
    """The caller, from GET /api/me: `available` is the balance minus credits on hold for
    jobs that have not finished."""
    id: int
    email: str
    balance: int
    available: int
    locale: str
    is_admin: bool = False
    webhook_url: Optional[str] = None
    safety_agreed_at: Optional[datetime] = None
    created_at: Optional[datetime] = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Account":
        return cls(
            id=data["id"], email=data["email"], balance=data["balance"], available=data["available"],
            locale=data["locale"], is_admin=bool(data.get("is_admin")), webhook_url=data.get("webhook_url"),
            safety_agreed_at=parse_time(data.get("safety_agreed_at")), created_at=parse_time(data.get("created_at")),
            raw=dict(data),
        )
