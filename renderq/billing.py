"""Credits: a hold on acceptance, a capture on success, a release otherwise.

A submission's hold is part of its one statement (renderq.jobs.submit), which checks the
available credits and holds them on the user's row. Every function here runs inside the
caller's transaction. The unique index on (job, generation,
entry type) makes a second capture or release of the same run of a job a no-op, whatever is
redelivered. A job's first run is generation 0; an admin's replay of a failed job
(renderq.jobs.replay) starts the next generation with a hold of its own, which that run's
end captures or releases: so balance = top-ups − captures and available = balance − open
holds stay true however often a job is replayed, and a job is still captured at most once
(only failed jobs, never captured, are replayed).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import insert, select, text

from renderq.db import db
from renderq.enums import EntryKind
from renderq.models import LedgerEntry, User


def lock_user(user_id: int) -> User:
    """The user's row, locked until commit and re-read under the lock (the session may
    hold an older copy): concurrent submissions queue up here."""
    statement = select(User).where(User.id == user_id).with_for_update().execution_options(populate_existing=True)
    return db.session.execute(statement).scalar_one()


def lock_users(user_ids: Iterable[int]) -> dict[int, User]:
    """Several users' rows, locked in id order (so two callers cannot deadlock), by id."""
    statement = (select(User).where(User.id.in_(set(user_ids))).order_by(User.id).with_for_update()
                 .execution_options(populate_existing=True))
    return {user.id: user for user in db.session.execute(statement).scalars()}


def available(user: User) -> int:
    return user.balance - user.held


def available_credits(user_id: int) -> int:
    return db.session.execute(select(User.balance - User.held).where(User.id == user_id)).scalar_one()


@dataclass(frozen=True)
class ReplayHold:
    """The hold a replayed job's new generation takes."""
    user_id: int
    job_id: uuid.UUID
    generation: int
    price: int


def hold_replays(users: dict[int, User], holds: list[ReplayHold]) -> int:
    """Hold each replayed job's price for its new generation, in one INSERT; the caller has
    locked `users` (lock_users) and checked that the prices fit. Returns the credits held."""
    for entry in holds:
        users[entry.user_id].held += entry.price
    if holds:
        db.session.execute(insert(LedgerEntry), [
            dict(user_id=entry.user_id, job_id=entry.job_id, generation=entry.generation,
                 entry_type=EntryKind.HOLD, amount=entry.price) for entry in holds])
    return sum(entry.price for entry in holds)


# The hold of the job's current generation (the caller's transaction has the job row) is
# settled and the user's columns follow, in one statement.
_SETTLE = text("""
    WITH settled AS (
        INSERT INTO ledger_entries (user_id, job_id, generation, entry_type, amount)
        SELECT h.user_id, h.job_id, h.generation, :entry_type, h.amount
          FROM ledger_entries h JOIN jobs j ON j.id = h.job_id AND j.generation = h.generation
         WHERE h.job_id = :job_id AND h.entry_type = :hold
           AND NOT EXISTS (SELECT 1 FROM ledger_entries s
                            WHERE s.job_id = h.job_id AND s.generation = h.generation
                              AND s.entry_type IN (:capture, :release))
        ON CONFLICT DO NOTHING
        RETURNING user_id, amount
    )
    UPDATE users SET held = users.held - settled.amount, balance = users.balance - settled.amount * :charged
      FROM settled
     WHERE users.id = settled.user_id
    RETURNING users.id
""")


def settle(job_id: uuid.UUID, entry_type: EntryKind) -> bool:
    """Capture or release the hold of the job's current generation, once; False if it was
    already settled (or never held)."""
    assert entry_type in (EntryKind.CAPTURE, EntryKind.RELEASE)
    return db.session.execute(_SETTLE, {
        "job_id": job_id, "entry_type": entry_type, "charged": int(entry_type == EntryKind.CAPTURE),
        "hold": EntryKind.HOLD, "capture": EntryKind.CAPTURE, "release": EntryKind.RELEASE}).first() is not None


def top_up(user: User, amount: int) -> None:
    db.session.add(LedgerEntry(user_id=user.id, job_id=None, entry_type=EntryKind.TOPUP, amount=amount))
    user.balance += amount
