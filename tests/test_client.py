"""The Python client and the `renderq` command (client/), used the way their users use them:
against the real stack over HTTP (gunicorn, workers, the reference generator), and the
command run as a process. The event-stream path is proven against a small SSE server of the
test's own, a real HTTP server on 127.0.0.1 that drops a connection and replays after
Last-Event-ID."""
from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
from PIL import Image

# Installed by requirements-dev.txt (-e ./client), which bin/test installs.
from renderq_client import (
    Client,
    Conflict,
    Forbidden,
    InsufficientCredits,
    Job,
    NetworkError,
    NotFound,
    RenderqError,
    TooLarge,
    Unauthorized,
    WaitTimeout,
)
from renderq_client.cli import describe
from renderq_client.sse import SseParser

from renderq.messages import BLOCK_MESSAGES
from tests.conftest import png_bytes
from webapp.auth import new_token
from tests.support import BIN, free_port

RENDERQ = BIN / "renderq"
SAFETY_MESSAGE = BLOCK_MESSAGES["CONTENT_SAFETY_VIOLATION"]["en"]


def image_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.fixture()
def alice(make_user, web_url) -> Client:
    return Client(web_url, make_user(balance=100)[1], timeout=10)


@pytest.fixture()
def bob(make_user, web_url) -> Client:
    return Client(web_url, make_user(balance=100)[1], timeout=10)


# --- the library against the real stack --------------------------------------------------------

def test_submit_a_photo_wait_and_download_a_png_of_its_size(alice, tmp_path):
    photo = tmp_path / "holiday.png"
    photo.write_bytes(png_bytes((80, 60)))
    updates: list[Job] = []

    job = alice.submit_photo(photo, style="sepia", prompt="warm light")
    # The 202 reads the job back after publishing it, so a quick worker may already have claimed it.
    assert job.status in ("pending", "processing", "completed")
    assert job.kind == "photo.render" and job.price == 1 and job.photo_id

    finished = alice.wait(job.id, timeout=60, on_update=updates.append)
    assert finished.succeeded and finished.completed_at is not None
    assert updates[-1] == finished and all(one.raw != next_one.raw for one, next_one in zip(updates, updates[1:]))
    assert image_size(alice.result(job.id)) == (80, 60)
    assert alice.me().balance == 99  # the render was charged once it succeeded


def test_create_job_generates_an_image_without_a_photo(alice):
    job = alice.create_job("image.generate", {"style": "cartoon", "prompt": "a lighthouse at dusk"})
    assert job.kind == "image.generate" and job.photo_id is None and job.price == 2

    finished = alice.wait(job.id, timeout=60)
    assert finished.succeeded and finished.result_url == "/api/jobs/%s/result" % job.id
    assert alice.result(job.id).startswith(b"\x89PNG\r\n\x1a\n")
    assert alice.me().balance == 98


def test_create_job_on_an_uploaded_photo(alice):
    first = alice.submit_photo(png_bytes((30, 20)), style="sketch")
    again = alice.create_job("photo.render", {"style": "pixelate"}, photo_id=first.photo_id)
    assert again.id != first.id and again.photo_id == first.photo_id
    assert image_size(alice.result(alice.wait(again.id, timeout=60).id)) == (30, 20)


def test_not_enough_credits_is_insufficient_credits_and_stores_nothing(make_user, web_url):
    broke = Client(web_url, make_user(balance=1)[1])
    with pytest.raises(InsufficientCredits) as refused:
        broke.create_job("image.generate", {"prompt": "costs two"})
    error = refused.value
    assert error.status == 402 and error.code == "INSUFFICIENT_CREDITS" and error.request_id
    assert "2 credits" in error.message and "1 are available" in error.message
    assert isinstance(error, RenderqError) and list(broke.jobs()) == [] and broke.me().available == 1


def test_a_wrong_token_is_unauthorized(web_url):
    with pytest.raises(Unauthorized) as refused:
        Client(web_url, "not-a-token").me()
    assert refused.value.status == 401 and refused.value.message == "The bearer token is not valid."


def test_another_users_job_is_forbidden(alice, bob):
    job = alice.submit_photo(png_bytes(), style="sepia")
    for peek in (bob.get, bob.result, bob.cancel, bob.wait):
        with pytest.raises(Forbidden) as refused:
            peek(job.id)
        assert refused.value.status == 403 and refused.value.code == "FORBIDDEN"


def test_an_unknown_job_is_not_found_and_waiting_for_it_ends_at_once(alice):
    for job_id in (str(uuid.uuid4()), "not-a-job-id", "../me"):
        with pytest.raises(NotFound) as missing:
            alice.get(job_id)
        assert missing.value.status == 404
    started = time.monotonic()
    with pytest.raises(NotFound):
        alice.wait(str(uuid.uuid4()), timeout=30)
    assert time.monotonic() - started < 5


def test_canceling_a_finished_job_is_a_conflict(alice):
    job = alice.wait(alice.submit_photo(png_bytes(), style="sepia").id, timeout=60)
    with pytest.raises(Conflict) as refused:
        alice.cancel(job.id)
    assert refused.value.status == 409 and alice.get(job.id).succeeded


def test_cancel_a_retrying_job_then_its_result_is_a_conflict(alice):
    job = alice.submit_photo(png_bytes(), prompt="[fail:999]")
    assert alice.cancel(job.id).status == "canceled"
    assert alice.wait(job.id, timeout=10).status == "canceled"
    with pytest.raises(Conflict) as not_ready:
        alice.result(job.id)
    assert not_ready.value.code == "RESULT_NOT_READY"
    assert alice.me().available == 100  # nothing charged, nothing left on hold


def test_an_idempotency_key_replay_returns_the_same_job(alice):
    key = "order-%s" % uuid.uuid4()
    first = alice.submit_photo(png_bytes((50, 40)), style="sepia", idempotency_key=key)
    replay = alice.submit_photo(png_bytes((50, 40)), style="sepia", idempotency_key=key)
    assert replay.id == first.id and alice.me().available == 99  # held once
    with pytest.raises(RenderqError) as reused:
        alice.submit_photo(png_bytes((50, 40)), style="cartoon", idempotency_key=key)
    assert reused.value.status == 422 and reused.value.code == "IDEMPOTENCY_KEY_REUSED"
    assert type(reused.value) is RenderqError


def test_jobs_iterates_every_page_newest_first(alice):
    created = [alice.create_job("image.generate", {"prompt": "number %d" % n}).id for n in range(5)]
    newest_first = list(reversed(created))

    assert [job.id for job in alice.jobs(page_size=2)] == newest_first  # three pages: 2, 2, 1
    assert [job.id for job in alice.jobs(limit=3, page_size=2)] == newest_first[:3]
    assert [job.id for job in alice.jobs(kind="image.generate")] == newest_first
    assert list(alice.jobs(kind="photo.render")) == []
    for job_id in created:
        alice.wait(job_id, timeout=60)
    assert [job.id for job in alice.jobs(status="completed", page_size=4)] == newest_first
    assert list(alice.jobs(status="failed")) == []


def test_a_photo_past_the_upload_limit_is_too_large(alice):
    ten_megabytes = 10 * 1024 * 1024  # MAX_UPLOAD_BYTES' default, which the test stack keeps
    with pytest.raises(TooLarge) as refused:
        alice.submit_photo(b"\x89PNG" + b"0" * ten_megabytes)
    assert refused.value.status == 413 and refused.value.code == "PAYLOAD_TOO_LARGE"


def test_a_refusal_that_is_not_one_of_the_typed_ones_is_a_renderq_error(alice):
    with pytest.raises(RenderqError) as refused:
        alice.submit_photo(png_bytes(), style="vaporwave")
    assert type(refused.value) is RenderqError and refused.value.status == 400
    assert refused.value.code == "INVALID_STYLE" and "sepia" in refused.value.message


def test_wait_gives_up_at_its_timeout_and_says_where_the_job_was(alice):
    job = alice.submit_photo(png_bytes(), prompt="[slow:2500]")
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        alice.wait(job.id, timeout=1)
    assert 0.9 < time.monotonic() - started < 3
    assert timed_out.value.job is not None and timed_out.value.job.status in ("pending", "processing")
    assert alice.wait(job.id, timeout=60).succeeded  # the job went on regardless


def test_an_unreachable_server_is_a_network_error():
    with pytest.raises(NetworkError) as unreachable:
        Client("http://127.0.0.1:%d" % free_port(), "token", timeout=5).me()
    assert "Connection refused" in unreachable.value.message and unreachable.value.status is None


# --- the renderq command -----------------------------------------------------------------------

def renderq(*arguments: str, url: str, token: Optional[str], stderr: int = subprocess.PIPE,
            timeout: float = 90) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RENDERQ_")}
    env.update(RENDERQ_URL=url, PYTHONIOENCODING="utf-8")
    if token is not None:
        env["RENDERQ_TOKEN"] = token
    return subprocess.run([str(RENDERQ), *arguments], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                          timeout=timeout)


@pytest.fixture()
def photo_file(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes((72, 54)))
    return path


def test_cli_submit_wait_and_save_the_result(make_user, web_url, photo_file, tmp_path):
    token = make_user(balance=10)[1]
    output = tmp_path / "result.png"
    run = renderq("submit", str(photo_file), "--style", "sepia", "--wait", "--output", str(output),
                  url=web_url, token=token)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("Submitted photo.png: job ") and "(photo.render, 1 credit)" in run.stdout
    assert "Completed: saved %s (%d bytes)." % (output, output.stat().st_size) in run.stdout
    assert image_size(output.read_bytes()) == (72, 54)
    progress = run.stderr.splitlines()  # not a terminal: one line per change, the last one completed
    assert progress and progress[-1].endswith("  completed") and "\r" not in run.stderr

    job_id = run.stdout.split("job ")[1].split()[0]
    status = renderq("status", job_id, url=web_url, token=token)
    shown = dict(line.split(None, 1) for line in status.stdout.splitlines() if line)
    assert status.returncode == 0 and shown["status"] == "completed" and shown["outcome"] == "succeeded"
    as_json = json.loads(renderq("status", job_id, "--json", url=web_url, token=token).stdout)
    assert as_json["id"] == job_id and as_json["outcome"] == "succeeded"
    listed = renderq("jobs", "--status", "completed", url=web_url, token=token)
    assert listed.returncode == 0 and listed.stdout.startswith(job_id) and listed.stdout.rstrip().endswith("completed")

    canceled_too_late = renderq("cancel", job_id, url=web_url, token=token)
    assert canceled_too_late.returncode == 1 and "Traceback" not in canceled_too_late.stderr
    assert canceled_too_late.stderr.startswith("renderq: error: ") and "(HTTP 409, " in canceled_too_late.stderr


def test_cli_prints_the_block_message_and_exits_3(make_user, web_url, photo_file):
    run = renderq("submit", str(photo_file), "--prompt", "[block:CONTENT_SAFETY_VIOLATION]", "--wait",
                  url=web_url, token=make_user(balance=10)[1])
    assert run.returncode == 3, run.stderr
    assert run.stdout.splitlines()[-1] == "Blocked: " + SAFETY_MESSAGE
    assert run.stderr.splitlines()[-1].endswith("  blocked · " + SAFETY_MESSAGE)


def test_cli_me(make_user, web_url):
    user_id, token = make_user(balance=42)
    run = renderq("me", url=web_url, token=token)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(None, 1) for line in run.stdout.splitlines())
    assert lines["id"] == str(user_id) and lines["balance"] == "42 credits" and lines["available"] == "42 credits"
    assert json.loads(renderq("me", "--json", url=web_url, token=token).stdout)["balance"] == 42


def test_cli_failures_are_one_message_and_a_nonzero_exit(make_user, web_url, photo_file):
    unauthorized = renderq("me", url=web_url, token="wrong")
    assert unauthorized.returncode == 1
    assert unauthorized.stderr.startswith("renderq: error: The bearer token is not valid. (HTTP 401, UNAUTHORIZED)")

    broke = renderq("submit", str(photo_file), "--wait", url=web_url, token=make_user(balance=0)[1])
    assert broke.returncode == 1 and "(HTTP 402, INSUFFICIENT_CREDITS)" in broke.stderr
    assert "This costs 1 credits and 0 are available" in broke.stderr

    no_token = renderq("me", url=web_url, token=None)
    assert no_token.returncode == 2 and "set RENDERQ_TOKEN or pass --token" in no_token.stderr

    nowhere = "http://127.0.0.1:%d" % free_port()
    unreachable = renderq("status", str(uuid.uuid4()), url=nowhere, token="t")
    assert unreachable.returncode == 1 and "Could not reach %s: Connection refused." % nowhere in unreachable.stderr

    no_photo = renderq("submit", "/nonexistent/photo.jpg", url=web_url, token="t")
    assert no_photo.returncode == 1 and "No such file or directory" in no_photo.stderr

    for run in (unauthorized, broke, no_token, unreachable, no_photo):
        assert "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr


def test_cli_flags_override_the_environment(make_user, web_url):
    token = make_user(balance=7)[1]
    run = renderq("--url", web_url, "me", "--token", token, url="http://127.0.0.1:1", token="wrong")
    assert run.returncode == 0 and "7 credits" in run.stdout, run.stderr


def test_new_tokens_pass_as_a_cli_flag_value():
    # argparse takes a value that begins with "-" for another option: a token must never start with one.
    tokens = [new_token()[0] for _ in range(2000)]
    assert not [token for token in tokens if token.startswith("-")]


def test_cli_updates_the_status_line_in_place_on_a_terminal(make_user, web_url, photo_file):
    controller, terminal = pty.openpty()
    try:
        run = renderq("submit", str(photo_file), "--prompt", "[slow:1500]", "--wait", url=web_url,
                      token=make_user(balance=10)[1], stderr=terminal)
    finally:
        os.close(terminal)
    seen = b""
    try:
        while chunk := os.read(controller, 4096):
            seen += chunk
    except OSError:  # EIO: the terminal's other end is closed and everything was read
        pass
    os.close(controller)
    shown = seen.decode()
    assert run.returncode == 0
    assert shown.count("\r\x1b[K") >= 2 and "processing · attempt 1" in shown  # rewritten, not appended
    assert shown.rstrip().endswith("  completed") and shown.count("\n") == 1


def test_cli_timeout_exits_4_and_says_how_to_carry_on(make_user, web_url, photo_file):
    run = renderq("submit", str(photo_file), "--prompt", "[slow:2000]", "--wait", "--timeout", "0.5",
                  url=web_url, token=make_user(balance=10)[1])
    assert run.returncode == 4
    assert "The job carries on: renderq wait " in run.stderr.splitlines()[-1]


def test_status_lines_say_what_the_job_is_waiting_for():
    def job(**fields: object) -> Job:
        return Job.from_json({"id": str(uuid.uuid4()), "kind": "photo.render", "user_id": 1, "status": "pending",
                              "attempts": 0, **fields})

    retry_at = datetime(2030, 1, 1, 12, 0, 5, tzinfo=timezone.utc)
    local = retry_at.astimezone().strftime("%H:%M:%S")
    unavailable = {"code": "GENERATOR_UNAVAILABLE", "message": "Sorry, the generation server is unavailable"}
    assert describe(job(queue_position=3)) == "pending · 3 ahead in the queue"
    assert describe(job(status="processing", attempts=2)) == "processing · attempt 2"
    assert describe(job(status="retrying", attempts=2, next_retry_at="2030-01-01T12:00:05Z", error=unavailable)) \
        == "retrying · 2 attempts so far · next retry at %s · Sorry, the generation server is unavailable" % local
    assert describe(job(status="pending_background_retry", attempts=5, next_retry_at="2030-01-01T12:00:05Z")) \
        == "pending background retry · 5 attempts so far · next retry at %s" % local
    assert describe(job(status="failed", attempts=1, error={"code": "INVALID_INPUT", "message": "Check it."})) \
        == "failed · after 1 attempt · Check it."


# --- the event stream, against a server of the test's own --------------------------------------

JOB_ID = "7d5e0f6a-0000-4000-8000-000000000001"
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)  # in the past: a next retry that is already due


def job_state(status: str, step: int, **fields: object) -> dict:
    """The job resource as the API shows it, `step` seconds into the job's life."""
    return {"id": JOB_ID, "photo_id": None, "user_id": 1, "kind": "image.generate", "status": status,
            "outcome": None, "block_reason": None, "attempts": 0, "retry_count": 0, "next_retry_at": None,
            "error": None, "message": None, "result_url": None, "price": 2, "queue_position": None,
            "created_at": T0.isoformat(), "started_at": None, "completed_at": None,
            "updated_at": (T0 + timedelta(seconds=step)).isoformat().replace("+00:00", "Z"), **fields}


LIFE = [job_state("pending", 1, queue_position=0), job_state("processing", 2, attempts=1),
        job_state("retrying", 3, attempts=1, next_retry_at="2024-01-01T00:00:04Z"),
        job_state("processing", 4, attempts=2),
        job_state("completed", 5, attempts=2, outcome="succeeded", result_url="/api/jobs/%s/result" % JOB_ID)]


class EventStream:
    """One response of the events endpoint, written by hand: chunked, so each write reaches the
    client when it is made, and able to break off the way a dying server or proxy does."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.handler = handler
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

    def write(self, text: str) -> None:
        data = text.encode()
        self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.handler.wfile.flush()

    def status(self, event_id: int) -> None:
        self.write("event: status\nid: %d\ndata: %s\n\n" % (event_id, json.dumps(LIFE[event_id - 1])))

    def end(self) -> None:
        self.handler.wfile.write(b"0\r\n\r\n")
        self.handler.wfile.flush()

    def drop(self) -> None:
        """The connection dies mid-stream: no terminating chunk, the socket just closes."""
        self.handler.close_connection = True
        self.handler.connection.shutdown(2)


class SseServer:
    """GET /api/jobs/{id}/events answered by the next function of `connections` (or 404 when
    there is none), GET /api/jobs/{id} by `current()`. It records each events request's
    Last-Event-ID, and each GET."""

    def __init__(self, connections: list[Callable[[BaseHTTPRequestHandler], None]], current: Callable[[], dict]):
        self.connections = connections
        self.current = current
        self.last_event_ids: list[Optional[str]] = []
        self.job_reads = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/api/jobs/%s/events" % JOB_ID:
                    server.last_event_ids.append(self.headers.get("Last-Event-ID"))
                    index = len(server.last_event_ids) - 1
                    if index < len(server.connections):
                        try:
                            server.connections[index](self)
                        except OSError:
                            pass  # the client hung up: what a client that gave up does
                        return
                    return self.json(404, {"error": {"code": "NOT_FOUND", "message": "No such route.",
                                                     "request_id": "r"}})
                if self.path == "/api/jobs/%s" % JOB_ID:
                    server.job_reads += 1
                    return self.json(200, server.current())
                self.json(404, {"error": {"code": "NOT_FOUND", "message": "Not here.", "request_id": "r"}})

            def json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture()
def sse_servers() -> Iterator[Callable[..., SseServer]]:
    started: list[SseServer] = []

    def start(connections: list[Callable[[BaseHTTPRequestHandler], None]], current: Callable[[], dict]) -> SseServer:
        started.append(SseServer(connections, current))
        return started[-1]

    yield start
    for server in started:
        server.close()


def test_wait_follows_the_event_stream_through_a_dropped_connection(sse_servers):
    client_saw_processing = threading.Event()
    dropped_after_the_client_saw_it: list[bool] = []

    def first_connection(handler: BaseHTTPRequestHandler) -> None:
        stream = EventStream(handler)
        stream.write(": ping\n\nretry: 100\n\n")
        stream.status(1)
        stream.status(2)
        # Heartbeats until the client has reported 'processing': a client that buffered the
        # stream instead of reading it as it comes would never get there.
        deadline = time.monotonic() + 10
        while not client_saw_processing.is_set() and time.monotonic() < deadline:
            stream.write(": ping\n\n")
            time.sleep(0.05)
        dropped_after_the_client_saw_it.append(client_saw_processing.is_set())
        stream.drop()

    def after_reconnecting(handler: BaseHTTPRequestHandler) -> None:
        stream = EventStream(handler)
        for event_id in (3, 4, 5):  # what was missed, replayed after Last-Event-ID: 2, then the end
            stream.status(event_id)
        stream.end()

    server = sse_servers([first_connection, after_reconnecting], current=lambda: LIFE[0])
    updates: list[str] = []

    def on_update(job: Job) -> None:
        updates.append(job.status)
        if job.status == "processing":
            client_saw_processing.set()

    finished = Client(server.url, "token", poll_interval=30).wait(JOB_ID, timeout=20, on_update=on_update)

    assert finished.succeeded and finished.attempts == 2
    assert updates == ["pending", "processing", "retrying", "processing", "completed"]
    assert server.last_event_ids == [None, "2"] and dropped_after_the_client_saw_it == [True]
    assert server.job_reads == 1  # the state when the stream opened; everything else came as events


def test_wait_polls_when_the_server_has_no_event_stream(sse_servers):
    reads = iter(LIFE)
    state = {"now": LIFE[0]}

    def current() -> dict:
        state["now"] = next(reads, state["now"])
        return state["now"]

    server = sse_servers([], current=current)  # every events request is a 404
    updates: list[Job] = []
    finished = Client(server.url, "token", poll_interval=0.05).wait(JOB_ID, timeout=10, on_update=updates.append)
    assert finished.succeeded and [job.status for job in updates] == [life_state["status"] for life_state in LIFE]
    assert server.last_event_ids == [None]  # asked once, then polled


def test_wait_polls_when_the_events_answer_is_not_an_event_stream(sse_servers):
    def json_instead(handler: BaseHTTPRequestHandler) -> None:
        body = json.dumps(LIFE[-1]).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    server = sse_servers([json_instead], current=lambda: LIFE[-1])
    assert Client(server.url, "token", poll_interval=0.05).wait(JOB_ID, timeout=10).succeeded
    assert server.job_reads == 1


def test_heartbeats_do_not_keep_wait_past_its_timeout(sse_servers):
    def heartbeats_only(handler: BaseHTTPRequestHandler) -> None:
        stream = EventStream(handler)
        while True:
            stream.write(": ping\n\n")
            time.sleep(0.05)

    server = sse_servers([heartbeats_only], current=lambda: LIFE[1])
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as timed_out:
        Client(server.url, "token").wait(JOB_ID, timeout=1)
    assert 0.9 < time.monotonic() - started < 2.5 and timed_out.value.job.status == "processing"


def test_the_parser_reads_events_however_the_bytes_are_split():
    stream = ("\ufeff: ping\r\n\r\nretry: 250\nevent: status\nid: 7\ndata: {\"a\":\ndata:  1}\r\r"
              "id: 8\n\nevent: other\ndata: 🚫 blocked\n\ndata: no blank line yet").encode()
    for size in (1, 2, 3, 5, len(stream)):  # every split, including a CRLF and an emoji cut in two
        parser = SseParser()
        events = [event for start in range(0, len(stream), size) for event in parser.feed(stream[start:start + size])]
        assert [(event.event, event.data, event.id) for event in events] == [
            ("status", "{\"a\":\n 1}", "7"), ("other", "🚫 blocked", "8")]
        assert parser.last_event_id == "8" and parser.retry_ms == 250 and parser.comments == 1



def test_polling_rests_while_the_job_waits_for_its_next_retry(sse_servers):
    retry_at = datetime.now(timezone.utc) + timedelta(seconds=2)
    waiting = job_state("retrying", 3, attempts=1, next_retry_at=retry_at.isoformat().replace("+00:00", "Z"))

    server = sse_servers([], current=lambda: waiting if datetime.now(timezone.utc) < retry_at else LIFE[-1])
    finished = Client(server.url, "token", poll_interval=0.05).wait(JOB_ID, timeout=10)
    assert finished.succeeded and datetime.now(timezone.utc) >= retry_at
    assert server.job_reads <= 3  # not one read every 50 ms for two seconds
