"""The Procfile as bin/run and docker compose run it: every process started by honcho, on a
database, a Redis and a MEDIA_ROOT that nothing has touched yet, used through HTTP only."""
from __future__ import annotations

import io
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import requests
from PIL import Image

from tests.conftest import FAST_TIMINGS
from tests.support import (
    BIN,
    ROOT,
    PrivateRedis,
    Process,
    create_database,
    drop_database,
    free_port,
    wait_for,
    wait_for_health,
)

FLOWER_LOGIN = ("ops", "procfile-secret")


class ProcfileSystem:
    def __init__(self, env: dict, log_dir):
        self.env = env
        self.web = "http://127.0.0.1:%s" % env["PORT"]
        self.flower = "http://127.0.0.1:%s" % env["FLOWER_PORT"]
        # The test's own environment, not the .env that scripts/services.py may have left in the checkout.
        no_env_file = log_dir / "empty.env"
        no_env_file.touch()
        self.honcho = Process("honcho", [str(BIN / "honcho"), "start", "-f", "Procfile", "-e", str(no_env_file)],
                              env, log_dir)

    def flask(self, *args: str) -> str:
        result = subprocess.run([str(BIN / "flask"), "--app", "webapp", *args], env=self.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def procfile_system(tmp_path_factory) -> Iterator[ProcfileSystem]:
    log_dir = tmp_path_factory.mktemp("procfile-logs")
    broker = PrivateRedis(tmp_path_factory.mktemp("procfile-redis"), log_dir).start()
    database_url = create_database(os.environ.get("DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    generator_port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("GENERATOR_")}, **FAST_TIMINGS,
        "PATH": "%s:%s" % (BIN, os.environ["PATH"]),  # the Procfile names gunicorn and celery bare
        "DATABASE_URL": database_url, "REDIS_URL": broker.url, "APP_ENV": "production",
        "MEDIA_ROOT": str(tmp_path_factory.mktemp("procfile") / "media-not-made-yet"),
        "PORT": str(free_port()), "GENERATOR_PORT": str(generator_port), "FLOWER_PORT": str(free_port()),
        "GENERATOR_URL": "http://127.0.0.1:%d" % generator_port, "CONCURRENT_JOBS": "2",
        "FLOWER_BASIC_AUTH": "%s:%s" % FLOWER_LOGIN,
    }
    system = ProcfileSystem(env, log_dir)
    system.flask("db", "upgrade")  # bin/run's step before honcho, and compose's migrate service
    system.honcho.start()
    try:
        wait_for_health(system.web, timeout=60, what="the Procfile's web process")
        yield system
    finally:
        system.honcho.stop()
        broker.process.kill()
        drop_database(database_url)


def test_every_procfile_process_does_its_part(procfile_system):
    system = procfile_system
    token = system.flask("users", "create", "--email", "procfile@example.com", "--balance", "5").strip().splitlines()[-1]
    headers = {"Authorization": "Bearer " + token}
    photo = io.BytesIO()
    Image.new("RGB", (80, 60), "teal").save(photo, "JPEG")

    submitted = requests.post(system.web + "/api/photos", headers=headers, files={"file": ("p.jpg", photo.getvalue())},
                              data={"style": "sketch", "prompt": "[fail:1]"}, timeout=10)
    assert submitted.status_code == 202, submitted.text
    job_url = system.web + "/api/jobs/" + submitted.json()["id"]

    def finished() -> dict | None:
        job = requests.get(job_url, headers=headers, timeout=5).json()
        return job if job["status"] in ("completed", "failed", "canceled") else None

    job = wait_for(finished, timeout=60, what="the job to finish through the Procfile's worker")
    assert (job["status"], job["outcome"], job["attempts"]) == ("completed", "succeeded", 2)  # the generator's 503, then a render
    result = requests.get(job_url + "/result", headers=headers, timeout=5)
    assert Image.open(io.BytesIO(result.content)).size == (80, 60)

    wait_for(lambda: "renderq_background_processor_runs_total 0.0" not in requests.get(system.web + "/metrics").text,
             timeout=30, what="beat to run the background processor")
    assert 'renderq_jobs{kind="photo.render",status="completed"} 1.0' in requests.get(system.web + "/metrics").text
    assert list(Path(system.env["MEDIA_ROOT"]).glob("celerybeat-schedule*"))  # beat made its home itself

    wait_for(lambda: requests.get(system.flower + "/", timeout=2).status_code == 401 if _listening(system.flower) else None,
             timeout=60, what="Flower to ask for its login")
    assert requests.get(system.flower + "/workers", auth=FLOWER_LOGIN, timeout=10).status_code == 200


def test_stopping_honcho_stops_every_process(procfile_system):
    honcho = procfile_system.honcho.popen
    processes = psutil.Process(honcho.pid).children(recursive=True)
    assert len(processes) >= 5
    honcho.send_signal(signal.SIGTERM)  # what stopping bin/run does, through honcho
    honcho.wait(60)
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert alive == []
    assert not _listening(procfile_system.web)


def _listening(url: str) -> bool:
    try:
        requests.get(url + "/healthz", timeout=1)
        return True
    except requests.ConnectionError:
        return False
