"""The worker and beat entry point: `celery -A tasks worker|beat|flower`."""
from celery.signals import setup_logging, worker_process_init

from webapp import create_app
from webapp.extensions import db
from webapp.logs import configure_logging

flask_app = create_app()
app = flask_app.extensions["celery"]


@setup_logging.connect
def _use_renderq_logging(**_: object) -> None:
    configure_logging(flask_app.extensions["renderq.settings"].log_format)


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    # A pooled connection inherited from the parent would be shared by two processes.
    with flask_app.app_context():
        db.engine.dispose(close=False)
