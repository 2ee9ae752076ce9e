"""The chaos benchmark in small, and its invariant checker's negative controls.

The smoke runs bench/chaos.py on a stack of its own (a private PostgreSQL and Redis, every
Procfile line): 200 jobs from 20 users with the full mix of prompts and receivers, against a
generator failing 30 % of calls with 429s, hangs and garbage 200s, while a worker is paused past
its lease, a worker is killed, Redis restarts empty, PostgreSQL crashes and the queue keys are
deleted; then every invariant of bench/invariants.py must hold.
"""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from bench.receivers import Receivers
from tests.conftest import BASE_DATABASE_URL
from tests.support import ROOT, wait_for

# A worker paused early, while the queue is short, so that its jobs are recovered and finished
# elsewhere before it resumes; Redis restarts before the queue keys go (a restart begins a new
# broker epoch, which would re-publish what the deletion lost and hide whether the deletion
# alone is survived).
SMOKE_SCHEDULE = ("3:stop-worker@worker-2,18:kill-worker@worker-1,26:redis-restart-empty,32:postgres-restart,"
                  "38:delete-queues")


@pytest.mark.timeout(420)
def test_chaos_smoke_keeps_every_invariant():
    # A directory of its own rather than tmp_path: other pytest sessions on the machine prune old
    # base temporary directories, and this test runs for minutes.
    work = Path(tempfile.mkdtemp(prefix="renderq-chaos-smoke-"))
    try:
        run = subprocess.Popen(
            # A generator answering in 20 ms rather than 100: the same faults, a minute less of the suite.
            [sys.executable, "bench/chaos.py", "--jobs", "200", "--rate", "4", "--schedule", SMOKE_SCHEDULE,
             "--generator", "GENERATOR_LATENCY_MS=20", "--stall-timeout", "25", "--drain-timeout", "150",
             "--slack", "120", "--seed", "5", "--shown", "5",
             "--work-dir", str(work / "run"), "--report", str(work / "report.json")],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = run.communicate(timeout=360)
        except subprocess.TimeoutExpired:
            run.terminate()  # on SIGTERM the run stops its stack: no server of its own is left behind
            output, _ = run.communicate(timeout=50)
        print(output[-30_000:])
        result = json.loads((work / "report.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert result["submitted"] == 200
    assert set(result["faults"]) == {"kill-worker", "stop-worker", "delete-queues", "postgres-restart",
                                     "redis-restart-empty"}, result["fault_log"]
    checked = {verdict["name"] for verdict in result["verdicts"] if verdict["checked"]}
    assert len(checked) == len(result["verdicts"]) == 14  # nothing skipped: every log and probe was there
    violated = {verdict["name"]: verdict["violations"][:3] for verdict in result["verdicts"] if verdict["violations"]}
    assert not violated, json.dumps(violated, indent=1)


def test_invariant_checker_reports_each_break_of_a_consistent_run():
    run = subprocess.run([sys.executable, "bench/invariants.py", "--self-test", "--database-url", BASE_DATABASE_URL],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    print(run.stdout, run.stderr)
    assert run.returncode == 0
    assert "self-test: every break reported by exactly its invariant" in run.stdout
    assert run.stdout.count("ok   break:") == 16


def test_receivers_answer_as_their_mode_says_and_log_every_delivery(tmp_path):
    secret = "whsec_" + "c2VjcmV0LWZvci10aGUtcmVjZWl2ZXJzLXRlc3Q="
    log = tmp_path / "receivers.jsonl"
    receivers = Receivers(log, secret, trickle_bytes=3, trickle_interval=0.02).start()
    port = int(receivers.base_url.rsplit(":", 1)[1])
    try:
        def deliver(mode: str, webhook_id: str, sign_with: str = secret) -> requests.Response:
            body = json.dumps({"event": "job.succeeded", "job_id": "j-" + webhook_id})
            timestamp = int(time.time())
            headers = {"webhook-id": webhook_id, "webhook-timestamp": str(timestamp), "content-type": "application/json",
                       "webhook-signature": Webhook(sign_with).sign(webhook_id, _utc(timestamp), body)}
            return requests.post(receivers.url_for(mode, "u1"), data=body, headers=headers, timeout=10)

        assert [deliver("flaky", "msg_f").status_code for _ in range(3)] == [500, 500, 200]
        assert deliver("fail", "msg_x").status_code == 500
        assert deliver("ok", "msg_o", sign_with="whsec_" + "b3RoZXItc2VjcmV0LW9mLWVub3VnaC1ieXRlcw==").status_code == 200
        redirected = deliver("redirect", "msg_r")
        assert redirected.status_code == 200 and [r.status_code for r in redirected.history] == [307]
        started = time.monotonic()
        assert deliver("slowbody", "msg_s").text == "..."
        assert deliver("trickle", "msg_t").text == "ok"
        assert time.monotonic() - started >= 0.02 * (3 + 40)  # a byte at a time: the body, then a whole answer
        # A sender that gives up mid-body has the answer (headers sent) but not all of it, and
        # the log says when it hung up.
        sender = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        sender.request("POST", "/hooks/slowbody/u1", body=b"{}", headers={"webhook-id": "msg_gone"})
        assert sender.getresponse().status == 200
        sender.close()
        gave_up = time.time()
        wait_for(lambda: "msg_gone" in log.read_text(), timeout=5, what="the abandoned delivery to be logged")
        # A sender that gives up before the status line is whole never had an answer.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"POST /hooks/trickle/u1 HTTP/1.1\r\nHost: x\r\nwebhook-id: msg_cut\r\n"
                        b"Content-Length: 2\r\n\r\n{}")
            assert raw.recv(4) == b"H"  # the first byte of the status line, then the sender leaves
        wait_for(lambda: "msg_cut" in log.read_text(), timeout=5, what="the cut-off delivery to be logged")
    finally:
        receivers.stop()
    # In the order the deliveries arrived: a receiver logs after it has answered, so the next
    # delivery's line can come first.
    entries = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda entry: entry["start"])
    assert [(e["webhook_id"], e["mode"], e["status"], e["answered"], e["completed"]) for e in entries] == [
        ("msg_f", "flaky", 500, True, True), ("msg_f", "flaky", 500, True, True), ("msg_f", "flaky", 200, True, True),
        ("msg_x", "fail", 500, True, True), ("msg_o", "ok", 200, True, True), ("msg_r", "redirect", 307, True, True),
        ("msg_r", "redirected", 200, True, True), ("msg_s", "slowbody", 200, True, True),
        ("msg_t", "trickle", 200, True, True), ("msg_gone", "slowbody", 200, True, False),
        ("msg_cut", "trickle", 200, False, False)]
    assert [e["signature_ok"] for e in entries] == [True] * 4 + [False] + [True] * 4 + [False] * 2
    assert all(e["start"] <= e["end"] and e["job_id"] == "j-" + e["webhook_id"] for e in entries[:-2])
    assert entries[-2]["end"] - gave_up < 0.1  # noticed at once, not at the next byte


def _utc(timestamp: int):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(timestamp, timezone.utc)
