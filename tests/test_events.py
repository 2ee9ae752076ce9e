"""GET /api/jobs/{id}/events through a real gunicorn and a real HTTP client: one event per
status change, heartbeats, the stream closing after the terminal event, and a replay of what a
client missed after Last-Event-ID."""
from __future__ import annotations

import json
import time
from typing import Iterator, Optional

import requests

from tests.conftest import png_bytes
from tests.support import BIN, Process, free_port, wait_for_health


def auth(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def submit(web_url: str, token: str, prompt: str) -> str:
    response = requests.post(web_url + "/api/photos", headers=auth(token), timeout=10,
                             files={"file": ("p.png", png_bytes(), "image/png")}, data={"prompt": prompt})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def read_stream(response: requests.Response) -> Iterator[tuple[str, Optional[str], Optional[dict]]]:
    """(kind, id, job) per event: kind is 'status', 'ping' for a heartbeat, 'retry' for the delay."""
    event_id, data = None, None
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data is not None:
                yield "status", event_id, json.loads(data)
            event_id, data = None, None
        elif line.startswith(":"):
            yield "ping", None, None
        elif line.startswith("retry:"):
            yield "retry", None, None
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]


def test_one_event_per_status_change_heartbeats_and_the_end(web_url, make_user):
    _, token = make_user()
    job_id = submit(web_url, token, "[fail:2][slow:1500]")
    started = time.monotonic()
    with requests.get(web_url + "/api/jobs/%s/events" % job_id, headers=auth(token), stream=True, timeout=30) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        seen = list(read_stream(response))
    assert time.monotonic() - started < 30  # closed by the server after the terminal event
    jobs = [job for kind, _, job in seen if kind == "status"]
    ids = [event_id for kind, event_id, _ in seen if kind == "status"]
    statuses = [job["status"] for job in jobs]
    assert statuses[-1] == "completed" and jobs[-1]["outcome"] == "succeeded" and jobs[-1]["attempts"] == 3
    assert jobs[-1]["result_url"] == "/api/jobs/%s/result" % job_id
    # the two failed attempts, each a retry with its next retry time, then the attempt that worked
    assert statuses.count("retrying") == 2 and statuses[-2] == "processing"
    assert [job["attempts"] for job in jobs if job["status"] == "retrying"] == [1, 2]
    assert all(job["next_retry_at"] for job in jobs if job["status"] == "retrying")
    assert len(set(ids)) == len(ids)
    assert any(kind == "ping" for kind, _, _ in seen), [(k, j and j["status"]) for k, _, j in seen]  # 1.5 s calls, 1 s heartbeat


def test_a_client_that_reconnects_gets_what_it_missed(web_url, make_user):
    _, token = make_user()
    job_id = submit(web_url, token, "[fail:1][slow:800]")
    url = web_url + "/api/jobs/%s/events" % job_id
    with requests.get(url, headers=auth(token), stream=True, timeout=30) as response:
        first = next((event_id, job) for kind, event_id, job in read_stream(response) if kind == "status")
    # the client was away while the job moved on; a later stream replays it all from there
    time.sleep(3)
    with requests.get(url, headers={**auth(token), "Last-Event-ID": first[0]}, stream=True, timeout=30) as response:
        replayed = [(event_id, job) for kind, event_id, job in read_stream(response) if kind == "status"]
    statuses = [job["status"] for _, job in replayed]
    assert first[0] not in [event_id for event_id, _ in replayed]
    assert statuses[-1] == "completed" and "retrying" in statuses
    assert [job["attempts"] for _, job in replayed if job["status"] == "processing"] == \
        sorted(job["attempts"] for _, job in replayed if job["status"] == "processing")


def test_a_finished_job_streams_once_and_closes_and_others_cannot_watch(web_url, make_user):
    _, token = make_user()
    _, stranger = make_user()
    job_id = submit(web_url, token, "")
    url = web_url + "/api/jobs/%s/events" % job_id
    for _ in range(50):
        if requests.get(web_url + "/api/jobs/%s" % job_id, headers=auth(token), timeout=5).json()["status"] == "completed":
            break
        time.sleep(0.2)
    with requests.get(url, headers=auth(token), stream=True, timeout=10) as response:
        events = [job for kind, _, job in read_stream(response) if kind == "status"]
    assert [job["status"] for job in events] == ["completed"]
    assert requests.get(url, headers=auth(stranger), timeout=5).status_code == 403
    assert requests.get(url, timeout=5).status_code == 401


def test_a_stream_outlives_a_quiet_stretch_longer_than_the_redis_socket_timeout(stack_env, log_dir, make_user):
    # The production heartbeat (15 s) waits on Redis longer than its client's 5 s socket timeout.
    url = "http://127.0.0.1:%d" % free_port()
    web = Process("web-heartbeat-15", [str(BIN / "gunicorn"), "--bind", url[7:], "--workers", "1", "--threads", "4",
                                       "webapp:create_app()"], {**stack_env, "EVENT_HEARTBEAT_SECONDS": "15"},
                  log_dir).start()
    try:
        wait_for_health(url, timeout=30, what="gunicorn")
        _, token = make_user()
        job_id = submit(url, token, "[slow:8000]")  # processing for 8 s: no event in between
        with requests.get(url + "/api/jobs/%s/events" % job_id, headers=auth(token), stream=True,
                          timeout=30) as response:
            jobs = [job for kind, _, job in read_stream(response) if kind == "status"]
    finally:
        web.stop()
    assert (jobs[-1]["status"], jobs[-1]["outcome"]) == ("completed", "succeeded")
