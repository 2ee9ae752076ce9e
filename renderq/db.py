"""The database handle, instantiated once here and bound to an app in renderq.app."""
import time
from typing import Any, Optional

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ColumnElement, Engine, Executable, Result, String, event, literal_column
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, ORMExecuteState, Session


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)

PING_AFTER_IDLE_SECONDS = 0.25
IDLE_IN_TRANSACTION_SECONDS = 10


def constant(name: str) -> ColumnElement[str]:
    """A status (or another of renderq.enums' names) written into a statement's text rather than
    bound as a parameter. PostgreSQL keeps one generic plan for a statement psycopg has prepared,
    and that plan can use a partial index on status = 'pending' only if the text says 'pending';
    with a parameter it either scans or plans the statement again on every run."""
    return literal_column("'%s'" % name.replace("'", "''"), String)


def execute_alone(statement: Executable, parameters: Optional[dict] = None) -> Result:
    """One statement that is a transaction by itself, run outside the session's transaction in
    a single round trip: without the BEGIN before it and the COMMIT after (autocommit)."""
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        return connection.execute(statement, parameters).freeze()()


def ping_connections_left_idle(engine: Engine) -> None:
    """SQLAlchemy's pool_pre_ping check, made only on a connection that sat unused for a
    moment. Under load a connection goes back out within milliseconds (the pool hands out the
    one given back last), and a ping before every checkout was one more round trip on every
    transaction. A connection that was dropped (a server restart, pg_terminate_backend) while
    idle is found by the ping and replaced; one dropped in the last quarter second fails its
    next statement, as one dropped during a statement does, and the pool renews them all."""

    @event.listens_for(engine, "checkin")
    def _idle_from_now(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as error:
            raise DisconnectionError("the connection did not answer a ping after %.0f s idle"
                                     % (time.monotonic() - idle_since)) from error


@event.listens_for(Session, "do_orm_execute")
def _plain_bulk_writes(state: ORMExecuteState) -> None:
    """renderq's UPDATEs and DELETEs are guarded statements whose RETURNING says what happened;
    it never relies on the ORM bringing loaded objects up to date after them. That
    synchronisation, on an UPDATE ... FROM another table, returned the joined columns shifted
    by one place (a webhook's attempt count read back as its id), so it is off for all of them."""
    if state.is_update or state.is_delete:
        state.update_execution_options(synchronize_session=False)
