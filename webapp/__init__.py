"""The Flask app factory of the HTTP API: renderq's app plus blueprints, error mapping,
migrations and the CLI."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from flask import Flask, request
from flask_migrate import Migrate

from renderq import tracing
from renderq.app import create_base_app
from renderq.db import db
from webapp import (
    api,
    api_me,
    api_monitoring,
    api_replays,
    cli,
    errors,
    events,
    metrics,
    openapi,
    page,
)

MIGRATIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")

migrate = Migrate()


def create_app(config: Optional[Mapping[str, str]] = None) -> Flask:
    """Build the app. `config` overrides environment variables (tests pass a mapping)."""
    app = create_base_app(config, name=__name__, trace_as="renderq-web")  # each gunicorn worker: its own exporter
    settings = app.extensions["renderq.settings"]
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + 64 * 1024  # room for the form's other fields
    app.json.sort_keys = False  # resources read in the order docs/api.md lists their fields
    migrate.init_app(app, db, directory=MIGRATIONS)
    errors.register(app)
    for blueprint in (api.blueprint, api_me.blueprint, api_monitoring.blueprint, api_replays.blueprint,
                      events.blueprint, metrics.blueprint, page.blueprint, openapi.blueprint):
        app.register_blueprint(blueprint)
    cli.register(app)
    app.before_request(_trace_the_job)
    return app


def _trace_the_job() -> None:
    """A request about one job (its status, result, cancel) carries the job's id in its trace."""
    job_id = (request.view_args or {}).get("job_id")
    if job_id:
        tracing.mark_job(job_id)
