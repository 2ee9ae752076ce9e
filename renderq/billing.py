"""Credits: a hold on acceptance, a capture on success, a release otherwise.

A submission's hold is part of its one statement (renderq.jobs.submit), which checks the
available credits and holds them on the user's row; a finish's capture or release is part of
its one statement too (`settlement`). Every function here runs inside the caller's
transaction. At most one capture or release settles each run of a job (its generation), whatever
is redelivered, and a unique index on (job, generation, entry type) says so to anything that
tries a second. A job's first run is generation 0; an admin's replay of a failed job
(renderq.jobs.replay) starts the next generation with a hold of its own, which that run's
end captures or releases: so balance = top-ups − captures and available = balance − open
holds stay true however often a job is replayed, and a job is still captured at most once
(only failed jobs, never captured, are replayed).
"""
from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import String, Uuid, and_, bindparam, case, insert, select, update
from sqlalchemy.orm import aliased

from renderq.db import constant, db
from renderq.enums import EntryKind
from renderq.models import Job, LedgerEntry, User


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


def settlement(jobs: Any) -> Any:
    """The capture or release (the parameter `settle_as`) of the hold of each of `jobs`' current
    generation, unless it was settled already, and the users' columns following it: a CTE for
    the caller's statement (`jobs`: a CTE of job `id` and `generation`, whose rows the caller's
    transaction has locked). A job's finish settles in its own statement this way
    (renderq.jobs.lifecycle), and the unique index is the net under the NOT EXISTS."""
    hold, done = aliased(LedgerEntry, name="hold"), aliased(LedgerEntry, name="done")
    entries = insert(LedgerEntry).from_select(
        ["user_id", "job_id", "generation", "entry_type", "amount"],
        select(hold.user_id, hold.job_id, hold.generation, bindparam("settle_as", type_=String), hold.amount)
        .join(jobs, and_(jobs.c.id == hold.job_id, jobs.c.generation == hold.generation))
        .where(hold.entry_type == constant(EntryKind.HOLD),
               ~select(done.id).where(done.job_id == hold.job_id, done.generation == hold.generation,
                                      done.entry_type.in_([constant(EntryKind.CAPTURE),
                                                           constant(EntryKind.RELEASE)])).exists())
    ).returning(LedgerEntry.user_id, LedgerEntry.entry_type, LedgerEntry.amount).cte("settled")
    charged = case((entries.c.entry_type == constant(EntryKind.CAPTURE), entries.c.amount), else_=0)
    return (update(User).where(User.id == entries.c.user_id)
            .values(held=User.held - entries.c.amount, balance=User.balance - charged)
            .returning(User.id).cte("credited"))


@functools.cache
def _settle_statement() -> Any:
    job = select(Job.id, Job.generation).where(Job.id == bindparam("settled_id", type_=Uuid)).cte("job")
    return select(settlement(job).c.id)


def settle(job_id: uuid.UUID, entry_type: EntryKind) -> bool:
    """Capture or release the hold of the job's current generation, once, in the caller's
    transaction; False if it was already settled (or never held)."""
    assert entry_type in (EntryKind.CAPTURE, EntryKind.RELEASE)
    return db.session.connection().execute(_settle_statement(), {
        "settled_id": job_id, "settle_as": entry_type}).first() is not None


def top_up(user: User, amount: int) -> None:
    db.session.add(LedgerEntry(user_id=user.id, job_id=None, entry_type=EntryKind.TOPUP, amount=amount))
    user.balance += amount
