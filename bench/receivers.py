"""Webhook receivers for the chaos benchmark: one URL per user, each with a behaviour of its
own, and a JSON-lines log of every delivery that bench/invariants.py reads.

A user's URL is `{base}/hooks/{mode}/{key}`; the mode is in the path so that the checker can
tell from `users.webhook_url` alone what the receiver does:

- `ok`: answers 200 at once;
- `flaky`: answers 500 to the first FLAKY_FAILURES deliveries of each webhook-id, then 200;
- `fail`: answers 500 to everything;
- `slowbody`: sends its 200 status line and headers at once, then a body of `trickle_bytes`
  bytes, one every `trickle_interval` seconds;
- `trickle`: sends its whole answer (a 200) one byte every `trickle_interval` seconds, so the
  status line and headers take minutes: a sender with a deadline gives up, a sender without
  one is pinned;
- `redirect`: answers 307 to `{base}/hooks/redirected/{key}`, which answers 200.

A receiver *accepted* a delivery when it sent a complete 2xx status line and headers (what
counts as delivered, docs/api.md), whatever became of the body. `ACCEPTING_MODES` accept
every delivery sooner or later (`flaky` after retries); `fail` never does, `trickle` not
within any reasonable deadline, and `redirect` only through a redirect, which a sender need
not follow.

Each request is one log line, written when it is over:

    {"webhook_id": "msg_...", "mode": "flaky", "key": "u3", "path": "/hooks/flaky/u3",
     "start": 1700000000.1, "end": 1700000000.2, "status": 500, "answered": true,
     "completed": true, "signature_ok": true, "job_id": "...", "event": "job.succeeded"}

`answered`: the status line and headers were all sent; `completed`: the whole answer was. A
sender that hangs up is noticed as it happens, so `end` is when the sender gave up.
"""
from __future__ import annotations

import json
import os
import re
import select
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MODES = ("ok", "flaky", "fail", "slowbody", "trickle", "redirect")
ACCEPTING_MODES = frozenset({"ok", "flaky", "slowbody"})
FLAKY_FAILURES = 2
REDIRECT_TARGET = "redirected"
_PATH = re.compile(r"^/hooks/([a-z]+)/([A-Za-z0-9_-]+)/?$")


def mode_of(webhook_url: Optional[str]) -> Optional[str]:
    """The receiver behaviour a chaos webhook URL names; None for any other URL."""
    if not webhook_url:
        return None
    match = re.search(r"/hooks/([a-z]+)/[A-Za-z0-9_-]+/?$", webhook_url)
    return match.group(1) if match and match.group(1) in MODES else None


class Receivers:
    """The receivers' HTTP server, in a thread of the benchmark's process."""

    def __init__(self, log_path: Path, secret: str, trickle_bytes: int = 8, trickle_interval: float = 3.0):
        self.log_path = log_path
        self.verifier = Webhook(secret)
        self.trickle_bytes = trickle_bytes
        self.trickle_interval = trickle_interval
        self._log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self._seen: Counter = Counter()  # deliveries per (key, webhook-id), for the flaky mode
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.base_url = "http://127.0.0.1:%d" % self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receivers", daemon=True)

    def url_for(self, mode: str, key: str) -> str:
        assert mode in MODES, mode
        return "%s/hooks/%s/%s" % (self.base_url, mode, key)

    def start(self) -> "Receivers":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        os.close(self._log_fd)

    def _record(self, entry: dict) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._log_fd, line)

    def _count(self, key: str, webhook_id: str) -> int:
        with self._lock:
            self._seen[key, webhook_id] += 1
            return self._seen[key, webhook_id]

    def _handler_class(self) -> type:
        receivers = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # the JSON log is the record; stderr stays quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                started = time.time()
                match = _PATH.match(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                webhook_id = self.headers.get("webhook-id", "")
                try:
                    payload = receivers.verifier.verify(body, dict(self.headers))
                    signature_ok = True
                except (WebhookVerificationError, ValueError):
                    payload, signature_ok = _json_or_empty(body), False
                mode, key = (match.group(1), match.group(2)) if match else ("unknown", "")
                self.answered, completed = False, True
                if mode in ("ok", REDIRECT_TARGET):
                    status = 200
                elif mode == "flaky":
                    status = 500 if receivers._count(key, webhook_id) <= FLAKY_FAILURES else 200
                elif mode in ("fail", "redirect"):
                    status = 500 if mode == "fail" else 307
                elif mode in ("slowbody", "trickle"):
                    status = 200
                else:
                    status = 404
                try:
                    if mode == "redirect":
                        self._answer(status, {"Location": "%s/hooks/%s/%s" % (receivers.base_url, REDIRECT_TARGET, key)})
                    elif mode == "slowbody":
                        self._slow_body()
                    elif mode == "trickle":
                        self._trickle()
                    else:
                        self._answer(status)
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    completed = False
                receivers._record({
                    "webhook_id": webhook_id, "mode": mode, "key": key, "path": self.path, "start": started,
                    "end": time.time(), "status": status, "answered": self.answered, "completed": completed,
                    "signature_ok": signature_ok,
                    "job_id": payload.get("job_id") if isinstance(payload, dict) else None,
                    "event": payload.get("event") if isinstance(payload, dict) else None,
                })

            def _answer(self, status: int, headers: Optional[dict] = None) -> None:
                body = b'{"received":true}' if status < 300 else b"{}"
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                self.answered = True
                self.wfile.write(body)
                self.wfile.flush()

            def _slow_body(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(receivers.trickle_bytes))
                self.end_headers()
                self.wfile.flush()
                self.answered = True
                self._send_slowly(b"." * receivers.trickle_bytes)

            def _trickle(self) -> None:
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"
                self._send_slowly(head)
                self.answered = True
                self._send_slowly(b"ok")

            def _send_slowly(self, data: bytes) -> None:
                for index in range(len(data)):
                    if self._sender_left_within(receivers.trickle_interval):
                        raise ConnectionResetError("the sender hung up")
                    self.wfile.write(data[index:index + 1])
                    self.wfile.flush()

            def _sender_left_within(self, seconds: float) -> bool:
                """Wait `seconds`, but notice at once a sender that closes the connection: the
                log's end is then when the sender gave up, not when a later write would fail."""
                readable, _, _ = select.select([self.connection], [], [], seconds)
                if not readable:
                    return False
                try:
                    return self.connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True

        return Handler


def _json_or_empty(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
