"""The database handle, instantiated once here and bound to an app in renderq.app."""
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, ORMExecuteState, Session


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


@event.listens_for(Session, "do_orm_execute")
def _plain_bulk_writes(state: ORMExecuteState) -> None:
    """renderq's UPDATEs and DELETEs are guarded statements whose RETURNING says what happened;
    it never relies on the ORM bringing loaded objects up to date after them. That
    synchronisation, on an UPDATE ... FROM another table, returned the joined columns shifted
    by one place (a webhook's attempt count read back as its id), so it is off for all of them."""
    if state.is_update or state.is_delete:
        state.update_execution_options(synchronize_session=False)
