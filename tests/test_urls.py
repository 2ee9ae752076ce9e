"""DATABASE_URL and REDIS_URL as users write them, read by real processes."""
from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import BASE_DATABASE_URL, upload, wait_terminal
from tests.support import (
    BIN,
    ROOT,
    PrivateRedis,
    Process,
    create_database,
    drop_database,
    worker_command,
)


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


class TlsFront:
    """TLS in front of a plain Redis, as managed Redis services and stunnel offer it: each
    connection's handshake, then bytes both ways."""

    def __init__(self, backend_port: int, certificate) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate.configure_cert(self.context)
        self.backend_port = backend_port
        self.handshakes = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            client.close()
            return
        self.handshakes += 1
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        threading.Thread(target=_pump, args=(backend, secure), daemon=True).start()
        _pump(secure, backend)

    def close(self) -> None:
        self.listener.close()


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, target):
            try:
                end.close()
            except OSError:
                pass


def test_a_rediss_url_works_end_to_end_without_celery_specific_parameters(stack_env, tmp_path, monkeypatch):
    """The worker's broker, the API's publish and renderq's own Redis client over TLS, the
    server's certificate checked against the system's CAs (here a test CA, through SSL_CERT_FILE),
    with REDIS_URL as the provider gives it: rediss://host:port/0, nothing Celery-specific."""
    import trustme
    from flask_migrate import upgrade

    from webapp import create_app

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # for this process's app
    redis_server = PrivateRedis(tmp_path, tmp_path).start()
    front = TlsFront(redis_server.port, ca.issue_cert("127.0.0.1"))
    database_url = create_database(BASE_DATABASE_URL, prefix="renderq_tls")
    env = {**stack_env, "DATABASE_URL": database_url, "REDIS_URL": "rediss://127.0.0.1:%d/0" % front.port,
           "SSL_CERT_FILE": str(tmp_path / "ca.pem"), "MEDIA_ROOT": str(tmp_path / "media")}
    worker = Process("tls-worker", worker_command(concurrency=1), env, tmp_path)
    try:
        app = create_app(env)
        with app.app_context():
            upgrade()
        worker.start()
        runner = app.test_cli_runner()
        token = runner.invoke(args=["users", "create", "--email", "tls@example.com", "--balance", "3"]).output.split()[-1]
        client = app.test_client()
        job = upload(client, token).get_json()
        assert wait_terminal(client, token, job["id"])["status"] == "completed", worker.log_tail()
        assert client.get("/readyz").get_json()["checks"] == {"database": "ok", "broker": "ok"}
        assert front.handshakes >= 2  # the worker's connections and this process's
        assert "defaulting to insecure SSL behaviour" not in worker.log_path.read_text()
    finally:
        worker.stop()
        front.close()
        redis_server.process.kill()
        drop_database(database_url)
