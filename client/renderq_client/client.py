"""`Client`: submit work to a renderq server, follow it to the end, fetch the result."""
from __future__ import annotations

import http.client
import json
import os
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union
from urllib.parse import quote

import requests
import urllib3

from renderq_client import __version__
from renderq_client.errors import NetworkError, RenderqError, WaitTimeout, error_from_response
from renderq_client.models import Account, Job
from renderq_client.sse import SseParser, response_chunks

PhotoInput = Union[str, "os.PathLike[str]", bytes, IO[bytes]]
Timeout = Union[float, Tuple[float, float]]

# Answers worth waiting out while following a job: a restart behind a proxy, PostgreSQL away (503).
TRANSIENT_STATUSES = frozenset({502, 503, 504})
# A job in these statuses sleeps until next_retry_at; polling it meanwhile is slowed, up to MAX_QUIET_SECONDS.
WAITING_TO_RETRY = frozenset({"retrying", "pending_background_retry"})
MAX_QUIET_SECONDS = 30.0
# What a broken stream looks like, depending on where it broke (requests, urllib3 or the socket).
STREAM_BROKEN = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class _EventsUnavailable(Exception):
    """The server does not stream this job's events (no endpoint, or it stopped answering): poll."""


class _DeadlinePassed(Exception):
    pass


class Client:
    """A renderq API client for one account.

    `timeout` bounds each HTTP request (seconds, or a (connect, read) pair). `poll_interval` is
    how often `wait` asks for the job when the server cannot stream its events.
    `outage_tolerance` is how long `wait` keeps going through a server that cannot be reached or
    answers 502/503/504 before it gives up with that error.
    """

    def __init__(self, url: str, token: str, timeout: Timeout = 30.0, *, poll_interval: float = 1.0,
                 outage_tolerance: float = 60.0, stream_idle_timeout: float = 60.0,
                 use_events: bool = True, session: Optional[requests.Session] = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.outage_tolerance = outage_tolerance
        # With no byte (not even a heartbeat) for this long, a stream is taken for dead and reopened.
        self.stream_idle_timeout = stream_idle_timeout
        self.use_events = use_events
        self.session = session or requests.Session()
        self._user_id: Optional[int] = None

    # --- submitting --------------------------------------------------------------------------

    def submit_photo(self, photo: PhotoInput, *, style: Optional[str] = None, prompt: Optional[str] = None,
                     kind: Optional[str] = None, idempotency_key: Optional[str] = None) -> Job:
        """Upload a photo (a path, its bytes or an open binary file) and start a job on it:
        `photo.render` unless `kind` says otherwise. The server's defaults apply to what is
        left out (style `sketch`, an empty prompt). The same `idempotency_key` with the same
        request returns the job the first call made, so a submission can be retried safely."""
        filename, content = _photo_upload(photo)
        fields = {name: value for name, value in (("style", style), ("prompt", prompt), ("kind", kind))
                  if value is not None}
        response = self._request("POST", "/api/photos", data=fields,
                                 files={"file": (filename, content, "application/octet-stream")},
                                 headers=_idempotency(idempotency_key))
        return Job.from_json(response.json())

    def create_job(self, kind: str, params: Optional[Mapping[str, str]] = None, photo_id: Optional[str] = None,
                   idempotency_key: Optional[str] = None) -> Job:
        """Start a job from JSON: `image.generate` needs only `params` (style, prompt); a photo
        kind takes the `photo_id` of an earlier upload."""
        body: Dict[str, Any] = {"kind": kind, "params": dict(params or {})}
        if photo_id is not None:
            body["photo_id"] = photo_id
        response = self._request("POST", "/api/jobs", json=body, headers=_idempotency(idempotency_key))
        return Job.from_json(response.json())

    # --- reading and controlling jobs ----------------------------------------------------------

    def get(self, job_id: str) -> Job:
        return Job.from_json(self._request("GET", "/api/jobs/%s" % _segment(job_id)).json())

    def result(self, job_id: str) -> bytes:
        """The rendered PNG. Conflict until the job has succeeded (and for good if it did not)."""
        return self._request("GET", "/api/jobs/%s/result" % _segment(job_id), accept="image/png").content

    def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished; nothing is charged. Conflict if it has finished."""
        return Job.from_json(self._request("POST", "/api/jobs/%s/cancel" % _segment(job_id)).json())

    def me(self) -> Account:
        account = Account.from_json(self._request("GET", "/api/me").json())
        self._user_id = account.id
        return account

    def jobs(self, status: Optional[str] = None, kind: Optional[str] = None, limit: Optional[int] = None,
             page_size: Optional[int] = None) -> Iterator[Job]:
        """The account's jobs, newest first, fetched a page at a time as the iteration goes.
        `limit` caps how many jobs are yielded in all; `page_size` (1 to 100) is how many one
        request asks for (the API's own `limit` parameter)."""
        if limit is not None and limit <= 0:
            return
        user_id = self._user_id if self._user_id is not None else self.me().id
        per_page = page_size or min(limit or 100, 100)
        params: Dict[str, Any] = {"limit": per_page}
        if status:
            params["status"] = status
        if kind:
            params["kind"] = kind
        yielded = 0
        while True:
            page = self._request("GET", "/api/users/%d/jobs" % user_id, params=params).json()
            for item in page["items"]:
                yield Job.from_json(item)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    # --- following a job ----------------------------------------------------------------------

    def wait(self, job_id: str, timeout: Optional[float] = None,
             on_update: Optional[Callable[[Job], None]] = None) -> Job:
        """Block until the job is completed, failed or canceled, and return it. `on_update` is
        called with the job each time it changes (first with its state now). After `timeout`
        seconds, WaitTimeout (whose `job` is the last state seen); the job itself goes on."""
        job: Optional[Job] = None
        for job in self.watch(job_id, timeout=timeout):
            if on_update is not None:
                on_update(job)
        assert job is not None  # watch yields the state at least once before it can end
        return job

    def watch(self, job_id: str, timeout: Optional[float] = None) -> Iterator[Job]:
        """The job's states as they change, ending with its terminal state: over the server's
        event stream (GET /api/jobs/{id}/events) where it has one, reconnecting with
        Last-Event-ID if the connection drops, otherwise by polling GET /api/jobs/{id}."""
        deadline = None if timeout is None else time.monotonic() + timeout
        changes = _Changes()
        waited = "%gs" % timeout if timeout is not None else "the wait"
        try:
            if self.use_events:
                try:
                    for job in self._watch_events(job_id, deadline):
                        if changes.is_new(job):
                            yield job
                        if job.is_terminal:
                            return
                except _EventsUnavailable:
                    pass
            for job in self._watch_polling(job_id, deadline):
                if changes.is_new(job):
                    yield job
                if job.is_terminal:
                    return
        except _DeadlinePassed:
            last = changes.last
            raise WaitTimeout("Job %s is still %s after %s." % (job_id, last.status if last else "unknown", waited),
                              last) from None

    def _watch_events(self, job_id: str, deadline: Optional[float]) -> Iterator[Job]:
        last_event_id: Optional[str] = None
        reconnect_delay = 1.0
        quiet_connections = 0  # in a row that ended without an event: the server is not streaming
        first = True
        while True:
            response = self._open_events(job_id, last_event_id, deadline)
            events_here = 0
            with closing(response):
                if first:
                    first = False
                    # Events tell of changes; this is the state the job was in when we started
                    # listening, so a change just before the stream opened is not missed.
                    try:
                        current = self.get(job_id)
                    except RenderqError as error:
                        if _transient(error):
                            raise _EventsUnavailable() from None  # polling rides out the outage
                        raise
                    yield current
                parser = SseParser()
                try:
                    for chunk in response_chunks(response):
                        for event in parser.feed(chunk):
                            job = _job_of(event.event, event.data)
                            if job is not None:
                                events_here += 1
                                yield job
                                if job.is_terminal:
                                    return
                        _check(deadline)
                except STREAM_BROKEN:
                    pass  # dropped mid-stream: reconnect below, asking for what was missed
                last_event_id = parser.last_event_id or last_event_id
                if parser.retry_ms is not None:
                    reconnect_delay = parser.retry_ms / 1000
            quiet_connections = 0 if events_here else quiet_connections + 1
            if quiet_connections >= 3:
                raise _EventsUnavailable()
            _sleep(reconnect_delay, deadline)

    def _open_events(self, job_id: str, last_event_id: Optional[str], deadline: Optional[float]) -> requests.Response:
        _check(deadline)
        headers = {**self._headers("text/event-stream"), "Cache-Control": "no-cache",
                   "Accept-Encoding": "identity"}  # compressing holds events back until a block fills
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        read_timeout = self.stream_idle_timeout
        if deadline is not None:
            read_timeout = max(0.1, min(read_timeout, deadline - time.monotonic()))
        try:
            response = self.session.get(self.url + "/api/jobs/%s/events" % _segment(job_id), headers=headers,
                                        stream=True, timeout=(self._connect_timeout(), read_timeout))
        except requests.RequestException:
            raise _EventsUnavailable() from None
        content_type = response.headers.get("Content-Type", "").lower()
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            # 404/405 where the server has no event stream; any other refusal (401, 404 for an
            # unknown job) comes back from polling as the right typed error.
            response.close()
            raise _EventsUnavailable()
        return response

    def _watch_polling(self, job_id: str, deadline: Optional[float]) -> Iterator[Job]:
        outage_since: Optional[float] = None
        while True:
            _check(deadline)
            try:
                job = self.get(job_id)
            except RenderqError as error:
                if not _transient(error):
                    raise
                outage_since = outage_since or time.monotonic()
                if time.monotonic() - outage_since > self.outage_tolerance:
                    raise
                _sleep(max(self.poll_interval, min(error.retry_after or 0, MAX_QUIET_SECONDS)), deadline)
                continue
            outage_since = None
            yield job
            _sleep(max(self.poll_interval, _quiet_until_retry(job)), deadline)

    # --- HTTP --------------------------------------------------------------------------------

    def _headers(self, accept: str = "application/json") -> Dict[str, str]:
        return {"Authorization": "Bearer " + self.token, "Accept": accept,
                "User-Agent": "renderq-client/%s" % __version__}

    def _connect_timeout(self) -> float:
        return self.timeout[0] if isinstance(self.timeout, tuple) else self.timeout

    def _request(self, method: str, path: str, accept: str = "application/json",
                 headers: Optional[Mapping[str, str]] = None, **kwargs: Any) -> requests.Response:
        all_headers = {**self._headers(accept), **(headers or {})}
        try:
            response = self.session.request(method, self.url + path, headers=all_headers, timeout=self.timeout,
                                            **kwargs)
        except requests.Timeout as error:
            raise NetworkError("No answer from %s within %ss." % (self.url, self.timeout),
                               code="TIMEOUT") from error
        except requests.RequestException as error:
            raise NetworkError("Could not reach %s: %s." % (self.url, _reason(error)),
                               code="CONNECTION_FAILED") from error
        if response.status_code >= 400:
            raise error_from_response(response)
        return response

    def __repr__(self) -> str:
        return "Client(%r)" % self.url


class _Changes:
    """Which states are worth reporting: not one already reported, and not one older than the
    last reported (a replayed event can arrive after a fresher GET)."""

    def __init__(self) -> None:
        self.last: Optional[Job] = None

    def is_new(self, job: Job) -> bool:
        last = self.last
        if last is not None:
            if job.raw == last.raw:
                return False
            if job.updated_at and last.updated_at and job.updated_at < last.updated_at:
                return False
        self.last = job
        return True


def _job_of(event_type: str, data: str) -> Optional[Job]:
    """The job an event carries; events of other types, or not carrying a job, are skipped so
    that the server can add some without breaking older clients."""
    if event_type not in ("status", "message"):
        return None
    try:
        payload = json.loads(data)
        return Job.from_json(payload) if isinstance(payload, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


def _quiet_until_retry(job: Job) -> float:
    """Seconds in which a job waiting for its next retry will not change by itself. The ladder
    waits up to minutes and the background tier hours: asking every second meanwhile is wasted.
    Capped, so a cancel from elsewhere is still seen soon, and clock skew cannot stretch it."""
    if job.status not in WAITING_TO_RETRY or job.next_retry_at is None:
        return 0.0
    return min(max(0.0, (job.next_retry_at - datetime.now(timezone.utc)).total_seconds()), MAX_QUIET_SECONDS)


def _transient(error: RenderqError) -> bool:
    return isinstance(error, NetworkError) or error.status in TRANSIENT_STATUSES


def _check(deadline: Optional[float]) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise _DeadlinePassed()


def _sleep(seconds: float, deadline: Optional[float]) -> None:
    if deadline is not None:
        seconds = min(seconds, deadline - time.monotonic())
    if seconds > 0:
        time.sleep(seconds)
    _check(deadline)


def _segment(job_id: str) -> str:
    """An id as one path segment: a stray '/' or '?' in it must not reach another endpoint."""
    return quote(str(job_id), safe="")


def _idempotency(key: Optional[str]) -> Dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


def _photo_upload(photo: PhotoInput) -> Tuple[str, Union[bytes, IO[bytes]]]:
    if isinstance(photo, (bytes, bytearray, memoryview)):
        return "photo", bytes(photo)
    if isinstance(photo, (str, os.PathLike)):
        path = Path(photo)
        return path.name, path.read_bytes()
    if hasattr(photo, "read"):
        return Path(str(getattr(photo, "name", "photo"))).name, photo
    raise TypeError("photo must be a path, bytes or a binary file, not %s" % type(photo).__name__)


def _reason(error: BaseException) -> str:
    """The root cause of a connection failure in a few words ('Connection refused'), not the
    whole chain requests and urllib3 wrap around it."""
    seen = 0
    cause: Optional[BaseException] = error
    while cause is not None and seen < 10:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        seen += 1
        nested = getattr(cause, "reason", None)
        if not isinstance(nested, BaseException):
            nested = next((arg for arg in cause.args if isinstance(arg, BaseException)), None)
        cause = nested or cause.__cause__ or cause.__context__
    return str(error)
