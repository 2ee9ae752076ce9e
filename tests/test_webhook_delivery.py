"""Webhook delivery against slow and hostile receivers: real HTTP receivers in this process,
the real worker stack, and the real network path (no resolver or socket is faked).

Each receiver records every request it gets (any method) with when it began and ended, and
how many requests of one webhook-id it was serving at once.
"""
from __future__ import annotations

import ipaddress
import itertools
import re
import select
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator, Optional

import pytest
from sqlalchemy import select as sql_select
from standardwebhooks.webhooks import Webhook

from renderq.db import db
from renderq.models import Notification
from renderq.webhook_http import DEADLINE_SECONDS, Deadline, DeliveryFailed, post
from tests.conftest import FAST_TIMINGS, WEBHOOK_SECRET, upload, wait_terminal
from tests.support import Process, free_port, wait_for, worker_command

ATTEMPTS = 1 + len(FAST_TIMINGS["WEBHOOK_RETRY_DELAYS"].split(","))  # what the stack makes of the test ladder
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@dataclass
class Request:
    method: str
    headers: dict
    body: bytes
    started: float
    ended: Optional[float] = None


Respond = Callable[[BaseHTTPRequestHandler, "Receiver"], None]


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # renderq refusing a certificate mid-handshake is what some tests are about


class Receiver:
    """A real HTTP endpoint whose answer is `respond`; it stops answering (and drops every
    connection it still holds) on close()."""

    def __init__(self, respond: Respond, host: str = "127.0.0.1", certificate=None):
        self.requests: list[Request] = []
        self.server_names: list[str] = []  # TLS SNI, when `certificate` (a trustme LeafCert) makes it HTTPS
        self.bytes_sent = 0
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._serving: Counter[str] = Counter()
        self.most_at_once = 0  # the most requests of one webhook-id served at the same time
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def handle_any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                request = receiver._begin(self.command, {k.lower(): v for k, v in self.headers.items()}, body)
                try:
                    respond(self, receiver)
                except OSError:
                    pass  # renderq hung up on us
                finally:
                    receiver._end(request)

            do_POST = do_GET = do_PUT = handle_any  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = QuietServer((host, free_port()), Handler)
        if certificate is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            certificate.configure_cert(context)
            context.sni_callback = lambda _socket, name, _context: self.server_names.append(name)
            # The handshake then happens in the request's thread, not in the accepting one.
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.server.server_port
        self.url = "%s://%s:%d/hooks/renderq" % ("https" if certificate else "http", host, self.port)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _begin(self, method: str, headers: dict, body: bytes) -> Request:
        request = Request(method, headers, body, time.monotonic())
        with self._lock:
            self.requests.append(request)
            self._serving[headers.get("webhook-id", "")] += 1
            self.most_at_once = max(self.most_at_once, self._serving[headers.get("webhook-id", "")])
        return request

    def _end(self, request: Request) -> None:
        with self._lock:
            request.ended = time.monotonic()
            self._serving[request.headers.get("webhook-id", "")] -= 1

    def serving(self) -> int:
        with self._lock:
            return sum(self._serving.values())

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


def answer(status: int, *headers: tuple[str, str]) -> Respond:
    def respond(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return respond


def _hung_up(connection: socket.socket, wait: float) -> bool:
    """Whether the client closed the connection, waiting up to `wait` seconds to find out."""
    readable, _, _ = select.select([connection], [], [], wait)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def trickle(interval: float) -> Respond:
    """A byte every `interval` seconds, for ever: a status line, then header after header."""
    def respond(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
        for byte in itertools.chain(b"HTTP/1.1 200 OK\r\n", itertools.cycle(b"X-Trickle: x\r\n")):
            if _hung_up(handler.connection, interval) or receiver.closing.is_set():
                return
            handler.connection.sendall(bytes([byte]))

    return respond


def endless_body(status: int) -> Respond:
    """A status and headers at once, then a body announced as 1 TiB, sent as fast as it is taken."""
    def respond(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(1 << 40))
        handler.end_headers()
        handler.wfile.flush()
        chunk = b"x" * 65536
        while not receiver.closing.is_set():
            handler.connection.sendall(chunk)
            receiver.bytes_sent += len(chunk)

    return respond


def held_until(released: threading.Event, then: Respond) -> Respond:
    def respond(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
        released.wait(DEADLINE_SECONDS - 2)
        then(handler, receiver)

    return respond


@pytest.fixture()
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(respond: Respond, host: str = "127.0.0.1", certificate=None) -> Receiver:
        made.append(Receiver(respond, host, certificate))
        return made[-1]

    yield make
    for each in made:
        each.close()


def auth(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def set_webhook(client, token: str, url: Optional[str]):
    return client.patch("/api/me", json={"webhook_url": url}, headers=auth(token))


def notification(client, token: str, job_id: str) -> dict:
    items = client.get("/api/me/notifications", headers=auth(token)).get_json()["items"]
    [item] = [item for item in items if item["job_id"] == job_id]
    return item


def delivery_ends(client, token: str, job_id: str, state: str, timeout: float = 20) -> dict:
    return wait_for(lambda: (lambda item: item if item["delivery"]["state"] == state else None)(
        notification(client, token, job_id)), timeout=timeout, what="the delivery of %s to be %s" % (job_id, state))


def next_delivery_at(app, job_id: str):
    with app.app_context():
        value = db.session.execute(sql_select(Notification.next_delivery_at).where(
            Notification.job_id == uuid.UUID(job_id))).scalar_one()
        db.session.rollback()
        return value


def finished_job(client, token: str, **upload_options: str) -> str:
    job_id = upload(client, token, **upload_options).get_json()["id"]
    assert wait_terminal(client, token, job_id)["status"] == "completed"
    return job_id


@contextmanager
def webhooks_consumer(stack, **environment: str) -> Iterator[None]:
    """The stack's webhooks consumer replaced by one run with `environment` changed; the
    original's like is back afterwards."""
    [original] = [process for process in stack.side if process.name == "webhooks"]
    original.stop()
    replacement = Process("webhooks-changed", worker_command(4, "webhooks", "threads"),
                          {**original.env, **environment}, stack.log_dir).start()
    try:
        yield
    finally:
        replacement.stop()
        stack.side[stack.side.index(original)] = Process("webhooks", original.command, original.env,
                                                         stack.log_dir).start()


def test_private_and_unlisted_loopback_urls_are_refused_when_set(client, make_user):
    _, token = make_user()
    for private in ("http://10.1.2.3/hooks", "http://192.168.0.10:8080/hooks", "http://[fd12::1]/hooks"):
        refused = set_webhook(client, token, private)
        assert refused.status_code == 400 and refused.get_json()["error"]["code"] == "INVALID_WEBHOOK_URL"
        assert "a private address" in refused.get_json()["error"]["message"]
    # The tests allow-list 127.0.0.0/8 only: ::1 is loopback the allow-list does not name.
    refused = set_webhook(client, token, "http://[::1]:%d/hooks/renderq" % free_port())
    assert refused.status_code == 400 and "a loopback address" in refused.get_json()["error"]["message"]
    assert client.get("/api/me", headers=auth(token)).get_json()["webhook_url"] is None


def test_a_name_resolving_to_loopback_is_refused_at_connect_unless_allow_listed(client, make_user, stack, receiver):
    hook = receiver(answer(204))
    _, token = make_user()
    # Accepted when set (under the allow-list); then a consumer without the allow-list finds
    # the name resolving to loopback when it connects, and refuses it for good.
    assert set_webhook(client, token, "http://localhost:%d/hooks/renderq" % hook.port).status_code == 200
    with webhooks_consumer(stack, WEBHOOK_ALLOWED_NETWORKS=""):
        refused_job = finished_job(client, token)
        wait_for(lambda: hook.requests or notification(client, token, refused_job).get("delivery", {}).get("state")
                 == "failed", timeout=30, what="the delivery to end")
    assert hook.requests == []
    item = notification(client, token, refused_job)
    assert item["delivery"]["state"] == "failed" and item["delivery"]["attempts"] == 1 and item["delivered_at"] is None
    assert re.fullmatch(r"webhook_url's host localhost resolves to (127\.0\.0\.1|::1), a loopback address, "
                        r"which renderq does not deliver to", item["delivery"]["last_error"])
    # With the allow-list, the same receiver gets the next job's webhook, addressed to the name.
    delivered_job = finished_job(client, token)
    delivery_ends(client, token, delivered_job, "delivered", timeout=30)
    [request] = hook.requests
    assert request.headers["host"] == "localhost:%d" % hook.port
    assert Webhook(WEBHOOK_SECRET).verify(request.body, request.headers)["job_id"] == delivered_job
    assert notification(client, token, refused_job)["delivery"]["state"] == "failed"  # final


def test_a_trickling_receiver_is_cut_off_at_the_deadline_and_never_served_twice_at_once(
        app, client, make_user, stack, receiver):
    hook = receiver(trickle(interval=2))
    _, token = make_user()
    assert set_webhook(client, token, hook.url).status_code == 200
    job_id = finished_job(client, token)
    wait_for(lambda: hook.serving() == 1, timeout=15, what="the first delivery attempt")
    with app.app_context():  # the delivery's message again, twice, as a broker redelivering it would
        for _ in range(2):
            app.extensions["celery"].send_task("renderq.notifications.deliver",
                                               args=[notification(client, token, job_id)["id"]])
    # Meanwhile another user's job runs on the attempt workers, not behind the webhook.
    _, other_token = make_user()
    started = time.monotonic()
    assert finished_job(client, other_token)
    assert time.monotonic() - started < DEADLINE_SECONDS / 2
    assert hook.serving() == 1 and notification(client, token, job_id)["delivered_at"] is None
    wait_for(lambda: len(hook.requests) >= 2, timeout=25, interval=0.1, what="a second delivery attempt")
    first, second = hook.requests[:2]
    assert hook.most_at_once == 1, "one webhook-id was POSTed twice at once"
    assert first.ended is not None and first.ended <= second.started
    assert DEADLINE_SECONDS - 1.5 <= first.ended - first.started <= DEADLINE_SECONDS + 1
    assert {request.headers["webhook-id"] for request in hook.requests} == {notification(client, token, job_id)["webhook_id"]}
    delivery = notification(client, token, job_id)["delivery"]
    assert delivery["state"] == "pending" and delivery["attempts"] == 2  # the redelivered messages stepped aside
    assert delivery["last_error"] == "no complete answer within %g s" % DEADLINE_SECONDS


def test_a_redirect_is_a_failed_attempt_and_never_followed(client, make_user, stack, receiver):
    elsewhere = receiver(answer(200))
    hook = receiver(answer(302, ("Location", elsewhere.url)))
    _, token = make_user()
    assert set_webhook(client, token, hook.url).status_code == 200
    job_id = finished_job(client, token)
    wait_for(lambda: elsewhere.requests or len(hook.requests) == ATTEMPTS, what="every attempt")
    assert elsewhere.requests == []
    delivery = delivery_ends(client, token, job_id, "failed")["delivery"]
    assert [request.method for request in hook.requests] == ["POST"] * ATTEMPTS
    assert delivery["attempts"] == ATTEMPTS and "HTTP 302: redirects are not followed" in delivery["last_error"]


def test_a_huge_answer_is_not_read(client, make_user, stack, receiver):
    hook = receiver(endless_body(200))
    _, token = make_user()
    assert set_webhook(client, token, hook.url).status_code == 200
    job_id = finished_job(client, token)
    wait_for(lambda: notification(client, token, job_id)["delivered_at"], timeout=DEADLINE_SECONDS / 2,
             what="the delivery, answered with a status and headers")
    assert notification(client, token, job_id)["delivery"] == {"state": "delivered", "attempts": 1, "last_error": None}
    wait_for(lambda: hook.serving() == 0, timeout=5, what="renderq to hang up on the endless answer")
    assert hook.bytes_sent < 64 * 1024 * 1024  # what the kernel's buffers took, not what was announced


def test_giving_up_after_the_last_attempt_is_final_and_visible(app, client, make_user, stack, receiver):
    hook = receiver(answer(500))
    _, token = make_user()
    assert set_webhook(client, token, hook.url).status_code == 200
    job_id = finished_job(client, token)
    wait_for(lambda: len(hook.requests) == ATTEMPTS, what="every attempt")
    wait_for(lambda: next_delivery_at(app, job_id) is None, timeout=5, what="no attempt left for the reconciler")
    item = notification(client, token, job_id)
    assert item["delivery"] == {"state": "failed", "attempts": ATTEMPTS,
                                "last_error": "HTTP 500 (gave up after %d attempts)" % ATTEMPTS}
    assert item["delivered_at"] is None
    assert len({request.headers["webhook-id"] for request in hook.requests}) == 1
    time.sleep(4 * float(FAST_TIMINGS["QUEUE_CHECK_INTERVAL"]))  # reconciler runs: nothing more is sent
    assert len(hook.requests) == ATTEMPTS
    assert notification(client, token, job_id)["delivery"]["state"] == "failed"


def test_removing_the_webhook_url_ends_pending_deliveries(app, client, make_user, stack, receiver):
    released = threading.Event()
    hook = receiver(held_until(released, answer(500)))
    _, token = make_user()
    assert set_webhook(client, token, hook.url).status_code == 200
    job_id = finished_job(client, token)
    wait_for(lambda: hook.serving() == 1, timeout=15, what="the first delivery attempt")
    assert set_webhook(client, token, None).status_code == 200  # while that attempt is in flight
    released.set()  # it fails, which must not bring the delivery back
    wait_for(lambda: hook.serving() == 0, timeout=5, what="the attempt to end")
    time.sleep(4 * float(FAST_TIMINGS["QUEUE_CHECK_INTERVAL"]))  # reconciler runs: nothing more is sent
    assert next_delivery_at(app, job_id) is None and len(hook.requests) == 1
    item = notification(client, token, job_id)
    assert item["delivery"]["state"] == "failed"
    assert item["delivery"]["last_error"] == "not delivered: the webhook_url was removed"


# HTTPS, by renderq.webhook_http.post called in this process: a throwaway CA that the delivery
# trusts through SSL_CERT_FILE (which the ssl module's default context reads), real sockets.

@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    import trustme

    ca = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, path


@pytest.fixture()
def trusting(test_ca, monkeypatch):
    ca, path = test_ca
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    return ca


def test_https_goes_to_the_checked_address_as_the_name(trusting, receiver):
    hook = receiver(answer(204), certificate=trusting.issue_cert("localhost"))
    assert post("https://localhost:%d/hooks?a=1" % hook.port, b"{}", {}, LOOPBACK, Deadline(5)) == 204
    assert hook.server_names == ["localhost"]  # SNI carries the name, though the connection went to 127.0.0.1
    assert hook.requests[0].headers["host"] == "localhost:%d" % hook.port


def test_https_with_a_certificate_for_another_name_is_refused(trusting, receiver):
    hook = receiver(answer(204), certificate=trusting.issue_cert("elsewhere.example"))
    with pytest.raises(DeliveryFailed, match="TLS certificate not accepted"):
        post("https://localhost:%d/hooks" % hook.port, b"{}", {}, LOOPBACK, Deadline(5))
    assert hook.requests == []


def test_a_tls_handshake_that_never_ends_is_cut_off_at_the_deadline(trusting):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever answers
        started = time.monotonic()
        with pytest.raises(DeliveryFailed, match="no complete answer within 2 s"):
            post("https://localhost:%d/hooks" % silent.getsockname()[1], b"{}", {}, LOOPBACK, Deadline(2))
        assert 1.5 < time.monotonic() - started < 3
