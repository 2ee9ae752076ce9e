"""Task classes: every task runs inside the Flask app's context; attempts retry on the ladder."""
from __future__ import annotations

from celery import Task
from flask import Flask, current_app, has_app_context

from renderq.broker import PUBLISH_TIMEOUT, timer_countdown
from renderq.jobs.policy import RetryLater


class AppContextTask(Task):
    """Runs the task inside the Flask app's context (Flask's `celery_init_app` pattern),
    reusing one that is already active."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        flask_app: Flask = self.app.flask_app
        if has_app_context() and current_app._get_current_object() is flask_app:
            return self.run(*args, **kwargs)
        with flask_app.app_context():
            return self.run(*args, **kwargs)


class LadderTask(AppContextTask):
    """`autoretry_for` with the fast ladder's countdowns.

    The attempt decides the delay from the job row (renderq.jobs.policy) and raises
    RetryLater(countdown); Celery's own retry machinery sends the message again after it. The
    message goes without the attempt's ticket: when it arrives, the job is due and waits for
    a free slot like any other (renderq.jobs.scheduler). A wait longer than one timer may last
    (a 429's Retry-After) is set again for the rest when the timer arrives.
    """

    def retry(self, args=None, kwargs=None, exc=None, throw=True, eta=None, countdown=None,
              max_retries=None, **options):
        if isinstance(exc, RetryLater):
            countdown = timer_countdown(exc.countdown)
            kwargs = {"kind": (self.request.kwargs or {}).get("kind")}
            options = {**PUBLISH_TIMEOUT, **options}
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
