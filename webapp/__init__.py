"""The Flask app factory."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from flask import Flask

from config import ConfigError, load_settings
from webapp.extensions import db, migrate
from webapp.logs import configure_logging

MIGRATIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "migrations")


def create_app(config: Optional[Mapping[str, str]] = None) -> Flask:
    """Build the app. `config` overrides environment variables (tests pass a mapping)."""
    settings = load_settings({**os.environ, **(config or {})})
    try:  # uploads and results go there, and beat keeps its schedule there (Procfile)
        os.makedirs(settings.media_root, exist_ok=True)
    except OSError as error:
        raise ConfigError("MEDIA_ROOT=%s cannot be created: %s" % (settings.media_root, error.strerror)) from None
    app = Flask(__name__)
    app.extensions["renderq.settings"] = settings
    app.config.update(
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_pre_ping": True, "pool_size": 5, "max_overflow": 10},
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + 64 * 1024,  # room for the form's other fields
    )
    app.json.sort_keys = False  # resources read in the order SPEC §6 lists their fields
    configure_logging(settings.log_format)
    db.init_app(app)
    migrate.init_app(app, db, directory=MIGRATIONS)

    from tasks.base import celery_init_app
    from webapp import api, api_me, api_monitoring, cli, errors, metrics, openapi, page

    celery_init_app(app)
    errors.register(app)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(api_me.blueprint)
    app.register_blueprint(api_monitoring.blueprint)
    app.register_blueprint(metrics.blueprint)
    app.register_blueprint(page.blueprint)
    app.register_blueprint(openapi.blueprint)
    cli.register(app)
    return app
