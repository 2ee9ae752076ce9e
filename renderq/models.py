"""The tables: users, photos, jobs (the mirror of every job's state), the ledger, notifications,
idempotency keys, the attempt history and admins' replays of failed jobs."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from renderq.db import db
from renderq.enums import Outcome, Status


def _now_column(**kwargs: Any) -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), **kwargs)


class User(db.Model):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    # Sum of this user's open holds, kept in the same transactions as the ledger rows so the
    # 402 check reads one row; the ledger stays the record (see renderq.billing).
    held: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    locale: Mapped[Optional[str]] = mapped_column(String(8))
    webhook_url: Mapped[Optional[str]] = mapped_column(Text)
    safety_agreed_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    # Fair scheduling (renderq.jobs.scheduler): the most generator calls this user may have in
    # flight (and their weight: a user with 3 gets three turns to another's one); None = the default.
    max_inflight: Mapped[Optional[int]]
    # The fair-queue tag of this user's latest job: the next one queues behind it.
    fair_tag: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = _now_column()


class Photo(db.Model):
    __tablename__ = "photos"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    path: Mapped[str] = mapped_column(Text)  # the key in renderq.storage
    content_type: Mapped[str] = mapped_column(String(64))
    width: Mapped[int]
    height: Mapped[int]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _now_column()


class Job(db.Model):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    photo_id: Mapped[Optional[uuid.UUID]] = mapped_column(ForeignKey("photos.id", ondelete="SET NULL"))
    kind: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    price: Mapped[int] = mapped_column(default=0)
    status: Mapped[str] = mapped_column(String(32), default=Status.PENDING)
    outcome: Mapped[Optional[str]] = mapped_column(String(16))
    block_reason: Mapped[Optional[str]] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(default=0)
    retry_count: Mapped[int] = mapped_column(default=0)
    next_retry_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    error_code: Mapped[Optional[str]] = mapped_column(String(64))
    error_detail: Mapped[Optional[str]] = mapped_column(Text)  # internal: never shown to users
    result_path: Mapped[Optional[str]] = mapped_column(Text)  # the key in renderq.storage
    # The job's place in the fair queue (renderq.jobs.scheduler): lowest tag goes first.
    fair_tag: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The attempt message out in the broker: only a message carrying this token may start the
    # attempt, so a lost message can be replaced and a stale one steps aside.
    dispatch_token: Mapped[Optional[uuid.UUID]]
    dispatched_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    # The running attempt: a fencing token and a lease it renews, by the database's clock.
    lease_token: Mapped[Optional[uuid.UUID]]
    lease_expires_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    attempt_started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    worker_host: Mapped[Optional[str]] = mapped_column(String(255))  # the worker that ran the latest attempt
    # How many times an admin has replayed this failed job (renderq.jobs.replay); each replay
    # is a generation of its own in the ledger, with its own hold and its own capture or release.
    generation: Mapped[int] = mapped_column(default=0, server_default="0")
    # The W3C traceparent of the request that submitted the job (renderq.tracing): its attempts
    # and webhook join that trace whichever process sends them. NULL when nothing traced it.
    trace_parent: Mapped[Optional[str]] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now_column()
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now_column()

    @property
    def result_url(self) -> Optional[str]:
        """Where the rendered image is served, once the job has succeeded."""
        return "/api/jobs/%s/result" % self.id if self.outcome == Outcome.SUCCEEDED else None

    __table_args__ = (
        Index("ix_jobs_user_created", "user_id", text("created_at DESC"), text("id DESC")),
        Index("ix_jobs_photo_created", "photo_id", text("created_at DESC")),
        Index("ix_jobs_status_kind", "status", "kind"),
        # The fair queue: pending jobs without an attempt message, in tag order.
        Index("ix_jobs_fair_queue", "fair_tag", "id",
              postgresql_where=text("status = 'pending' AND dispatch_token IS NULL")),
        Index("ix_jobs_due_retries", "next_retry_at",
              postgresql_where=text("status = 'retrying' AND dispatch_token IS NULL")),
        Index("ix_jobs_background_queue", "updated_at",
              postgresql_where=text("status = 'pending_background_retry'")),
        # What holds a generator slot: a running attempt, or an attempt message out.
        Index("ix_jobs_in_flight", "user_id",
              postgresql_where=text("status = 'processing' OR dispatch_token IS NOT NULL")),
        Index("ix_jobs_lease", "lease_expires_at", postgresql_where=text("status = 'processing'")),
        Index("ix_jobs_waiting_since", "created_at", postgresql_where=text("status = 'pending'")),
        Index("ix_jobs_completed_at", "completed_at", postgresql_where=text("completed_at IS NOT NULL")),
        # An admin's replay (renderq.jobs.replay): failed jobs, oldest failure first, in a time window.
        Index("ix_jobs_failed", "completed_at", "id", postgresql_where=text("status = 'failed'")),
    )



class LedgerEntry(db.Model):
    """Append-only credit movements. At most one hold, capture and release per job and
    generation (the job's first run is generation 0, each replay of it the next one), enforced
    by a unique index: a redelivered task cannot charge twice."""
    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    # No foreign key: the ledger outlives jobs purged after COMPLETED_JOB_TTL.
    job_id: Mapped[Optional[uuid.UUID]]
    generation: Mapped[int] = mapped_column(default=0, server_default="0")  # the job's generation it belongs to
    entry_type: Mapped[str] = mapped_column(String(16))  # an EntryKind
    amount: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _now_column()

    __table_args__ = (
        Index("uq_ledger_job_entry", "job_id", "generation", "entry_type", unique=True,
              postgresql_where=text("job_id IS NOT NULL")),
        Index("ix_ledger_user_created", "user_id", "created_at"),
    )


class Notification(db.Model):
    """One per (job, event): what the user is told, and the state of its webhook delivery."""
    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    job_id: Mapped[uuid.UUID]
    event: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict] = mapped_column(JSON)
    webhook_id: Mapped[str] = mapped_column(String(64), unique=True)
    delivered_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    delivery_attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    # When the next webhook delivery may start; a delivery claims the row by moving it on,
    # so a redelivered task steps aside and the reconciler re-sends only what is overdue.
    next_delivery_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    last_delivery_error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = _now_column()

    __table_args__ = (
        Index("uq_notification_job_event", "job_id", "event", unique=True),
        Index("ix_notifications_user_created", "user_id", text("created_at DESC"), text("id DESC")),
        Index("ix_notifications_undelivered", "next_delivery_at",
              postgresql_where=text("delivered_at IS NULL AND next_delivery_at IS NOT NULL")),
    )


class IdempotencyKey(db.Model):
    """`Idempotency-Key` of a submission: the same key and body within 24 h give the same job."""
    __tablename__ = "idempotency_keys"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[uuid.UUID]
    created_at: Mapped[datetime] = _now_column(index=True)  # the cleanup deletes keys past their lifetime


class JobAttempt(db.Model):
    """One generator call of a job: when, how long, and how it ended (for stats and metrics)."""
    __tablename__ = "job_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]
    tier: Mapped[str] = mapped_column(String(16))  # a Tier
    kind: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # an AttemptOutcome
    error_code: Mapped[Optional[str]] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    duration_ms: Mapped[int]

    __table_args__ = (
        Index("ix_job_attempts_started", "started_at"),
        # Every dispatch round counts the attempts lost lately (renderq.jobs.scheduler.State.lost).
        Index("ix_job_attempts_lost", "started_at", postgresql_where=text("outcome = 'lost'")),
    )


class Blob(db.Model):
    """Uploads and results when STORAGE_BACKEND=postgres: every host reads them, and a result
    is written by the statement that finishes its job."""
    __tablename__ = "blobs"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _now_column()


class WorkerHost(db.Model):
    """An attempts worker that is up: its slots are what the scheduler may fill. A worker
    renews its row while it runs; one whose row has expired is gone."""
    __tablename__ = "worker_hosts"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    slots: Mapped[int]
    pool: Mapped[str] = mapped_column(String(32))
    # The GENERATOR_MAX_INFLIGHT this worker runs with (0: none). The cap that holds is the
    # smallest any live worker announces, so a web host's own setting cannot widen it.
    generator_cap: Mapped[int] = mapped_column(default=0, server_default="0")
    started_at: Mapped[datetime] = _now_column()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    @property
    def host(self) -> str:
        """The worker's name (`attempts@host`) without the process: rows are per process."""
        return self.name.rsplit("/", 1)[0]


class SchedulerClock(db.Model):
    """One row: the fair tag of the last job dispatched. New jobs of a user who was idle queue
    from here, so past use is not held against anybody."""
    __tablename__ = "scheduler_clock"

    id: Mapped[int] = mapped_column(primary_key=True)
    fair_tag: Mapped[int] = mapped_column(BigInteger, default=0)


# Counters the stats views and /metrics read in constant time (renderq.counters; the triggers
# that keep job_count_deltas are in the migration that made these tables).
class JobCount(db.Model):
    __tablename__ = "job_counts"

    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(32), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)  # '' unless completed
    retry_count: Mapped[int] = mapped_column(primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class JobCountDelta(db.Model):
    __tablename__ = "job_count_deltas"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    retry_count: Mapped[int]
    delta: Mapped[int] = mapped_column(BigInteger)


class AttemptTotal(db.Model):
    __tablename__ = "attempt_totals"

    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    tier: Mapped[str] = mapped_column(String(16), primary_key=True)
    outcome: Mapped[str] = mapped_column(String(16), primary_key=True)
    retry: Mapped[bool] = mapped_column(primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)
    duration_ms: Mapped[int] = mapped_column(BigInteger)


class AttemptBucket(db.Model):
    __tablename__ = "attempt_buckets"

    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    le_ms: Mapped[int] = mapped_column(primary_key=True)  # -1: longer than the last bound
    count: Mapped[int] = mapped_column(BigInteger)


class AttemptMinute(db.Model):
    __tablename__ = "attempt_minutes"

    minute: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    le_ms: Mapped[int] = mapped_column(primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)


class CounterWatermark(db.Model):
    __tablename__ = "counter_watermarks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger)


class JobReplay(db.Model):
    """An admin's replay of failed jobs (renderq.jobs.replay): who, when, the filter, and what
    it put back and skipped. No foreign key to users: the record outlives them."""
    __tablename__ = "job_replays"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    requested_by: Mapped[str] = mapped_column(String(320))  # the admin's e-mail, or "cli:<unix user>"
    admin_id: Mapped[Optional[int]] = mapped_column(BigInteger)
    filter: Mapped[dict] = mapped_column(JSON)
    replayed: Mapped[int]
    skipped: Mapped[int]
    skipped_reasons: Mapped[dict] = mapped_column(JSON)  # reason code -> how many
    credits_held: Mapped[int] = mapped_column(BigInteger)
    job_ids: Mapped[list] = mapped_column(JSON)  # the replayed jobs
    skipped_jobs: Mapped[list] = mapped_column(JSON)  # [{job_id, user_id, reason}]
    duration_ms: Mapped[int]
    created_at: Mapped[datetime] = _now_column()
