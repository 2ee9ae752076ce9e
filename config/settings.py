"""One settings object, read from the environment once and validated at start-up.

Every name and default is in docs/configuration.md; a bad value raises ConfigError naming the variable.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a value renderq cannot run with; the message names the variable."""


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be zero or a positive integer")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _delays(raw: str) -> tuple[float, ...]:
    delays = tuple(float(part) for part in raw.split(",") if part.strip())
    if not delays or any(delay < 0 for delay in delays):
        raise ValueError("must be a comma-separated list of non-negative seconds")
    return delays


def _networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for part in (part.strip() for part in raw.split(",")):
        if part:
            try:
                networks.append(ipaddress.ip_network(part))  # strict: 127.0.0.1/8 is a typo, not 127.0.0.0/8
            except ValueError as error:
                raise ValueError("must be comma-separated CIDRs such as 10.0.0.0/8 or fd00::/8 (%s)" % error) from None
    return tuple(networks)


def _boolean(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _webhook_secret(raw: str) -> str:
    if raw == "":
        return raw
    if not raw.startswith("whsec_"):
        raise ValueError("must be a Standard Webhooks secret: whsec_ followed by base64")
    try:
        if len(base64.b64decode(raw[len("whsec_"):], validate=True)) < 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise ValueError("must be whsec_ followed by at least 16 base64-encoded bytes") from None
    return raw


def _credentials(raw: str) -> str:
    user, _, password = raw.partition(":")
    if raw and not (user and password):
        raise ValueError("must be user:password")
    return raw


def _kind_limits(raw: str) -> dict[str, tuple[float, float, float]]:
    """`kind=soft/hard/timeout,...` in seconds: an attempt's soft and hard time limits and its
    generator call's timeout, per kind."""
    from config.kinds import KINDS

    limits = {}
    for part in filter(None, (piece.strip() for piece in raw.split(","))):
        name, _, numbers = part.partition("=")
        if name not in KINDS:
            raise ValueError("unknown kind %r (valid: %s)" % (name, ", ".join(sorted(KINDS))))
        try:
            soft, hard, timeout = (float(number) for number in numbers.split("/"))
        except ValueError:
            raise ValueError("%r: give soft/hard/timeout in seconds, e.g. %s=90/120/60" % (part, name)) from None
        if not 0 < timeout <= soft <= hard:
            raise ValueError("%r: need 0 < timeout <= soft <= hard" % part)
        limits[name] = (soft, hard, timeout)
    return limits


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in allowed:
            raise ValueError("must be one of " + ", ".join(allowed))
        return raw

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if not raw.startswith(schemes):
            raise ValueError("must start with " + " or ".join(schemes))
        return raw

    return parse


class _Reader:
    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def __call__(self, name: str, default: str, parse: Callable[[str], T]) -> T:
        raw = self.environ.get(name)
        if raw is None or raw == "":
            raw = default
        try:
            return parse(raw)
        except ValueError as error:
            raise ConfigError("%s=%r is invalid: %s" % (name, raw, error)) from None


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    result_backend: str
    app_env: str
    max_retries: int
    retry_delays: tuple[float, ...]
    concurrent_jobs: int
    queue_check_interval: float
    completed_job_ttl: int
    background_processing_interval_ms: int
    max_concurrent_background_tasks: int
    max_background_retry_age_ms: int
    max_retry_attempts: int
    generator_url: str
    generator_max_inflight: int
    webhook_secret: str
    webhook_allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    webhook_retry_delays: tuple[float, ...]
    flower_basic_auth: str
    storage_backend: str
    media_root: str
    max_upload_bytes: int
    default_locale: str
    notify_on_failure: bool
    log_format: str
    job_lease_seconds: float
    max_waiting_requests: int
    kind_limits: dict

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    def retry_delay(self, retry_number: int) -> float:
        """Seconds to wait before fast-ladder retry number `retry_number` (1-based)."""
        return self.retry_delays[retry_number - 1]


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    read = _Reader(os.environ if environ is None else environ)
    redis_url = read("REDIS_URL", "redis://127.0.0.1:6379/0", _url("redis://", "rediss://", "redis+socket://", "unix://"))
    settings = Settings(
        database_url=read("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/renderq", _url("postgresql")),
        redis_url=redis_url,
        result_backend=read("CELERY_RESULT_BACKEND", redis_url, _url("redis://", "rediss://", "redis+socket://", "unix://", "db+")),
        app_env=read("APP_ENV", "development", _choice("development", "production", "test")),
        max_retries=read("MAX_RETRIES", "5", _non_negative_int),
        retry_delays=read("RETRY_DELAYS", "1,5,15,60,300", _delays),
        concurrent_jobs=read("CONCURRENT_JOBS", "3", _positive_int),
        queue_check_interval=read("QUEUE_CHECK_INTERVAL", "5", _positive_float),
        completed_job_ttl=read("COMPLETED_JOB_TTL", "86400", _positive_int),
        background_processing_interval_ms=read("BACKGROUND_PROCESSING_INTERVAL", "30000", _positive_int),
        max_concurrent_background_tasks=read("MAX_CONCURRENT_BACKGROUND_TASKS", "3", _positive_int),
        max_background_retry_age_ms=read("MAX_BACKGROUND_RETRY_AGE", "86400000", _positive_int),
        max_retry_attempts=read("MAX_RETRY_ATTEMPTS", "3", _non_negative_int),
        generator_url=read("GENERATOR_URL", "http://127.0.0.1:5001", _url("http://", "https://")).rstrip("/"),
        generator_max_inflight=read("GENERATOR_MAX_INFLIGHT", "0", _non_negative_int),
        webhook_secret=read("WEBHOOK_SECRET", "", _webhook_secret),
        webhook_allowed_networks=read("WEBHOOK_ALLOWED_NETWORKS", "", _networks),
        webhook_retry_delays=read("WEBHOOK_RETRY_DELAYS", "1,2,4,8,16,32,64", _delays),
        flower_basic_auth=read("FLOWER_BASIC_AUTH", "", _credentials),
        storage_backend=read("STORAGE_BACKEND", "postgres", _choice("postgres", "filesystem")),
        media_root=os.path.abspath(read("MEDIA_ROOT", "var/media", str)),
        max_upload_bytes=read("MAX_UPLOAD_BYTES", str(10 * 1024 * 1024), _positive_int),
        default_locale=read("DEFAULT_LOCALE", "en", _choice("en", "ru")),
        notify_on_failure=read("NOTIFY_ON_FAILURE", "false", _boolean),
        log_format=read("LOG_FORMAT", "text", _choice("text", "json")),
        job_lease_seconds=read("JOB_LEASE_SECONDS", "30", _positive_float),
        max_waiting_requests=read("MAX_WAITING_REQUESTS", "2", _non_negative_int),
        kind_limits=read("KIND_LIMITS", "", _kind_limits),
    )
    if settings.max_retries > len(settings.retry_delays):
        raise ConfigError(
            "RETRY_DELAYS has %d delays but MAX_RETRIES=%d needs one per retry"
            % (len(settings.retry_delays), settings.max_retries)
        )
    return settings
