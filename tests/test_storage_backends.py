"""Uploads and results in each storage backend (STORAGE_BACKEND): PostgreSQL, a directory, and an
S3-compatible bucket. The S3 endpoint here is moto's server mode (`moto_server`, a real HTTP
server speaking the S3 API), the only one these tests have.

Each backend gets a system of its own (a database, a private Redis, one attempts worker), runs a
job end to end, serves its result through the API, and has TTL cleanup delete its files.
"""
from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from tests.conftest import (
    BASE_DATABASE_URL,
    check_for_leaks,
    png_bytes,
    upload,
    wait_terminal,
)
from tests.support import (
    BIN,
    PrivateRedis,
    Process,
    create_database,
    drop_database,
    free_port,
    unreachable,
    wait_for,
    worker_command,
)

BUCKET = "renderq-test"
# moto accepts any credentials; these say where they come from: boto3's standard variables.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "renderq-test", "AWS_SECRET_ACCESS_KEY": "renderq-test-secret",
           "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module", autouse=True)
def aws_credentials() -> Iterator[None]:
    """boto3 reads credentials from the process environment, whatever a test's app was given: the
    apps made in this process need them there too."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in AWS_ENV.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Iterator[str]:
    """moto_server on a port of its own, with the test bucket made; its URL."""
    port = free_port()
    process = Process("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                      {**os.environ, **AWS_ENV}, tmp_path_factory.mktemp("moto-logs")).start()
    url = "http://127.0.0.1:%d" % port
    wait_for(lambda: _answers(url), timeout=30, what="moto_server to answer")
    bucket_client(url).create_bucket(Bucket=BUCKET)
    yield url
    process.stop()


def bucket_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code < 500
    except requests.RequestException:
        return False


def s3_env(endpoint: str, bucket: str = BUCKET) -> dict:
    return {"STORAGE_BACKEND": "s3", "S3_BUCKET": bucket, "S3_ENDPOINT_URL": endpoint, "S3_REGION": "us-east-1",
            **AWS_ENV}


class StorageSystem:
    def __init__(self, backend: str, env: dict, app):
        self.backend, self.env, self.app = backend, env, app
        self.client = app.test_client()

    def new_user(self, balance: int = 10) -> str:
        result = self.app.test_cli_runner().invoke(
            args=["users", "create", "--email", "u%d@example.com" % time.monotonic_ns(), "--balance", str(balance)])
        assert result.exit_code == 0, result.output
        return result.output.strip().splitlines()[-1]

    def stored_keys(self) -> set[str]:
        """Every key in the backend's own place."""
        from sqlalchemy import select

        from renderq.db import db
        from renderq.models import Blob

        if self.backend == "filesystem":
            root = Path(self.env["MEDIA_ROOT"])
            return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}
        if self.backend == "s3":
            listed = bucket_client(self.env["S3_ENDPOINT_URL"]).list_objects_v2(Bucket=BUCKET).get("Contents", [])
            return {item["Key"] for item in listed}
        with self.app.app_context():
            return set(db.session.execute(select(Blob.key)).scalars())

    def where_stored(self, keys: list[str]) -> list[bool]:
        """Whether each key is in the backend's own place: blob rows, files, or bucket objects."""
        from sqlalchemy import select

        from renderq.db import db
        from renderq.models import Blob

        if self.backend == "filesystem":
            return [Path(self.env["MEDIA_ROOT"], key).is_file() for key in keys]
        if self.backend == "s3":
            listed = bucket_client(self.env["S3_ENDPOINT_URL"]).list_objects_v2(Bucket=BUCKET).get("Contents", [])
            listed = {item["Key"] for item in listed}
            return [key in listed for key in keys]
        with self.app.app_context():
            found = set(db.session.execute(select(Blob.key).where(Blob.key.in_(keys))).scalars())
            return [key in found for key in keys]


@pytest.fixture(scope="module", params=["postgres", "filesystem", "s3"])
def system(request, stack_env, tmp_path_factory) -> Iterator[StorageSystem]:
    from flask_migrate import upgrade

    from webapp import create_app

    backend = request.param
    logs = tmp_path_factory.mktemp("storage-%s-logs" % backend)
    redis_server = PrivateRedis(tmp_path_factory.mktemp("storage-%s-redis" % backend), logs).start()
    database = create_database(BASE_DATABASE_URL, "renderq_storage")
    env = {**stack_env, "DATABASE_URL": database, "REDIS_URL": redis_server.url, "STORAGE_BACKEND": backend,
           "MEDIA_ROOT": str(tmp_path_factory.mktemp("storage-%s-media" % backend))}
    if backend == "s3":
        env.update(s3_env(request.getfixturevalue("moto")))
    app = create_app(env)
    app.after_request(check_for_leaks)
    with app.app_context():
        upgrade()
    worker = Process("worker", worker_command(concurrency=1), env, logs).start()
    try:
        yield StorageSystem(backend, env, app)
    finally:
        worker.stop()
        drop_database(database)
        redis_server.process.kill()


def _in_app(app, work: Callable[[], object]) -> object:
    with app.app_context():
        return work()


def test_a_job_runs_end_to_end_and_cleanup_deletes_its_files(system):
    from sqlalchemy import text

    from renderq.db import db
    from renderq.jobs.maintenance import purge_expired
    from renderq.models import Job, Photo

    token = system.new_user()
    headers = {"Authorization": "Bearer " + token}
    photo = png_bytes((80, 60), "teal")
    job_id = upload(system.client, token, image=photo).get_json()["id"]
    job = wait_terminal(system.client, token, job_id, timeout=60)
    assert (job["status"], job["outcome"]) == ("completed", "succeeded")

    served = system.client.get("/api/jobs/%s/result" % job_id, headers=headers)
    assert served.status_code == 200 and served.mimetype == "image/png"
    assert served.data.startswith(b"\x89PNG")
    row = _in_app(system.app, lambda: db.session.get(Job, uuid.UUID(job_id)))
    photo_key = _in_app(system.app, lambda: db.session.get(Photo, row.photo_id).path)
    assert re.fullmatch(r"results/%s/[0-9a-f-]{36}\.png" % job_id, row.result_path)  # the attempt's own key
    assert system.where_stored([photo_key, row.result_path]) == [True, True]

    def age_and_purge() -> int:
        db.session.execute(text("UPDATE jobs SET completed_at = now() - interval '2 days' WHERE id = :id"),
                           {"id": job_id})
        db.session.commit()
        return purge_expired(86400)

    assert _in_app(system.app, age_and_purge) == 1
    assert system.where_stored([photo_key, row.result_path]) == [False, False]
    assert system.client.get("/api/jobs/%s" % job_id, headers=headers).status_code == 404


def test_an_upload_refused_for_want_of_credits_stores_nothing(system):
    before = system.stored_keys()
    refused = upload(system.client, system.new_user(balance=0), image=png_bytes((40, 30), "navy"))
    assert refused.status_code == 402 and refused.get_json()["error"]["code"] == "INSUFFICIENT_CREDITS"
    assert system.stored_keys() == before


def test_s3_problems_are_named_by_readyz_and_answered_with_503(app, make_user, stack_env, moto):
    from webapp import create_app

    _, token = make_user()
    answer = create_app({**stack_env, **s3_env(moto)}).test_client().get("/readyz")
    assert (answer.status_code, answer.get_json()["checks"]["storage"]) == (200, "ok")
    missing = create_app({**stack_env, **s3_env(moto, bucket="no-such-bucket")}).test_client().get("/readyz")
    assert (missing.status_code, missing.get_json()["checks"]["storage"]) == (503, "unreachable")

    down = create_app({**stack_env, **s3_env(unreachable(moto))}).test_client()
    refused = upload(down, token)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
    assert refused.get_json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert moto.rsplit(":", 1)[1] not in refused.get_data(as_text=True)  # no endpoint in a production answer
