"""The worker, beat and Flower entry point: `celery -A tasks worker|beat|flower`."""
from celery.signals import setup_logging, worker_process_init

from renderq.app import create_base_app
from renderq.db import db
from renderq.logs import configure_logging

flask_app = create_base_app()
app = flask_app.extensions["celery"]


@setup_logging.connect
def _use_renderq_logging(**_: object) -> None:
    configure_logging(flask_app.extensions["renderq.settings"].log_format)


@worker_process_init.connect
def _fresh_connections_after_fork(**_: object) -> None:
    # A pooled connection inherited from the parent would be shared by two processes.
    with flask_app.app_context():
        db.engine.dispose(close=False)
