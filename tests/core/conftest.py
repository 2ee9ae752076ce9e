"""Core tests: renderq's domain called directly, on a real PostgreSQL, with no worker running."""
from __future__ import annotations

import re
import uuid
from typing import Any, Iterator, Optional

import pytest
from sqlalchemy import text

from renderq import billing
from renderq.db import db
from renderq.enums import EntryKind, Status
from renderq.models import Job, LedgerEntry, User
from tests.conftest import BASE_DATABASE_URL
from tests.support import create_database, drop_database


@pytest.fixture(scope="session")
def core_app(base_env) -> Iterator:
    """The app on a database of its own, so that batch operations see only these tests' rows."""
    from flask_migrate import upgrade

    from webapp import create_app

    database_url = create_database(BASE_DATABASE_URL, prefix="renderq_core")
    app = create_app({**base_env, "DATABASE_URL": database_url})
    with app.app_context():
        upgrade()
    yield app
    with app.app_context():
        db.engine.dispose()
    drop_database(database_url)


@pytest.fixture()
def ctx(core_app) -> Iterator[None]:
    """An app context; every row a test made is gone after it."""
    with core_app.app_context():
        yield
        dispatcher = core_app.extensions.get("renderq.dispatcher")
        if dispatcher is not None:  # a round the test asked for must not meet the TRUNCATE
            dispatcher.idle.wait(10)
        db.session.rollback()
        db.session.execute(text("TRUNCATE jobs, photos, ledger_entries, notifications, idempotency_keys, "
                                "job_attempts, users"))
        db.session.commit()


def new_user(balance: int = 10) -> User:
    user = User(email="core-%s@example.com" % uuid.uuid4().hex[:12], token_hash=uuid.uuid4().hex, balance=0, held=0)
    db.session.add(user)
    db.session.flush()
    if balance:
        billing.top_up(user, balance)
    db.session.commit()
    return user


def new_job(user: User, status: Status = Status.PENDING, price: int = 1, hold: bool = True,
            kind: str = "photo.render", **values: object) -> Job:
    """A job row in `status`, its price held as a submission would."""
    job_id = uuid.uuid4()
    locked = billing.lock_user(user.id)
    if hold:
        db.session.add(LedgerEntry(user_id=user.id, job_id=job_id, entry_type=EntryKind.HOLD, amount=price))
        locked.held += price
    job = Job(id=job_id, user_id=user.id, kind=kind, params={"style": "sepia", "prompt": ""},
              price=price, status=status, **values)
    db.session.add(job)
    db.session.commit()
    return job


def generic_plan(statement: Any, values: Optional[dict] = None) -> str:
    """EXPLAIN of the one generic plan PostgreSQL may keep for `statement` once psycopg has
    prepared it (it prepares a statement run often): the plan that has to serve every value of
    its parameters. `values` fill the parameters (the statement's own defaults otherwise). The
    caller's transaction is rolled back."""
    compiled = statement.compile(db.engine)
    values = {**compiled.params, **(values or {})}
    names: list[str] = []

    def placeholder(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return "$%d" % (names.index(match.group(1)) + 1)

    connection = db.session.connection()
    connection.exec_driver_sql("PREPARE planned AS " + re.sub(r"%\((\w+)\)s", placeholder, str(compiled)))
    connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    arguments = ", ".join("NULL" if values[name] is None else "'%s'" % values[name] for name in names)
    try:
        return "\n".join(row[0] for row in connection.exec_driver_sql(
            "EXPLAIN EXECUTE planned%s" % ("(%s)" % arguments if names else "")))
    finally:
        db.session.rollback()
        db.session.connection().exec_driver_sql("DEALLOCATE planned")  # prepared statements outlive transactions
        db.session.rollback()
