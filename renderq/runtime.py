"""The one way to reach this process's settings, Redis client and Celery app.

renderq.app binds them to the Flask app; everything here reads them from the current app
context, which web requests, Celery tasks and CLI commands all run in.
"""
from __future__ import annotations

import redis
from celery import Celery
from flask import current_app

from config import Settings


def settings() -> Settings:
    return current_app.extensions["renderq.settings"]


def redis_client() -> redis.Redis:
    """A client of REDIS_URL's server (connections pooled, made on first use)."""
    extensions = current_app.extensions
    if "renderq.redis" not in extensions:
        extensions["renderq.redis"] = redis.Redis.from_url(settings().redis_url, socket_timeout=5,
                                                           socket_connect_timeout=5)
    return extensions["renderq.redis"]


def celery_app() -> Celery:
    return current_app.extensions["celery"]
