"""GET /api/jobs/{id}/events: a job's status changes as Server-Sent Events.

The first event is the job as it is now (or, with `Last-Event-ID`, every kept event the client
missed); then one event per status change, a comment line as a heartbeat, and the stream
closes after the terminal event. While it waits the request holds a Redis connection, never a
database one. Each web process serves at most MAX_EVENT_STREAMS streams at once (a stream
holds one of its threads); past that the answer is 503 and the client polls instead.
"""
from __future__ import annotations

import json
import time
from typing import Iterator

from flask import Blueprint, Response, g, request, stream_with_context

from renderq import events
from renderq.db import db
from renderq.runtime import settings
from webapp.admission import Admission
from webapp.api import visible_job
from webapp.auth import login_required
from webapp.errors import ApiError
from webapp.resources import job_resource, job_resource_at, locale_of

blueprint = Blueprint("events", __name__)

STREAM_SECONDS = 300  # then the client reconnects with Last-Event-ID and loses nothing

# At most MAX_EVENT_STREAMS open streams per process.
_streams = Admission(lambda config: config.max_event_streams)


def _event(event_id: str, resource: dict) -> str:
    return "id: %s\nevent: status\ndata: %s\n\n" % (event_id, json.dumps(resource, separators=(",", ":")))


@blueprint.get("/api/jobs/<job_id>/events")
@login_required
def job_events(job_id: str) -> Response:
    job = visible_job(job_id)
    locale = locale_of(g.user, settings().default_locale)
    missed_since = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    cursor = events.latest_id(job.id)  # before the row is read: no change slips between the two
    db.session.refresh(job)
    first = None if missed_since else _event(cursor, job_resource(job, locale))
    db.session.close()  # nothing below touches the database

    def stream() -> Iterator[str]:
        with _streams.enter() as admitted:
            if not admitted:
                raise ApiError(503, "TOO_MANY_STREAMS", "This server is serving as many event streams as it "
                                                        "can; poll GET /api/jobs/{id} instead.")
            yield "retry: 2000\n\n"
            position, deadline = cursor, time.monotonic() + STREAM_SECONDS
            if first is not None:
                yield first
                if events.is_terminal({"status": job.status}):
                    return
            backlog = events.since(job.id, missed_since) if missed_since else []
            while time.monotonic() < deadline:
                for position, state in backlog:
                    yield _event(position, job_resource_at(job, state, locale))
                    if events.is_terminal(state):
                        return
                backlog = events.wait(job.id, position, settings().event_heartbeat_seconds)
                if not backlog:
                    yield ": ping\n\n"

    body = stream_with_context(stream())
    next(body)  # admitted or refused, before the 200 goes out
    response = Response(_prepend("retry: 2000\n\n", body), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # a proxy in front must not hold the events back
    return response


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
