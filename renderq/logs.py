"""Logging: every line carries the job id (and request id) of the work it belongs to.

A contextvar holds the ids; a filter stamps them on each record, so log calls stay plain
%-style calls and no code passes ids around just for logging.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from typing import Iterator, Optional

current_job_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("job_id", default=None)
current_request_id: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("request_id", default=None)

PREFIXES = ("📋 [QUEUE]", "🔧 [JOB_PROCESSOR]", "❌ [ERROR_HANDLER]", "✅ [QUEUED_", "🔁 [BACKGROUND]")


@contextlib.contextmanager
def job_logging(job_id: object) -> Iterator[None]:
    token = current_job_id.set(str(job_id))
    try:
        yield
    finally:
        current_job_id.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "job_id", None):
            record.job_id = current_job_id.get() or "-"
        record.request_id = getattr(record, "request_id", None) or current_request_id.get() or "-"
        return True


def _prefix(message: str) -> Optional[str]:
    for prefix in PREFIXES:
        if message.startswith(prefix):
            return message.split("]", 1)[0] + "]"
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "prefix": _prefix(message),
            "job_id": None if record.job_id == "-" else record.job_id,
            "request_id": None if record.request_id == "-" else record.request_id,
            "message": message,
        }
        entry.update(getattr(record, "fields", None) or {})  # structured extras: an access line's method, status...
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s job=%(job_id)s req=%(request_id)s %(message)s"


def formatter(log_format: str) -> logging.Formatter:
    """renderq's formatter for LOG_FORMAT (its handlers also need a ContextFilter)."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure_logging(log_format: str) -> None:
    """Install renderq's handler on the root logger once per process."""
    root = logging.getLogger()
    if any(getattr(handler, "renderq", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.renderq = True  # type: ignore[attr-defined]
    handler.addFilter(ContextFilter())
    handler.setFormatter(formatter(log_format))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # "setup plugin ..." per process
    if log_format == "json":
        # A library's warnings.warn() would otherwise print several plain-text lines to stderr.
        logging.captureWarnings(True)
