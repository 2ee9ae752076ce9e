"""Recovery on the production defaults (a 30 s lease, the reconciler every 5 s), with a backlog
waiting and every worker process busy: a dead worker's attempts move on within 60 s."""
from __future__ import annotations

import time
from typing import Iterator

import pytest

from tests.conftest import generator_calls, job_json, upload
from tests.isolated import IsolatedStack
from tests.support import wait_for

PRODUCTION = {"JOB_LEASE_SECONDS": "30", "QUEUE_CHECK_INTERVAL": "5", "RETRY_DELAYS": "1,5,15,60,300",
              "BACKGROUND_PROCESSING_INTERVAL": "30000"}


@pytest.fixture(scope="module")
def production(tmp_path_factory) -> Iterator[IsolatedStack]:
    stack = IsolatedStack(tmp_path_factory.mktemp("production"), PRODUCTION, concurrency=2).start()
    yield stack
    stack.worker.kill()  # it is in 50 s generator calls that nobody waits for: nothing to drain
    stack.stop()


def test_a_dead_workers_attempts_move_on_within_a_minute_behind_a_backlog(production):
    token = production.new_user()
    jobs = [upload(production.client, token, prompt="[slow:50000]").get_json()["id"] for _ in range(6)]
    try:
        running = wait_for(lambda: [job_id for job_id in jobs
                                    if generator_calls(production.generator_url, job_id)["in_flight"]]
                           if sum(generator_calls(production.generator_url, job_id)["in_flight"] for job_id in jobs) == 2
                           else None, timeout=30, what="both worker processes to be busy")
        production.worker.kill()
        killed_at = time.monotonic()
        production.restart_worker()
        for job_id in running:
            # recovered: the lost attempt counts as a transient failure, the job waits for its retry
            wait_for(lambda: job_json(production.client, token, job_id)["status"] != "processing"
                     or job_json(production.client, token, job_id)["attempts"] > 1,
                     timeout=60 - (time.monotonic() - killed_at), interval=0.5,
                     what="job %s to be recovered within 60 s of the kill" % job_id)
        recovered_after = time.monotonic() - killed_at
        assert recovered_after < 60
        print("recovered %.1f s after the kill (lease 30 s, reconciler every 5 s)" % recovered_after)
    finally:
        for job_id in jobs:
            production.client.post("/api/jobs/%s/cancel" % job_id, headers={"Authorization": "Bearer " + token})
