"""DATABASE_URL and REDIS_URL as users write them: what renderq makes of each form, what Celery
is configured with, and the start-up error for the rest."""
from __future__ import annotations

import ssl

import pytest
from celery import Celery

import celeryconfig
from config import ConfigError, load_settings


def database_url(raw: str) -> str:
    return load_settings({"DATABASE_URL": raw}).database_url


@pytest.mark.parametrize("written, used", [
    # the form PaaS add-ons, compose files and tutorials write
    ("postgresql://user@db.example.com/renderq", "postgresql+psycopg://user@db.example.com/renderq"),
    # libpq's short scheme (Heroku, Render, Fly)
    ("postgres://user:secret@db.example.com:6543/renderq", "postgresql+psycopg://user:secret@db.example.com:6543/renderq"),
    # SQLAlchemy's own spelling, and psycopg2's, which means the driver installed: psycopg 3
    ("postgresql+psycopg://postgres@127.0.0.1:5432/renderq", "postgresql+psycopg://postgres@127.0.0.1:5432/renderq"),
    ("postgresql+psycopg2://postgres:pw@127.0.0.1/renderq", "postgresql+psycopg://postgres:pw@127.0.0.1/renderq"),
    # query parameters go to libpq as written
    ("postgresql://u:p@db.example.com:5432/renderq?sslmode=require&application_name=renderq",
     "postgresql+psycopg://u:p@db.example.com:5432/renderq?sslmode=require&application_name=renderq"),
    # a percent-encoded password stays encoded
    ("postgres://u:p%40ss%2Fword@db.example.com/renderq", "postgresql+psycopg://u:p%40ss%2Fword@db.example.com/renderq"),
    # Unix sockets: no host at all, or a socket directory in ?host=
    ("postgresql:///renderq", "postgresql+psycopg:///renderq"),
    ("postgresql:///renderq?host=/var/run/postgresql", "postgresql+psycopg:///renderq?host=/var/run/postgresql"),
    ("postgres://postgres@/renderq?host=/tmp/pg", "postgresql+psycopg://postgres@/renderq?host=/tmp/pg"),
    ("POSTGRESQL://user@host/db", "postgresql+psycopg://user@host/db"),
])
def test_every_usual_postgresql_url_means_psycopg_3(written, used):
    assert database_url(written) == used


def test_the_default_database_url_is_the_local_server():
    assert load_settings({}).database_url == "postgresql+psycopg://postgres@127.0.0.1:5432/renderq"


@pytest.mark.parametrize("written", [
    "mysql://user@host/db",
    "postgresql+asyncpg://user@host/db",
    "postgresq://user@host/db",
    "user@host/db",
    "sqlite:///renderq.db",
    "postgresql://user@host:port/db",
])
def test_anything_else_stops_start_up_naming_database_url(written):
    with pytest.raises(ConfigError, match=r"^DATABASE_URL="):
        database_url(written)


def test_several_hosts_are_written_in_the_query():
    assert database_url("postgresql://u@/renderq?host=a:5432&host=b:5432") == \
        "postgresql+psycopg://u@/renderq?host=a:5432&host=b:5432"
    with pytest.raises(ConfigError, match=r"several hosts: write them as \?host=a:5432&host=b:5432"):
        database_url("postgresql://u@a:5432,b:5432/renderq")


def test_the_start_up_error_does_not_print_the_password():
    with pytest.raises(ConfigError) as raised:
        database_url("mysql://renderq:hunter2@db.example.com/renderq")
    assert "hunter2" not in str(raised.value) and "renderq:***@db.example.com" in str(raised.value)


def celery_conf(**environ: str) -> dict:
    return celeryconfig.from_settings(load_settings(environ))


@pytest.mark.parametrize("url", [
    "redis://:secret@redis.example.com:6379/0",  # requirepass
    "redis://renderq:secret@redis.example.com:6379/2",  # an ACL user (Redis 6+)
    "redis://redis.example.com",
])
def test_redis_urls_with_passwords_go_to_celery_as_written(url):
    conf = celery_conf(REDIS_URL=url)
    assert conf["broker_url"] == url and conf["result_backend"] == url
    assert "broker_use_ssl" not in conf and "redis_backend_use_ssl" not in conf


def test_celery_reads_the_password_and_user_from_the_url():
    app = Celery("urls", set_as_current=False)
    app.conf.update(celery_conf(REDIS_URL="redis://renderq:s%40cret@redis.example.com:6380/3"))
    connection = app.connection_for_write()
    assert (connection.userid, connection.password, connection.hostname, connection.port, connection.virtual_host) == \
        ("renderq", "s@cret", "redis.example.com", 6380, "3")
    backend = app.backend.connparams
    assert (backend["username"], backend["password"], backend["host"], backend["port"], backend["db"]) == \
        ("renderq", "s@cret", "redis.example.com", 6380, 3)


def test_rediss_urls_check_the_certificate_without_celery_specific_parameters():
    conf = celery_conf(REDIS_URL="rediss://:secret@redis.example.com:6380/0")
    assert conf["broker_url"] == "rediss://:secret@redis.example.com:6380/0"
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert conf["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app = Celery("urls", set_as_current=False)
    app.conf.update(conf)
    # what kombu and the result backend make of it, without connecting
    assert app.connection_for_write().ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert app.backend.connparams["password"] == "secret"


@pytest.mark.parametrize("written, normalised, mode", [
    ("rediss://h:6380/0?ssl_cert_reqs=none", "rediss://h:6380/0?ssl_cert_reqs=none", ssl.CERT_NONE),
    # Celery's documented spelling, which redis-py refuses: rewritten to the one all three accept
    ("rediss://h:6380/0?ssl_cert_reqs=CERT_NONE", "rediss://h:6380/0?ssl_cert_reqs=none", ssl.CERT_NONE),
    ("rediss://h:6380/0?ssl_cert_reqs=CERT_OPTIONAL&ssl_ca_certs=/etc/ca.pem",
     "rediss://h:6380/0?ssl_cert_reqs=optional&ssl_ca_certs=/etc/ca.pem", ssl.CERT_OPTIONAL),
])
def test_ssl_options_in_a_rediss_url_take_precedence(written, normalised, mode):
    settings = load_settings({"REDIS_URL": written})
    assert settings.redis_url == normalised
    app = Celery("urls", set_as_current=False)
    app.conf.update(celeryconfig.from_settings(settings))
    assert app.connection_for_write().ssl["ssl_cert_reqs"] == mode
    assert app.backend.connparams["ssl_cert_reqs"] == mode


def test_a_tls_result_backend_beside_a_plain_broker():
    conf = celery_conf(REDIS_URL="redis://broker:6379/0", CELERY_RESULT_BACKEND="rediss://results:6380/1")
    assert "broker_use_ssl" not in conf and conf["redis_backend_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}


def test_a_unix_socket_is_spelled_for_each_client():
    settings = load_settings({"REDIS_URL": "unix:///run/redis/redis.sock?db=2"})
    assert settings.redis_url == "unix:///run/redis/redis.sock?db=2"  # what redis-py reads
    conf = celeryconfig.from_settings(settings)
    assert conf["broker_url"] == conf["result_backend"] == "redis+socket:///run/redis/redis.sock?virtual_host=2"
    # kombu's spelling in REDIS_URL is read as the same socket
    assert load_settings({"REDIS_URL": "redis+socket:///run/redis/redis.sock?virtual_host=2"}).redis_url == \
        "unix:///run/redis/redis.sock?db=2"


@pytest.mark.parametrize("written", [
    "http://redis.example.com:6379/0",
    "redis://redis.example.com:port/0",
    "redis://redis.example.com/0?ssl_cert_reqs=required",  # TLS options on a plain connection
    "rediss://redis.example.com/0?ssl_cert_reqs=maybe",
])
def test_a_redis_url_no_client_could_use_stops_start_up(written):
    with pytest.raises(ConfigError, match=r"^REDIS_URL="):
        load_settings({"REDIS_URL": written})
