"""The worker, beat and Flower entry point: `celery -A tasks worker|beat|flower`."""
import logging

from celery.signals import (
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

import celeryconfig
from renderq import workers
from renderq.app import create_base_app
from renderq.db import db
from renderq.jobs import scheduler
from renderq.logs import configure_logging

log = logging.getLogger(__name__)

flask_app = create_base_app()
app = flask_app.extensions["celery"]
_this_worker: dict = {}


@setup_logging.connect
def _use_renderq_logging(**_: object) -> None:
    configure_logging(flask_app.extensions["renderq.settings"].log_format)


@worker_init.connect
def _note_what_this_worker_runs(sender, **_: object) -> None:
    """Before the pool starts: an attempts worker's processes will announce their slots."""
    pool = getattr(sender.pool_cls, "__module__", str(sender.pool_cls)).rsplit(".", 1)[-1]
    _this_worker.update(hostname=sender.hostname, concurrency=sender.concurrency, pool=pool,
                        attempts=celeryconfig.ATTEMPTS_QUEUE in sender.app.amqp.queues.consume_from)
    if _this_worker["attempts"] and pool != "prefork":  # one process runs every slot
        _start_announcing(sender.concurrency)


@worker_process_init.connect
def _fresh_process(**_: object) -> None:
    # A pooled connection inherited from the parent would be shared by two processes.
    with flask_app.app_context():
        db.engine.dispose(close=False)
    if _this_worker.get("attempts"):  # a prefork child runs one slot
        _start_announcing(1)


def _start_announcing(slots: int) -> None:
    workers.start_keeper(flask_app, _this_worker["hostname"], slots, _this_worker["pool"])
    with flask_app.app_context():
        try:
            scheduler.dispatch()  # new slots: fill them now rather than at the next reconcile
        except Exception:
            db.session.rollback()
            log.warning("📋 [QUEUE] could not dispatch on start; the reconciler will", exc_info=True)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop_announcing(**_: object) -> None:
    workers.stop_keeper()
