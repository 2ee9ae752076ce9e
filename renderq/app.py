"""The Flask app every renderq process runs in: settings, database, Celery and logging bound
once. The web (webapp.create_app) adds HTTP to it; the worker, beat and Flower use it as it is."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from celery import Celery
from flask import Flask

import celeryconfig
from config import ConfigError, kinds, load_settings
from renderq import tracing
from renderq.db import IDLE_IN_TRANSACTION_SECONDS, db, ping_connections_left_idle
from renderq.logs import configure_logging

WEB_THREADS = 16  # gunicorn's --threads for `web` (Procfile)


def create_base_app(config: Optional[Mapping[str, str]] = None, name: str = "renderq",
                    trace_as: Optional[str] = None) -> Flask:
    """`config` overrides environment variables (tests pass a mapping). `trace_as` names the
    service this process traces as, if traces are on (renderq.tracing); a Celery worker leaves
    it out and sets traces up in the processes its pool runs tasks in (tasks/celery.py)."""
    settings = load_settings({**os.environ, **(config or {})})
    kinds.use_limits(settings.kind_limits)
    try:  # uploads and results go there, and beat keeps its schedule there (Procfile)
        os.makedirs(settings.media_root, exist_ok=True)
    except OSError as error:
        raise ConfigError("MEDIA_ROOT=%s cannot be created: %s" % (settings.media_root, error.strerror)) from None
    app = Flask(name)
    app.extensions["renderq.settings"] = settings
    app.config.update(
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        SQLALCHEMY_ENGINE_OPTIONS={
            "pool_size": pool_size(settings.concurrent_jobs), "max_overflow": 10, "pool_use_lifo": True,
            # A process cut off or paused inside a transaction (a dispatch round holds the dispatch
            # lock, a finish its job's row) is ended by the server after these seconds of silence,
            # not when its TCP connection times out hours later; renderq never waits inside one.
            "connect_args": {"options": "-c idle_in_transaction_session_timeout=%ds" % IDLE_IN_TRANSACTION_SECONDS},
        },
    )
    configure_logging(settings.log_format)
    db.init_app(app)
    with app.app_context():
        ping_connections_left_idle(db.engine)
    _bind_celery(app)
    if trace_as:
        tracing.setup(app, trace_as)
    return app


def pool_size(concurrent_jobs: int) -> int:
    """The database connections a process keeps open: one for each thread that may use one at
    once (an attempt thread, or one of a web process's 16), and two for its dispatcher and
    keeper. A smaller pool closes a connection as soon as it is given back under load and opens
    another a moment later: a new PostgreSQL backend for every few statements. The pool opens
    connections as they are first needed, so a process that never gets busy keeps few."""
    return max(concurrent_jobs, WEB_THREADS) + 2


def _bind_celery(flask_app: Flask) -> Celery:
    """Flask's `celery_init_app` pattern: tasks find the Flask app as `self.app.flask_app`
    (tasks.base.AppContextTask runs them inside its context)."""
    celery = Celery(flask_app.name)
    celery.flask_app = flask_app
    celery.conf.update(celeryconfig.from_settings(flask_app.extensions["renderq.settings"]))
    celery.set_default()
    flask_app.extensions["celery"] = celery
    return celery
