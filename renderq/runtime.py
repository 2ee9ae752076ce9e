"""The one way to reach this process's settings, Redis client, S3 client and Celery app.

renderq.app binds them to the Flask app; everything here reads them from the current app
context, which web requests, Celery tasks and CLI commands all run in.
"""
from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from flask import current_app

from config import Settings


def settings() -> Settings:
    return current_app.extensions["renderq.settings"]


# A blocking command must return within this, or the client gives up on its connection.
REDIS_SOCKET_TIMEOUT = 5


def redis_client() -> redis.Redis:
    """A client of REDIS_URL's server (connections pooled, made on first use)."""
    extensions = current_app.extensions
    if "renderq.redis" not in extensions:
        extensions["renderq.redis"] = redis.Redis.from_url(settings().redis_url, socket_timeout=REDIS_SOCKET_TIMEOUT,
                                                           socket_connect_timeout=REDIS_SOCKET_TIMEOUT)
    return extensions["renderq.redis"]


def s3_client() -> Any:
    """A boto3 client of S3_ENDPOINT_URL (AWS itself without it), for STORAGE_BACKEND=s3: one a
    process, made on first use (it is thread-safe, and slow to make). Credentials come from
    boto3's usual chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role."""
    extensions = current_app.extensions
    if "renderq.s3" not in extensions:
        import boto3  # only the s3 storage needs it
        from botocore.config import Config

        config = settings()
        extensions["renderq.s3"] = boto3.session.Session().client(
            "s3", endpoint_url=config.s3_endpoint_url or None, region_name=config.s3_region or None,
            # A store that does not answer must not hold an upload or an attempt for long.
            config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"}))
    return extensions["renderq.s3"]


def celery_app() -> Celery:
    return current_app.extensions["celery"]
