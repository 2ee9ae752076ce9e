"""DATABASE_URL as users write it, read by real processes against the test database."""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.support import BIN, ROOT


def written_as(database_url: str, form: str) -> str:
    """The test database's URL in one of the forms users write."""
    url = make_url(database_url)
    if form == "socket":  # libpq's Unix socket form: no host, the socket's directory in ?host=
        with psycopg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False)) as connection:
            directory = connection.execute("SHOW unix_socket_directories").fetchone()[0].split(",")[0].strip()
        assert Path(directory).is_dir(), "the test server has no Unix socket directory here: %r" % directory
        return url.set(drivername="postgresql", host=None, port=None, query={"host": directory}) \
            .render_as_string(hide_password=False)
    return url.set(drivername=form).render_as_string(hide_password=False)


@pytest.mark.parametrize("form", ["postgresql", "postgres", "socket"])
def test_a_process_started_with_a_plain_postgresql_url_works(client, stack_env, database_url, form):
    url = written_as(database_url, form)
    assert url.startswith(("postgresql://", "postgres://")) and "psycopg" not in url
    email = "url-%s@example.com" % uuid.uuid4().hex[:10]
    created = subprocess.run([str(BIN / "flask"), "--app", "webapp", "users", "create", "--email", email,
                              "--balance", "7"], env={**stack_env, "DATABASE_URL": url}, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    # the user that process wrote is in the test database, which the app reads
    me = client.get("/api/me", headers={"Authorization": "Bearer " + token})
    assert me.status_code == 200 and me.get_json()["email"] == email and me.get_json()["balance"] == 7


def test_an_unusable_database_url_stops_the_process_naming_it(stack_env):
    started = subprocess.run([str(BIN / "flask"), "--app", "webapp", "db", "current"],
                             env={**stack_env, "DATABASE_URL": "mysql://renderq:hunter2@127.0.0.1/renderq"}, cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert started.returncode != 0
    assert "DATABASE_URL='mysql://renderq:***@127.0.0.1/renderq' is invalid: must be a PostgreSQL URL" in started.stderr
    assert "hunter2" not in started.stderr and "psycopg2" not in started.stderr
