"""renderq on several hosts: two web hosts, two worker hosts, a database host and a generator
host, each a network namespace of its own (tests/multihost/cluster.py draws the map).

Each test states a requirement of running renderq on more than one machine; the hosts are
shared by the module (built once), and each test first puts the worker hosts into the shape it
needs. The last test leaves a backlog behind on purpose, which the teardown ends.
"""
from __future__ import annotations

import io
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
from PIL import Image

from tests.multihost.cluster import (
    JOB_LEASE_SECONDS,
    TERMINAL,
    WEB_HOSTS,
    WORKER_HOSTS,
    Cluster,
    User,
    WorkerSetup,
)
from tests.support import wait_for

PRICE = {"photo.render": 1, "image.generate": 2}  # config/kinds.py


@pytest.fixture(autouse=True)
def idle_system(cluster: Cluster) -> None:
    cluster.quiesce()


# Submissions the API refused with 503 and Retry-After (docs/api.md: come back later), by the
# request id of the refusal; a client does as told, and the figures are reported.
REFUSED: list[str] = []


def submit(cluster: Cluster, web: str, user: User, prompt: str) -> str:
    """An image.generate job (no photo, so no file has to travel between hosts)."""
    for _ in range(4):
        response = requests.post(cluster.web_url(web) + "/api/jobs", headers=user.headers, timeout=30,
                                 json={"kind": "image.generate", "params": {"style": "sketch", "prompt": prompt}})
        if response.status_code != 503:
            break
        REFUSED.append(response.json()["error"]["request_id"])
        time.sleep(float(response.headers.get("Retry-After", "1")))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def submit_many(cluster: Cluster, orders: list[tuple[str, User, str]], threads: int = 8) -> list[str]:
    """Submit (web host, user, prompt) orders concurrently; the job ids in the orders' order.
    The pool's threads are started from the client namespace, so they live there too."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda order: submit(cluster, *order), orders))


def png(size: tuple[int, int], color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def wait_until_running_on(cluster: Cluster, host: str, job_ids: list[str], count: int) -> list[str]:
    """The jobs whose attempt `host` has started and the generator is serving now."""
    def running() -> list[str] | None:
        jobs = [job_id for job_id in job_ids
                if host in cluster.hosts_that_attempted(job_id) and cluster.generator_calls(job_id)["in_flight"]]
        return jobs if len(jobs) >= count else None

    return wait_for(running, timeout=30, interval=0.1, what="%d attempts running on %s" % (count, host))


# 1 ----------------------------------------------------------------------------------------------

def test_jobs_from_either_web_host_run_on_either_worker_host_and_both_web_hosts_serve_them(cluster):
    cluster.use_workers(WorkerSetup())
    user = cluster.new_user(balance=100)
    accepted_by: dict[str, str] = {}
    photo_sizes: dict[str, tuple[int, int]] = {}
    for index in range(4):
        uploader, other = WEB_HOSTS[index % 2], WEB_HOSTS[1 - index % 2]
        size = (60 + index, 40 + index)
        uploaded = requests.post(cluster.web_url(uploader) + "/api/photos", headers=user.headers, timeout=30,
                                 files={"file": ("photo.png", png(size, "teal"))},
                                 data={"style": "sepia", "prompt": "[slow:400]"})
        assert uploaded.status_code == 202, uploaded.text
        job = uploaded.json()
        accepted_by[job["id"]], photo_sizes[job["id"]] = uploader, size
        # The same upload rendered again, asked of the other web host: it has to reach the photo too.
        again = requests.post(cluster.web_url(other) + "/api/jobs", headers=user.headers, timeout=30,
                              json={"kind": "photo.render", "photo_id": job["photo_id"],
                                    "params": {"style": "cartoon", "prompt": "[slow:400]"}})
        assert again.status_code == 202, again.text
        accepted_by[again.json()["id"]], photo_sizes[again.json()["id"]] = other, size
    job_ids = list(accepted_by)

    cluster.wait_terminal(job_ids, timeout=20, must=False)
    rows = cluster.sql("SELECT id::text, status, outcome, attempts FROM jobs WHERE id = ANY(%s::uuid[])", job_ids)
    report = "\n".join("job %s accepted by %s, attempted on %s: %s/%s after %d attempt(s)" % (
        job_id, accepted_by[job_id], cluster.hosts_that_attempted(job_id), status, outcome, attempts)
        for job_id, status, outcome, attempts in rows)
    errors = sorted({line.split(" raised unexpected: ", 1)[1] for host in WORKER_HOSTS
                     for line in cluster.worker_log(host).splitlines() if " raised unexpected: " in line})
    outcomes = {job_id: (status, outcome) for job_id, status, outcome, _ in rows}
    assert set(outcomes.values()) == {("completed", "succeeded")}, "%s\nworker errors: %s" % (report, errors)
    assert {host for job_id in job_ids for host in cluster.hosts_that_attempted(job_id)} == set(WORKER_HOSTS), report
    assert set(accepted_by.values()) == set(WEB_HOSTS)
    print("%d jobs: accepted by %s; succeeded on %s" % (
        len(job_ids), dict(Counter(accepted_by.values())),
        dict(Counter(host for job_id in job_ids for host in cluster.host_that_succeeded(job_id)))))

    for job_id in job_ids:
        other = WEB_HOSTS[1 - WEB_HOSTS.index(accepted_by[job_id])]
        result = requests.get(cluster.web_url(other) + "/api/jobs/%s/result" % job_id, headers=user.headers,
                              timeout=30)
        assert result.status_code == 200 and result.headers["Content-Type"] == "image/png", (
            "%s served job %s's result with %s: %s" % (other, job_id, result.status_code, result.text[:200]))
        assert Image.open(io.BytesIO(result.content)).size == photo_sizes[job_id]


# 2 ----------------------------------------------------------------------------------------------
# Before the tests that lose attempts on purpose: the scheduler counts an attempt lost in the last
# hard time limit against the cap (its call may still be running), which would lower it here.

CAP = 8
SKEW_SECONDS = 300


def test_the_generator_cap_holds_across_over_provisioned_hosts_whose_clocks_disagree(cluster):
    cluster.use_workers(WorkerSetup(concurrency=6, generator_max_inflight=CAP, skewed_hosts=("worker2",),
                                    clock_skew_seconds=SKEW_SECONDS))
    # worker2 really lives 5 minutes ahead, and its waits still work (see clock_skew.c)
    probe = subprocess.run(
        ["ip", "netns", "exec", cluster.network.hosts["worker2"].namespace, sys.executable, "-c",
         "import threading, time; lock = threading.Lock(); lock.acquire(); lock.acquire(timeout=0.1); "
         "time.sleep(0.1); print(time.time())"],
        env=cluster.env("worker2"), capture_output=True, text=True, timeout=10)
    assert probe.returncode == 0, probe.stderr
    assert abs(float(probe.stdout) - time.time() - SKEW_SECONDS) < 5
    cluster.restart_generator()  # its counters start now

    users = [cluster.new_user(balance=200) for _ in range(3)]
    # Calls long enough that the hosts' 12 slots press on the cap even on a loaded machine.
    job_ids = submit_many(cluster, [(WEB_HOSTS[index % 2], users[index % 3], "[slow:1500]") for index in range(64)])
    statuses = cluster.wait_terminal(job_ids, timeout=90, must=False)
    stats = cluster.generator_stats()
    assert stats["max_in_flight"] == CAP, "the generator saw %d calls at once (cap %d): %s; jobs: %s" % (
        stats["max_in_flight"], CAP, stats, dict(Counter(statuses.values())))
    assert Counter(statuses.values()) == Counter({"completed": 64}), "generator: %s" % stats
    print("clock skew %ds on one worker host; 64 jobs completed; the generator saw at most %d calls at once (cap %d)"
          % (SKEW_SECONDS, stats["max_in_flight"], CAP))


# 3 ----------------------------------------------------------------------------------------------

def test_a_worker_host_killed_mid_attempts_its_jobs_finish_on_the_other_host_once(cluster):
    cluster.use_workers(WorkerSetup())
    user = cluster.new_user(balance=100)
    job_ids = submit_many(cluster, [(WEB_HOSTS[index % 2], user, "[slow:2000]") for index in range(8)])
    killed = wait_until_running_on(cluster, "worker2", job_ids, count=2)

    cluster.kill_host("worker2")  # every process of the host, parent and pool alike, at once
    cluster.wait_terminal(job_ids, timeout=45)

    rows = {job_id: (status, outcome, attempts) for job_id, status, outcome, attempts in cluster.sql(
        "SELECT id::text, status, outcome, attempts FROM jobs WHERE id = ANY(%s::uuid[])", job_ids)}
    assert {row[:2] for row in rows.values()} == {("completed", "succeeded")}, rows
    for job_id in killed:
        assert cluster.host_that_succeeded(job_id) == ["worker1"], (job_id, cluster.job_lines("worker1", job_id))
    # Once: the killed jobs called the generator twice (the call the kill cut short, then one on
    # worker1), every other job once, and each job row counts exactly the calls the generator saw.
    calls = {job_id: cluster.generator_calls(job_id)["calls"] for job_id in job_ids}
    assert calls == {job_id: 2 if job_id in killed else 1 for job_id in job_ids}, calls
    assert {job_id: rows[job_id][2] for job_id in job_ids} == calls
    succeeded_rows = Counter(dict(cluster.sql(
        "SELECT job_id::text, count(*) FROM job_attempts WHERE outcome = 'succeeded' AND job_id = ANY(%s::uuid[]) "
        "GROUP BY job_id", job_ids)))
    assert succeeded_rows == Counter({job_id: 1 for job_id in job_ids})
    # Charged once: one capture per job, and the balance down by exactly the price of eight jobs.
    assert cluster.captures(job_ids) == Counter({job_id: 1 for job_id in job_ids})
    me = requests.get(cluster.web_url("web2") + "/api/me", headers=user.headers, timeout=10).json()
    assert (me["balance"], me["available"]) == (100 - 8 * PRICE["image.generate"],) * 2
    print("worker2 killed with %d of 8 jobs mid-call: all 8 succeeded on worker1 or before; generator calls %s; "
          "one capture each; balance %d" % (len(killed), dict(Counter(calls.values())), me["balance"]))


# 4 ----------------------------------------------------------------------------------------------

def overlaps(rows: list[tuple[int, str, object, int]]) -> list[str]:
    """Pairs of a job's attempt rows (number, outcome, started_at, duration_ms) whose time spans
    overlap; a zero-length row (the reconciler's `lost`) overlaps a span that strictly holds it."""
    spans = [(number, outcome, started, started + timedelta(milliseconds=duration))
             for number, outcome, started, duration in rows]
    found = []
    for index, (number_a, outcome_a, start_a, end_a) in enumerate(spans):
        for number_b, outcome_b, start_b, end_b in spans[index + 1:]:
            if max(start_a, start_b) < min(end_a, end_b) or (start_a < start_b < end_a and start_b == end_b) \
                    or (start_b < start_a < end_b and start_a == end_a):
                found.append("#%d %s [%s, %s] and #%d %s [%s, %s]" % (
                    number_a, outcome_a, start_a.time(), end_a.time(), number_b, outcome_b, start_b.time(), end_b.time()))
    return found


def test_a_worker_host_cut_off_longer_than_the_lease_never_runs_a_job_twice_at_once(cluster):
    cluster.use_workers(WorkerSetup())
    user = cluster.new_user(balance=100)
    # Three rounds of the four slots, long calls: on a loaded machine worker2 may take its first
    # messages late, and it must still be seen running two at once.
    job_ids = submit_many(cluster, [(WEB_HOSTS[index % 2], user, "[slow:3000]") for index in range(12)])
    cut_off = wait_until_running_on(cluster, "worker2", job_ids, count=2)

    cluster.network.cut("worker2")
    cut_at = time.monotonic()
    try:
        # Hold the cut until the lease ran out and the jobs worker2 was running are being called
        # again from elsewhere: the moment a second attempt could overlap the stranded one.
        wait_for(lambda: all(cluster.generator_calls(job_id)["calls"] >= 2 for job_id in cut_off),
                 timeout=JOB_LEASE_SECONDS + 20, interval=0.2, what="the cut-off host's jobs to be taken over")
        assert time.monotonic() - cut_at > JOB_LEASE_SECONDS
    finally:
        cluster.network.reconnect("worker2")
    cut_seconds = time.monotonic() - cut_at

    statuses = cluster.wait_terminal(job_ids, timeout=60)
    cluster.wait_workers_idle(timeout=60)  # worker2's stranded attempts have come back and ended

    attempts = {job_id: [] for job_id in job_ids}
    for job_id, number, outcome, started, duration in cluster.sql(
            "SELECT job_id::text, number, outcome, started_at, duration_ms FROM job_attempts "
            "WHERE job_id = ANY(%s::uuid[]) ORDER BY started_at", job_ids):
        attempts[job_id].append((number, outcome, started, duration))
    overlapping = {job_id: overlaps(rows) for job_id, rows in attempts.items() if overlaps(rows)}
    concurrent_calls = {job_id: calls["max_in_flight"] for job_id in job_ids
                        if (calls := cluster.generator_calls(job_id))["max_in_flight"] > 1}
    captures = cluster.captures(job_ids)
    succeeded = {job_id for job_id, outcome in cluster.sql(
        "SELECT id::text, outcome FROM jobs WHERE id = ANY(%s::uuid[])", job_ids) if outcome == "succeeded"}
    problems = []
    if not all(status in TERMINAL for status in statuses.values()):
        problems.append("jobs lost: %s" % statuses)
    if concurrent_calls:
        problems.append("jobs called the generator twice at once: %s" % concurrent_calls)
    if overlapping:
        problems.append("jobs recorded attempts that overlap in time: %s" % overlapping)
    if captures != Counter({job_id: 1 for job_id in succeeded}):
        problems.append("captures %s for %d succeeded jobs" % (dict(captures), len(succeeded)))
    assert not problems, "worker2 cut off for %.1fs (lease %ss) while running %s:\n%s" % (
        cut_seconds, JOB_LEASE_SECONDS, cut_off, "\n".join(problems))
    print("worker2 cut off %.1fs (lease %ss) while running %d jobs; %d jobs: %s; overlapping attempts 0, "
          "concurrent calls 0, %d captures for %d succeeded" % (
              cut_seconds, JOB_LEASE_SECONDS, len(cut_off), len(job_ids), dict(Counter(statuses.values())),
              sum(captures.values()), len(succeeded)))


# 5 ----------------------------------------------------------------------------------------------

RENDER_MS = 200


# More worker processes (6) than the two limits add up to (4), so the limits decide the shares.
LIMITS_SETUP = WorkerSetup(concurrency=3)


def test_per_user_limits_of_one_and_three_share_the_generator_one_to_three(cluster):
    cluster.use_workers(LIMITS_SETUP)
    light, heavy = cluster.new_user(balance=500), cluster.new_user(balance=500)
    cluster.flask("users", "set-limit", "--email", light.email, "--max-inflight", "1")
    cluster.flask("users", "set-limit", "--email", heavy.email, "--max-inflight", "3")

    # Equal backlogs, submitted alternately: in arrival order they would share the generator 1:1,
    # so a 1:3 share is the limits' doing.
    orders = []
    for index in range(80):
        orders += [(WEB_HOSTS[index % 2], light, "[slow:%d]" % RENDER_MS),
                   (WEB_HOSTS[(index + 1) % 2], heavy, "[slow:%d]" % RENDER_MS)]
    job_ids = submit_many(cluster, orders)
    jobs_of = {user.id: [job_id for (_, owner, _), job_id in zip(orders, job_ids) if owner is user]
               for user in (light, heavy)}
    # Both are busy until one of them has no job left; the shares are measured over that time.
    wait_for(lambda: any(all(status in TERMINAL for status in cluster.statuses(jobs).values())
                         for jobs in jobs_of.values()), timeout=90, interval=0.2, what="one user's backlog to drain")

    starts = {user_id: [started for job_id in jobs for started in cluster.generator_calls(job_id)["started_at"]]
              for user_id, jobs in jobs_of.items()}
    window = (max(min(times) for times in starts.values()), min(max(times) for times in starts.values()))
    calls = {user_id: sum(window[0] <= started <= window[1] for started in times) for user_id, times in starts.items()}
    ratio = calls[heavy.id] / max(1, calls[light.id])
    # About 25 calls of the light user in the window: one call more or less is 4 %, and its single
    # slot waits for a dispatch round after each call as each of the heavy user's three does, so
    # runs land between 2.8 and 3.35. A share of 1:2 or 1:4 still fails.
    assert 3 * 0.8 <= ratio <= 3 * 1.2, "generator calls in %.1fs with both busy: limit 1 → %d, limit 3 → %d" % (
        window[1] - window[0], calls[light.id], calls[heavy.id])
    print("generator calls in %.1fs with both busy: limit 1 → %d, limit 3 → %d (ratio %.2f)" % (
        window[1] - window[0], calls[light.id], calls[heavy.id], ratio))


def test_one_users_burst_of_a_thousand_does_not_hold_up_another_users_job(cluster):
    cluster.use_workers(LIMITS_SETUP)  # the same hosts as the test before: no restart
    burst, other = cluster.new_user(balance=2000 * PRICE["image.generate"]), cluster.new_user(balance=10)
    started = time.monotonic()
    burst_ids = submit_many(cluster, [(WEB_HOSTS[index % 2], burst, "[slow:%d]" % RENDER_MS) for index in range(1000)])
    submitting = time.monotonic() - started

    job_id = submit(cluster, "web2", other, "[slow:%d]" % RENDER_MS)
    allowed = timedelta(seconds=1 + 3 * RENDER_MS / 1000)
    # Wait a little past the requirement, so that a miss says by how much.
    cluster.wait_terminal([job_id], timeout=allowed.total_seconds() + 5, must=False)
    burst_now = dict(Counter(cluster.statuses(burst_ids).values()))
    (status, created, completed), = cluster.sql("SELECT status, created_at, completed_at FROM jobs WHERE id = %s",
                                                job_id)
    assert status == "completed", "the other user's job is still %s after %.1fs (allowed %s); the burst: %s; " \
        "1000 jobs took %.1fs to submit (%d refusals retried)" % (
            status, allowed.total_seconds() + 5, allowed, burst_now, submitting, len(REFUSED))
    assert completed - created <= allowed, "the other user's job took %s (allowed %s); the burst then: %s" % (
        completed - created, allowed, burst_now)
    print("behind a burst of 1000 (submitted in %.1fs), the other user's job took %.2fs (allowed %.1fs); "
          "the burst then: %s" % (submitting, (completed - created).total_seconds(), allowed.total_seconds(), burst_now))
