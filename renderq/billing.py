"""Credits: a hold on acceptance, a capture on success, a release otherwise.

Every function runs inside the caller's transaction. The unique index on (job, entry type)
makes a second capture or release of the same job a no-op, whatever is redelivered.
"""
from __future__ import annotations

import uuid

from sqlalchemy import select, text, update

from renderq.db import db
from renderq.enums import EntryKind
from renderq.errors import InsufficientCredits
from renderq.models import LedgerEntry, User


def lock_user(user_id: int) -> User:
    """The user's row, locked until commit and re-read under the lock (the session may
    hold an older copy): concurrent submissions queue up here."""
    statement = select(User).where(User.id == user_id).with_for_update().execution_options(populate_existing=True)
    return db.session.execute(statement).scalar_one()


def hold(user: User, job_id: uuid.UUID, price: int) -> None:
    """Put `price` on hold for a job; the caller has locked the user with lock_user()."""
    available = user.balance - user.held
    if price > available:
        raise InsufficientCredits(price, available)
    db.session.add(LedgerEntry(user_id=user.id, job_id=job_id, entry_type=EntryKind.HOLD, amount=price))
    user.held += price


_SETTLE = text("""
    INSERT INTO ledger_entries (user_id, job_id, entry_type, amount)
    SELECT h.user_id, h.job_id, :entry_type, h.amount
      FROM ledger_entries h
     WHERE h.job_id = :job_id AND h.entry_type = :hold
       AND NOT EXISTS (SELECT 1 FROM ledger_entries s
                        WHERE s.job_id = h.job_id AND s.entry_type IN (:capture, :release))
    ON CONFLICT DO NOTHING
    RETURNING user_id, amount
""")


def settle(job_id: uuid.UUID, entry_type: EntryKind) -> bool:
    """Capture or release the job's hold, once; False if it was already settled (or never held)."""
    assert entry_type in (EntryKind.CAPTURE, EntryKind.RELEASE)
    row = db.session.execute(_SETTLE, {"job_id": job_id, "entry_type": entry_type, "hold": EntryKind.HOLD,
                                       "capture": EntryKind.CAPTURE, "release": EntryKind.RELEASE}).first()
    if row is None:
        return False
    charged = row.amount if entry_type == EntryKind.CAPTURE else 0
    db.session.execute(update(User).where(User.id == row.user_id).values(
        held=User.held - row.amount, balance=User.balance - charged))
    return True


def top_up(user: User, amount: int) -> None:
    db.session.add(LedgerEntry(user_id=user.id, job_id=None, entry_type=EntryKind.TOPUP, amount=amount))
    user.balance += amount
