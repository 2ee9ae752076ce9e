"""Celery bound to the Flask app (Flask's `celery_init_app` pattern) and the ladder task class."""
from __future__ import annotations

import uuid

from celery import Celery, Task
from celery.exceptions import Retry
from flask import Flask, current_app, has_app_context

import celeryconfig
from tasks.errors import RetryLater


class AppContextTask(Task):
    """Runs every task inside the Flask app's context, reusing one that is already active."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        flask_app: Flask = self.app.flask_app
        if has_app_context() and current_app._get_current_object() is flask_app:
            return self.run(*args, **kwargs)
        with flask_app.app_context():
            return self.run(*args, **kwargs)


class LadderTask(AppContextTask):
    """`autoretry_for` with the fast ladder's countdowns.

    The attempt decides the delay from the job row (SPEC §2 ladder, at least Retry-After)
    and raises RetryLater(countdown) (or Throttled when no generator slot is free); Celery's
    own retry machinery re-publishes the message.
    """

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None,
              max_retries=None, **options):
        if not isinstance(exc, RetryLater):
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        from tasks import dispatch
        from webapp import lifecycle

        epoch = dispatch.broker_epoch()
        try:
            return super().retry(args, kwargs, exc, throw, eta, exc.countdown, max_retries, **options)
        except Retry:
            lifecycle.mark_published(uuid.UUID(self.request.args[0]), epoch)
            raise


def celery_init_app(flask_app: Flask) -> Celery:
    celery = Celery(flask_app.name, task_cls=AppContextTask)
    celery.flask_app = flask_app
    celery.conf.update(celeryconfig.from_settings(flask_app.extensions["renderq.settings"]))
    celery.set_default()
    flask_app.extensions["celery"] = celery
    return celery
