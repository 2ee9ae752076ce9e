"""Deploys: SIGTERM to a worker's whole process group (what Ctrl-C under honcho and systemd's
default KillMode do) in the middle of attempts loses nothing and wastes no generator call:
the running attempts finish, the waiting jobs wait for the next worker."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import generator_calls, job_json, upload, wait_terminal
from tests.support import Process, wait_for, worker_command


@pytest.fixture(params=["threads", "prefork"])
def pool(request, stack):
    """The Procfile's default pool (threads), and prefork, whose children share the group."""
    if request.param != "threads":
        stack.worker.stop()
        stack.worker = Process("worker", worker_command(pool=request.param), stack.env, stack.log_dir).start()
    yield request.param
    if request.param != "threads":
        stack.worker.stop()
        stack.restart_worker()


def test_sigterm_to_the_worker_and_its_pool_finishes_the_running_attempts(client, make_user, stack, generator, pool):
    _, token = make_user()
    jobs = [upload(client, token, prompt="[slow:2500]").get_json()["id"] for _ in range(4)]
    running = wait_for(lambda: [job_id for job_id in jobs if generator_calls(generator, job_id)["in_flight"]]
                       if sum(generator_calls(generator, job_id)["in_flight"] for job_id in jobs) == 2 else None,
                       what="both worker processes to be busy")
    os.killpg(stack.worker.popen.pid, signal.SIGTERM)  # the main process and every pool process at once
    stack.worker.popen.wait(30)  # a warm shutdown: it waited for the two attempts
    for job_id in running:
        assert wait_terminal(client, token, job_id, timeout=5)["status"] == "completed"
    for job_id in set(jobs) - set(running):  # a thread whose attempt ended took no other job on its way out
        assert job_json(client, token, job_id)["status"] == "pending"
        assert generator_calls(generator, job_id)["calls"] == 0
    time.sleep(1)
    stack.worker = Process("worker", worker_command(pool=pool), stack.env, stack.log_dir).start()
    for job_id in jobs:
        job = wait_terminal(client, token, job_id, timeout=30)
        assert (job["status"], job["attempts"]) == ("completed", 1), job
        assert generator_calls(generator, job_id)["calls"] == 1
