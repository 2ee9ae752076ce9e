"""The worker, beat and Flower entry point: `celery -A tasks worker|beat|flower`."""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional

import celery.apps.worker
import click
from celery import VERSION_BANNER
from celery.signals import (
    beat_init,
    celeryd_after_setup,
    setup_logging,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
    worker_shutting_down,
)
from celery.utils.log import LoggingProxy

import celeryconfig
from renderq import tracing, workers
from renderq.app import create_base_app
from renderq.db import db
from renderq.jobs import scheduler
from renderq.logs import JsonFormatter, configure_logging

log = logging.getLogger(__name__)

flask_app = create_base_app()
app = flask_app.extensions["celery"]
_this_worker: dict = {}
# The service each consumer traces as (OTEL_SERVICE_NAME overrides it), by the queue it consumes.
SERVICES = {celeryconfig.ATTEMPTS_QUEUE: "renderq-worker", celeryconfig.MAINTENANCE_QUEUE: "renderq-maintenance",
            celeryconfig.WEBHOOKS_QUEUE: "renderq-webhooks"}
_log_format = flask_app.extensions["renderq.settings"].log_format


def _say_as_json(message: str, stream=sys.__stderr__) -> None:
    """The worker's signal handlers ("worker: Warm shutdown") write with os.write rather than
    logging, whose locks a signal handler must not take: the same write, as one JSON object."""
    record = logging.LogRecord("celery.apps.worker", logging.INFO, __file__, 0, message, None, None)
    record.job_id = record.request_id = "-"
    os.write(stream.fileno(), (JsonFormatter().format(record) + "\n").encode())


def _running(*commands: str) -> bool:
    """Whether this is `celery -A tasks <command>` (the app loads while its command line is read)."""
    context = click.get_current_context(silent=True)
    return context is not None and context.invoked_subcommand in commands


if _log_format == "json":
    celery.apps.worker.safe_say = _say_as_json
    if _running("worker", "beat"):
        # Beat prints its start-up banner, and a task or a library may print anything: as log
        # lines, they come out as JSON like the rest. (Celery's worker_redirect_stdouts does this,
        # but only after the banners, and never with a setup_logging receiver like ours.) Not for
        # `celery inspect` and the like, whose answers are their output.
        sys.stdout = LoggingProxy(logging.getLogger("celery.redirected"), logging.INFO)


class QuietPeriodicRuns(logging.Filter):
    """Celery's INFO lines for each run of beat's periodic tasks ("Task ... received", "Task ...
    succeeded", beat's "Sending due task ...", "Discarding revoked task" for a run that expired
    unstarted) come every QUEUE_CHECK_INTERVAL and say nothing: a run logs its own one-line
    summary when it did something. They go to DEBUG instead; a failure still logs at ERROR,
    and every other task keeps its lines."""

    LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request", "celery.beat")
    # Lines that name their task in their arguments rather than in `data`: the argument's index.
    NAMED_IN_ARGUMENTS = {"Scheduler: Sending due task": 1, "Discarding revoked task": 0}

    def __init__(self, task_names: set[str]):
        super().__init__()
        self.task_names = task_names

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or self.task_name(record) not in self.task_names:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)

    def task_name(self, record: logging.LogRecord) -> Optional[str]:
        data = getattr(record, "data", None)  # the worker passes its lines' arguments as `data`, for handlers
        if isinstance(data, dict):
            return data.get("name")
        for start, index in self.NAMED_IN_ARGUMENTS.items():
            if str(record.msg).startswith(start) and isinstance(record.args, tuple) and len(record.args) > index:
                return record.args[index]
        return None


@setup_logging.connect
def _use_renderq_logging(loglevel: Optional[int] = None, **_: object) -> None:
    configure_logging(_log_format)
    if loglevel:  # --loglevel (Celery's setup_logging leaves it to us)
        logging.getLogger().setLevel(loglevel)
    quiet = QuietPeriodicRuns({entry["task"] for entry in app.conf.beat_schedule.values()})
    for name in QuietPeriodicRuns.LOGGERS:
        logging.getLogger(name).addFilter(quiet)


@celeryd_after_setup.connect
def _start_up_line_instead_of_the_banner(sender: str, instance, **_: object) -> None:
    """In JSON, the worker's banner (printed straight to the terminal) becomes one log line."""
    if _log_format == "json":
        instance.quiet = True
        log.info("celery worker %s starting: celery %s, queues %s, concurrency %s (%s), broker %s", sender,
                 VERSION_BANNER, ",".join(instance.app.amqp.queues.consume_from), instance.concurrency,
                 _this_worker.get("pool"), instance.app.connection_for_write().as_uri())


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
    scheduler.dispatcher(flask_app).ask()  # new slots: fill them now rather than at the next reconcile


@worker_shutting_down.connect
def _drain(**_: object) -> None:
    # Sent from the signal handler: a plain flag, no lock. Threads finish the attempt they run
    # and take no handed-over job after it.
    keeper = workers.keeper()
    if keeper is not None:
        keeper.draining = True


@worker_process_shutdown.connect
@worker_shutdown.connect
def _stop_announcing(**_: object) -> None:
    scheduler.finish_dispatching()  # a prefork child ends without atexit
    workers.stop_keeper()
    tracing.shutdown()  # export what is left: a pool child may end without running atexit
