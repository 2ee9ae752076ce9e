"""gunicorn's settings for the `web` and `generator` processes.

gunicorn reads ./gunicorn.conf.py from the directory it starts in (the repository's root for the
Procfile, bin/run and tests; /app in the Docker image); options on its command line still win.
With LOG_FORMAT=json every line the process writes is a JSON object from renderq's formatter:
gunicorn's own log, an access log (one line a request, on stdout) and the app's lines. With
text logs (the default) nothing here changes gunicorn.
"""
from __future__ import annotations

import os
from datetime import timedelta

from gunicorn.glogging import Logger

from renderq.logs import ContextFilter, JsonFormatter, configure_logging


class JsonLogger(Logger):
    """gunicorn's logger with renderq's JSON formatter on its handlers, and access lines as
    objects with the request's method, path, status, duration and request id."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers + self.access_log.handlers:
            handler.setFormatter(JsonFormatter())
            handler.addFilter(ContextFilter())

    def access(self, resp, req, environ: dict, request_time: timedelta) -> None:
        if not self.cfg.accesslog:
            return
        status = int(str(resp.status).split(None, 1)[0])
        duration_ms = round(request_time.total_seconds() * 1000, 1)
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
        # renderq's API answers every request with X-Request-Id (the caller's, or one it made up).
        request_id = dict((name.lower(), value) for name, value in resp.headers).get("x-request-id")
        fields = {"method": method, "path": path, "query": environ.get("QUERY_STRING") or None, "status": status,
                  "duration_ms": duration_ms, "bytes": getattr(resp, "sent", None),
                  "remote_addr": environ.get("REMOTE_ADDR"), "user_agent": environ.get("HTTP_USER_AGENT")}
        self.access_log.info("%s %s %d %.1f ms", method, path, status, duration_ms,
                             extra={"fields": fields, "request_id": request_id or "-", "job_id": "-"})


if os.environ.get("LOG_FORMAT") == "json":
    logger_class = JsonLogger
    accesslog = "-"
    # The app's own lines (and the reference generator's) go through the root logger: set up
    # here, before the workers start, so that they are JSON from the first one.
    configure_logging("json")
