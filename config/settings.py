"""One settings object, read from the environment once and validated at start-up.

Every name and default is in docs/configuration.md; a bad value raises ConfigError naming the variable.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.engine import make_url

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


def _optional_url(raw: str) -> str:
    if raw and not raw.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return raw


# The spellings of a PostgreSQL URL in the wild (PaaS add-ons, compose files, libpq's own
# `postgres://`, SQLAlchemy's dialect+driver) all mean the one driver installed: psycopg 3.
POSTGRES_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")
DATABASE_DRIVER = "postgresql+psycopg"


def _database_url(raw: str) -> str:
    """Any usual PostgreSQL URL as SQLAlchemy's psycopg 3 URL; the rest of it (user, password,
    host or socket, port, query parameters) is kept as written."""
    scheme, separator, rest = raw.partition("://")
    if not separator or scheme.lower() not in POSTGRES_SCHEMES:
        raise ValueError("must be a PostgreSQL URL: postgresql://user:password@host:5432/database "
                         "(postgres:// and postgresql+psycopg:// are read the same way)")
    url = DATABASE_DRIVER + "://" + rest
    try:
        make_url(url)  # a port that is not a number, for instance
    except ValueError as error:
        several_hosts = "," in rest.split("/", 1)[0]
        raise ValueError("lists several hosts: write them as ?host=a:5432&host=b:5432" if several_hosts
                         else "is not a valid URL (%s)" % error) from None
    return url


REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://", "unix://")
# ssl_cert_reqs as redis-py, kombu and Celery's result backend all read it from a rediss:// URL.
CERT_REQUIREMENTS = {"none": "none", "cert_none": "none", "optional": "optional", "cert_optional": "optional",
                     "required": "required", "cert_required": "required"}


def _redis_url(raw: str) -> str:
    """A Redis URL every client renderq has (redis-py, Celery's broker and result backend) reads
    the same way: a password and a user are fine; TLS (rediss://) takes its ssl_* options from
    the URL, ssl_cert_reqs spelled the one way all three accept. A Unix socket is unix:///path?db=N
    (celeryconfig gives Celery its own spelling of it)."""
    if not raw.startswith(REDIS_SCHEMES):
        raise ValueError("must start with " + " or ".join(REDIS_SCHEMES))
    parts = urlsplit(raw)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as error:
        raise ValueError("is not a valid URL (%s)" % error) from None
    query = parse_qsl(parts.query, keep_blank_values=True)
    if parts.scheme == "redis+socket":  # kombu's spelling of a socket; redis-py reads only unix://
        socket_query = urlencode([("db" if name == "virtual_host" else name, value) for name, value in query])
        return "unix://%s%s%s" % (parts.netloc, parts.path, "?" + socket_query if socket_query else "")
    tls_options = [name for name, _ in query if name.startswith("ssl_")]
    if tls_options and parts.scheme != "rediss":
        raise ValueError("has %s but is not a rediss:// (TLS) URL" % ", ".join(tls_options))
    requirement = dict(query).get("ssl_cert_reqs")
    if requirement is None or requirement in CERT_REQUIREMENTS.values():
        return raw
    if requirement.lower() not in CERT_REQUIREMENTS:
        raise ValueError("ssl_cert_reqs must be required, optional or none")
    query = [(name, CERT_REQUIREMENTS[value.lower()] if name == "ssl_cert_reqs" else value) for name, value in query]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


def _result_backend(raw: str) -> str:
    return raw if raw.startswith("db+") else _redis_url(raw)


def _redacted(raw: str) -> str:
    """`raw` without the password a URL may carry, for error messages."""
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", raw)


def _optional(parse: Callable[[str], str]) -> Callable[[str], str]:
    return lambda raw: parse(raw) if raw else raw


# What Celery may use as the broker: Redis (or Redis behind Sentinel) or RabbitMQ over AMQP 0-9-1.
BROKER_SCHEMES = ("redis://", "rediss://", "redis+socket://", "sentinel://", "amqp://", "amqps://", "pyamqp://")
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


def _bucket_name(raw: str) -> str:
    if raw and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", raw):
        raise ValueError("must be an S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens")
    return raw


def _region(raw: str) -> str:
    if raw and not re.fullmatch(r"[a-z0-9-]+", raw):
        raise ValueError("must be a region name such as eu-west-1")
    return raw


def _broker_url(raw: str) -> str:
    """Redis (read as REDIS_URL is), Redis behind Sentinel, or RabbitMQ."""
    if raw.startswith(("sentinel://", *AMQP_SCHEMES)):
        return raw
    if not raw.startswith(REDIS_SCHEMES):
        raise ValueError("must start with " + " or ".join(BROKER_SCHEMES))
    return _redis_url(raw)


class _Reader:
    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def __call__(self, name: str, default: str, parse: Callable[[str], T], secret: bool = False) -> T:
        raw = self.environ.get(name)
        if raw is None or raw == "":
            raw = default
        try:
            return parse(raw)
        except ValueError as error:
            shown = "(the value is secret: not shown)" if secret else repr(_redacted(raw))
            raise ConfigError("%s=%s is invalid: %s" % (name, shown, error)) from None


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str
    broker_url: str
    broker_sentinel_master: str
    result_backend: str
    app_env: str
    max_retries: int
    retry_delays: tuple[float, ...]
    concurrent_jobs: int
    worker_pool: str
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
    s3_bucket: str
    s3_endpoint_url: str
    s3_region: str
    max_upload_bytes: int
    default_locale: str
    notify_on_failure: bool
    log_format: str
    job_lease_seconds: float
    max_waiting_requests: int
    max_event_streams: int
    event_heartbeat_seconds: float
    kind_limits: dict
    # OpenTelemetry traces (renderq.tracing): "otlp", "console", or "" for off.
    traces_exporter: str
    traces_endpoint: str  # where OTLP/HTTP spans are POSTed, /v1/traces included
    service_name: str  # OTEL_SERVICE_NAME; each process has its own default

    @property
    def production(self) -> bool:
        return self.app_env == "production"

    @property
    def broker_is_amqp(self) -> bool:
        """RabbitMQ (or another AMQP 0-9-1 broker) rather than Redis."""
        return self.broker_url.startswith(AMQP_SCHEMES)

    def retry_delay(self, retry_number: int) -> float:
        """Seconds to wait before fast-ladder retry number `retry_number` (1-based)."""
        return self.retry_delays[retry_number - 1]


def _tracing(read: _Reader) -> dict:
    """Traces are off unless an OTLP endpoint is set or OTEL_TRACES_EXPORTER=console. Only the
    OTLP/HTTP exporter is installed, so a gRPC protocol is refused rather than silently unused."""
    read("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", _choice("http/protobuf"))
    read("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf", _choice("http/protobuf"))
    exporter = read("OTEL_TRACES_EXPORTER", "otlp", _choice("otlp", "console", "none"))
    endpoint = read("OTEL_EXPORTER_OTLP_ENDPOINT", "", _optional_url)
    # The signal's own endpoint is used as it is; the general one gets the signal's path.
    traces_endpoint = read("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "", _optional_url) or (
        endpoint.rstrip("/") + "/v1/traces" if endpoint else "")
    disabled = read("OTEL_SDK_DISABLED", "false", _boolean)
    if disabled or exporter == "none" or (exporter == "otlp" and not traces_endpoint):
        exporter = ""
    return {"traces_exporter": exporter, "traces_endpoint": traces_endpoint,
            "service_name": read("OTEL_SERVICE_NAME", "", str)}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    read = _Reader(os.environ if environ is None else environ)
    redis_url = read("REDIS_URL", "redis://127.0.0.1:6379/0", _redis_url)
    settings = Settings(
        database_url=read("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/renderq", _database_url),
        redis_url=redis_url,
        broker_url=read("BROKER_URL", redis_url, _broker_url),
        broker_sentinel_master=read("BROKER_SENTINEL_MASTER", "", str),
        result_backend=read("CELERY_RESULT_BACKEND", redis_url, _result_backend),
        app_env=read("APP_ENV", "development", _choice("development", "production", "test")),
        max_retries=read("MAX_RETRIES", "5", _non_negative_int),
        retry_delays=read("RETRY_DELAYS", "1,5,15,60,300", _delays),
        concurrent_jobs=read("CONCURRENT_JOBS", "3", _positive_int),
        worker_pool=read("WORKER_POOL", "threads", _choice("threads", "prefork", "solo")),
        queue_check_interval=read("QUEUE_CHECK_INTERVAL", "5", _positive_float),
        completed_job_ttl=read("COMPLETED_JOB_TTL", "86400", _positive_int),
        background_processing_interval_ms=read("BACKGROUND_PROCESSING_INTERVAL", "30000", _positive_int),
        max_concurrent_background_tasks=read("MAX_CONCURRENT_BACKGROUND_TASKS", "3", _positive_int),
        max_background_retry_age_ms=read("MAX_BACKGROUND_RETRY_AGE", "86400000", _positive_int),
        max_retry_attempts=read("MAX_RETRY_ATTEMPTS", "3", _non_negative_int),
        generator_url=read("GENERATOR_URL", "http://127.0.0.1:5001", _url("http://", "https://")).rstrip("/"),
        generator_max_inflight=read("GENERATOR_MAX_INFLIGHT", "0", _non_negative_int),
        webhook_secret=read("WEBHOOK_SECRET", "", _webhook_secret, secret=True),
        webhook_allowed_networks=read("WEBHOOK_ALLOWED_NETWORKS", "", _networks),
        webhook_retry_delays=read("WEBHOOK_RETRY_DELAYS", "1,2,4,8,16,32,64", _delays),
        flower_basic_auth=read("FLOWER_BASIC_AUTH", "", _credentials, secret=True),
        storage_backend=read("STORAGE_BACKEND", "postgres", _choice("postgres", "filesystem", "s3")),
        media_root=os.path.abspath(read("MEDIA_ROOT", "var/media", str)),
        s3_bucket=read("S3_BUCKET", "", _bucket_name),
        s3_endpoint_url=read("S3_ENDPOINT_URL", "", _optional(_url("http://", "https://"))),
        s3_region=read("S3_REGION", "", _region),
        max_upload_bytes=read("MAX_UPLOAD_BYTES", str(10 * 1024 * 1024), _positive_int),
        default_locale=read("DEFAULT_LOCALE", "en", _choice("en", "ru")),
        notify_on_failure=read("NOTIFY_ON_FAILURE", "false", _boolean),
        log_format=read("LOG_FORMAT", "text", _choice("text", "json")),
        job_lease_seconds=read("JOB_LEASE_SECONDS", "30", _positive_float),
        max_waiting_requests=read("MAX_WAITING_REQUESTS", "2", _non_negative_int),
        max_event_streams=read("MAX_EVENT_STREAMS", "8", _non_negative_int),
        event_heartbeat_seconds=read("EVENT_HEARTBEAT_SECONDS", "15", _positive_float),
        kind_limits=read("KIND_LIMITS", "", _kind_limits),
        **_tracing(read),
    )
    if settings.max_retries > len(settings.retry_delays):
        raise ConfigError(
            "RETRY_DELAYS has %d delays but MAX_RETRIES=%d needs one per retry"
            % (len(settings.retry_delays), settings.max_retries)
        )
    if settings.broker_url.startswith("sentinel://") and not settings.broker_sentinel_master:
        raise ConfigError("BROKER_URL is a sentinel:// URL: set BROKER_SENTINEL_MASTER to the name of the "
                          "Redis master the Sentinels watch")
    if settings.storage_backend == "s3" and not settings.s3_bucket:
        raise ConfigError("STORAGE_BACKEND=s3 needs S3_BUCKET, the bucket that keeps uploads and results")
    return settings
