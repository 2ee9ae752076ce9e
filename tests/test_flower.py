"""Flower, the ops dashboard: behind basic auth, listing the job attempts by kind."""
from __future__ import annotations

import subprocess

import psutil
import requests

from tests.conftest import upload, wait_terminal
from tests.support import BIN, ROOT, Process, free_port, wait_for

CREDENTIALS = ("ops", "flower-test-password")


def flower_command(port: int) -> list[str]:
    return [str(BIN / "celery"), "-A", "tasks", "flower", "--address=127.0.0.1", "--port=%d" % port]


def test_flower_refuses_to_start_without_credentials(stack_env):
    env = {key: value for key, value in stack_env.items() if key != "FLOWER_BASIC_AUTH"}
    result = subprocess.run(flower_command(free_port()), env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "FLOWER_BASIC_AUTH" in result.stderr


def test_flower_needs_the_login_and_shows_attempts_by_kind(client, make_user, stack, stack_env, log_dir):
    port = free_port()
    url = "http://127.0.0.1:%d" % port
    flower = Process("flower", flower_command(port),
                     {**stack_env, "FLOWER_BASIC_AUTH": "%s:%s" % CREDENTIALS}, log_dir).start()
    try:
        wait_for(lambda: _status(url + "/") == 401, timeout=60, what="Flower to answer")
        assert requests.get(url + "/", auth=CREDENTIALS, timeout=5).status_code == 200
        assert requests.get(url + "/", auth=("ops", "wrong"), timeout=5).status_code == 401
        assert requests.get(url + "/metrics", timeout=5).status_code == 401  # Prometheus scrapes with the login
        assert requests.get(url + "/metrics", auth=CREDENTIALS, timeout=5).status_code == 200
        started = psutil.Process(flower.popen.pid)  # the login comes from the environment: no process list shows it
        assert not [process for process in [started, *started.children(recursive=True)]
                    if CREDENTIALS[1] in " ".join(process.cmdline())]

        _, token = make_user()
        job_id = upload(client, token).get_json()["id"]
        wait_terminal(client, token, job_id)

        def listed() -> dict | None:
            tasks = requests.get(url + "/api/tasks", params={"taskname": "renderq.jobs.attempt"},
                                 auth=CREDENTIALS, timeout=5).json()
            return next((task for task in tasks.values()
                         if job_id in str(task.get("args")) and task["state"] == "SUCCESS"), None)

        task = wait_for(listed, timeout=30, what="Flower to list the attempt as succeeded")
        assert "photo.render" in str(task["kwargs"])
        dashboard = requests.get(url + "/tasks", auth=CREDENTIALS, timeout=5)
        assert dashboard.status_code == 200 and "Flower" in dashboard.text
    finally:
        flower.stop()


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.RequestException:
        return 0
