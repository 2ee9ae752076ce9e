"""The worker, beat and Flower entry point: `celery -A tasks worker|beat|flower`."""
import logging
import signal

from celery.signals import (
    beat_init,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

import celeryconfig
from renderq import tracing, workers
from renderq.app import create_base_app
from renderq.db import db
from renderq.jobs import scheduler
from renderq.logs import configure_logging

log = logging.getLogger(__name__)

flask_app = create_base_app()
app = flask_app.extensions["celery"]
_this_worker: dict = {}
# The service each consumer traces as (OTEL_SERVICE_NAME overrides it), by the queue it consumes.
SERVICES = {celeryconfig.ATTEMPTS_QUEUE: "renderq-worker", celeryconfig.MAINTENANCE_QUEUE: "renderq-maintenance",
            celeryconfig.WEBHOOKS_QUEUE: "renderq-webhooks"}


@setup_logging.connect
def _use_renderq_logging(**_: object) -> None:
    configure_logging(flask_app.extensions["renderq.settings"].log_format)


@worker_init.connect
def _note_what_this_worker_runs(sender, **_: object) -> None:
    """Before the pool starts: an attempts worker's processes will announce their slots."""
    pool = getattr(sender.pool_cls, "__module__", str(sender.pool_cls)).rsplit(".", 1)[-1]
    queues = sender.app.amqp.queues.consume_from
    _this_worker.update(hostname=sender.hostname, concurrency=sender.concurrency, pool=pool,
                        attempts=celeryconfig.ATTEMPTS_QUEUE in queues,
                        service=next((SERVICES[queue] for queue in SERVICES if queue in queues), "renderq-worker"))
    if pool != "prefork":  # tasks run in this process: trace it (a prefork pool's children trace themselves)
        tracing.setup(flask_app, _this_worker["service"])
    if _this_worker["attempts"] and pool != "prefork":  # one process runs every slot
        _start_announcing(sender.concurrency)


@beat_init.connect
def _trace_beat(**_: object) -> None:
    tracing.setup(flask_app, "renderq-beat")  # the sweeps' messages start their traces


@worker_process_init.connect
def _fresh_process(**_: object) -> None:
    # Each child exports its own spans: an exporter's thread does not survive a fork.
    tracing.setup(flask_app, _this_worker.get("service", "renderq-worker"))
    # A pooled connection inherited from the parent would be shared by two processes.
    with flask_app.app_context():
        db.engine.dispose(close=False)
    _outlive_the_groups_sigterm()
    if _this_worker.get("attempts"):  # a prefork child runs one slot
        _start_announcing(1)


def _outlive_the_groups_sigterm() -> None:
    """A prefork child gets the SIGTERM sent to its whole process group (Ctrl-C under honcho,
    systemd's default KillMode) at the moment the main process does. Dying then would abandon
    the running attempt; instead the child ignores it and the main process's warm shutdown
    drains it: the attempt finishes, then the pool closes (a cold shutdown still SIGKILLs)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
    tracing.shutdown()  # export what is left: a pool child may end without running atexit
