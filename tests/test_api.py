"""The HTTP API (docs/api.md) against the real stack: happy paths, refusals, other users' data."""
from __future__ import annotations

import io
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image
from sqlalchemy import text

from renderq.db import db
from renderq.messages import BLOCK_MESSAGES
from renderq.models import Job
from tests.conftest import (
    generator_calls,
    job_json,
    png_bytes,
    upload,
    wait_terminal,
)
from tests.support import wait_for


def auth(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def image_bytes(fmt: str, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "green").save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture()
def alice(make_user, stack):
    return make_user(balance=100)


@pytest.fixture()
def bob(make_user, stack):
    return make_user(balance=100)


@pytest.fixture()
def admin(make_user, stack):
    return make_user(balance=0, admin=True)


# --- POST /api/photos ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_photos_accept_jpeg_png_and_webp(client, alice, fmt):
    response = upload(client, alice[1], image=image_bytes(fmt))
    assert response.status_code == 202 and response.headers["Location"] == "/api/jobs/%s" % response.get_json()["id"]
    assert wait_terminal(client, alice[1], response.get_json()["id"])["outcome"] == "succeeded"


def damaged(data: bytes) -> bytes:
    """`data` with one byte in its middle flipped, as a bad disk or network leaves it."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def noise(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((96, 64), 40).convert("RGB").save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("body, message", [
    (b"not an image at all", "not a readable image"),
    (png_bytes()[:60], "not a readable image"),  # truncated
    (noise("PNG")[:-10], "not a readable image"),  # its last chunk missing
    (damaged(noise("PNG")), "not a readable image"),
    (noise("JPEG")[:len(noise("JPEG")) // 2], "not a readable image"),
    (noise("WEBP")[:-10], "not a readable image"),
    (image_bytes("GIF"), "GIF"),
], ids=["text", "truncated-png", "png-without-its-end", "damaged-png", "truncated-jpeg", "truncated-webp", "gif"])
def test_photos_refuse_what_is_not_a_usable_image(client, alice, body, message):
    response = upload(client, alice[1], image=body)
    assert response.status_code == 400 and message in response.get_json()["error"]["message"]


def test_a_decompression_bomb_is_refused(client, alice):
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")  # 144 Mpx in a few hundred kilobytes
    response = upload(client, alice[1], image=buffer.getvalue())
    assert response.status_code == 400 and "too many pixels" in response.get_json()["error"]["message"]


def test_an_upload_past_the_limit_is_413(app, client, alice):
    limit = app.extensions["renderq.settings"].max_upload_bytes
    response = upload(client, alice[1], image=b"\x89PNG" + b"0" * (limit + 1))
    assert response.status_code == 413 and response.get_json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


def test_unknown_style_and_kind_list_the_valid_ones(client, alice):
    style = upload(client, alice[1], style="vaporwave").get_json()["error"]
    assert style["code"] == "INVALID_STYLE" and "sketch" in style["message"] and "pixelate" in style["message"]
    response = client.post("/api/photos", headers=auth(alice[1]), content_type="multipart/form-data",
                           data={"file": (io.BytesIO(png_bytes()), "p.png"), "kind": "video.render"})
    assert response.status_code == 400 and "photo.render" in response.get_json()["error"]["message"]
    missing = client.post("/api/photos", headers=auth(alice[1]), data={"style": "sepia"})
    assert missing.status_code == 400 and "'file'" in missing.get_json()["error"]["message"]


def test_refused_submissions_change_nothing(client, alice):
    before = client.get("/api/me", headers=auth(alice[1])).get_json()
    upload(client, alice[1], image=b"junk")
    upload(client, alice[1], style="nope")
    listed = client.get("/api/users/%d/jobs" % alice[0], headers=auth(alice[1])).get_json()
    assert listed["items"] == [] and client.get("/api/me", headers=auth(alice[1])).get_json() == before


# --- auth ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}])
def test_no_valid_token_is_401(client, headers):
    for method, path in [("get", "/api/me"), ("post", "/api/photos"), ("get", "/api/queue/stats"),
                         ("post", "/api/jobs"), ("get", "/api/users/1/jobs"), ("get", "/api/me/notifications")]:
        response = getattr(client, method)(path, headers=headers)
        assert response.status_code == 401 and response.get_json()["error"]["code"] == "UNAUTHORIZED"


def test_other_users_get_403_or_404_never_the_data(client, alice, bob):
    job = upload(client, alice[1]).get_json()
    wait_terminal(client, alice[1], job["id"])
    for path in ["/api/jobs/%s" % job["id"], "/api/photos/%s/status" % job["photo_id"],
                 "/api/photos/%s/result" % job["photo_id"], "/api/jobs/%s/result" % job["id"],
                 "/api/users/%d/jobs" % alice[0]]:
        response = client.get(path, headers=auth(bob[1]))
        assert response.status_code in (403, 404) and "error" in response.get_json(), path
        assert job["id"] not in response.get_data(as_text=True)
    assert client.post("/api/jobs/%s/cancel" % job["id"], headers=auth(bob[1])).status_code == 403
    borrowed = client.post("/api/jobs", headers=auth(bob[1]),
                           json={"kind": "photo.render", "params": {"style": "sepia"}, "photo_id": job["photo_id"]})
    assert borrowed.status_code == 403
    assert client.get("/api/users/999999/jobs", headers=auth(bob[1])).status_code == 403


def test_unknown_ids_are_404(client, alice, admin):
    for path in ["/api/jobs/%s" % uuid.uuid4(), "/api/jobs/not-a-uuid", "/api/photos/%s/status" % uuid.uuid4(),
                 "/api/photos/%s/result" % uuid.uuid4()]:
        assert client.get(path, headers=auth(alice[1])).status_code == 404, path
    assert client.post("/api/jobs/%s/cancel" % uuid.uuid4(), headers=auth(alice[1])).status_code == 404
    assert client.get("/api/users/999999/jobs", headers=auth(admin[1])).status_code == 404
    assert client.post("/api/admin/jobs/%s/retry" % uuid.uuid4(), headers=auth(admin[1])).status_code == 404


def test_errors_are_json_with_a_request_id(client, alice):
    missing = client.get("/api/nowhere")
    assert missing.status_code == 404 and missing.get_json()["error"]["request_id"] == missing.headers["X-Request-Id"]
    wrong_method = client.delete("/api/me", headers=auth(alice[1]))
    assert wrong_method.status_code == 405 and wrong_method.get_json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "detail" not in missing.get_json()["error"]  # production
    assert client.get("/healthz").headers["X-Request-Id"]


# --- POST /api/jobs, idempotency, Prefer: wait ----------------------------------------------------

def test_create_job_from_json(client, alice):
    response = client.post("/api/jobs", headers=auth(alice[1]),
                           json={"kind": "image.generate", "params": {"style": "pixelate", "prompt": "a fox"}})
    assert response.status_code == 202
    job = wait_terminal(client, alice[1], response.get_json()["id"])
    assert (job["kind"], job["price"], job["photo_id"], job["outcome"]) == ("image.generate", 2, None, "succeeded")
    photo_job = upload(client, alice[1]).get_json()
    again = client.post("/api/jobs", headers=auth(alice[1]),
                        json={"kind": "photo.render", "params": {"style": "sketch"}, "photo_id": photo_job["photo_id"]})
    assert again.status_code == 202 and again.get_json()["photo_id"] == photo_job["photo_id"]
    wait_terminal(client, alice[1], again.get_json()["id"])


@pytest.mark.parametrize("body, status", [
    ({"kind": "photo.render", "params": {}}, 400),  # needs a photo
    ({"kind": "nope"}, 400),
    ({"kind": "image.generate", "params": {"style": 3}}, 400),
    ({"kind": "image.generate", "extra": 1}, 400),
    ({"kind": "image.generate", "photo_id": str(uuid.uuid4())}, 404),
    ([1, 2], 400),
])
def test_create_job_refuses_bad_bodies(client, alice, body, status):
    response = client.post("/api/jobs", headers=auth(alice[1]), json=body)
    assert response.status_code == status, response.get_json()


def test_create_job_needs_json(client, alice):
    response = client.post("/api/jobs", headers=auth(alice[1]), data="kind=image.generate",
                           content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415


def test_the_same_idempotency_key_and_body_give_the_same_job(client, alice):
    headers = {**auth(alice[1]), "Idempotency-Key": "order-%s" % uuid.uuid4()}
    body = {"kind": "image.generate", "params": {"style": "sepia", "prompt": "x"}}
    first = client.post("/api/jobs", headers=headers, json=body).get_json()
    second = client.post("/api/jobs", headers=headers, json=body).get_json()
    assert first["id"] == second["id"]
    assert client.get("/api/me", headers=auth(alice[1])).get_json()["available"] == 98  # one hold of 2
    changed = client.post("/api/jobs", headers=headers, json={**body, "params": {"style": "sketch"}})
    assert changed.status_code == 422 and changed.get_json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    photo_key = {**auth(alice[1]), "Idempotency-Key": "photo-%s" % uuid.uuid4()}
    assert upload_with(client, photo_key)["id"] == upload_with(client, photo_key)["id"]
    wait_terminal(client, alice[1], first["id"])


def upload_with(client, headers: dict) -> dict:
    return client.post("/api/photos", headers=headers, content_type="multipart/form-data",
                       data={"file": (io.BytesIO(png_bytes()), "p.png"), "style": "sepia"}).get_json()


def test_an_expired_idempotency_key_makes_a_new_job(app, client, alice):
    headers = {**auth(alice[1]), "Idempotency-Key": "old-%s" % uuid.uuid4()}
    body = {"kind": "image.generate", "params": {"style": "sepia"}}
    first = client.post("/api/jobs", headers=headers, json=body).get_json()
    with app.app_context():
        db.session.execute(text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' "
                                "WHERE key = :key"), {"key": headers["Idempotency-Key"]})
        db.session.commit()
    assert client.post("/api/jobs", headers=headers, json=body).get_json()["id"] != first["id"]


def test_a_key_whose_job_was_purged_makes_a_new_job(app, client, alice):
    headers = {**auth(alice[1]), "Idempotency-Key": "purged-%s" % uuid.uuid4()}
    body = {"kind": "image.generate", "params": {"style": "sepia"}}
    first = wait_terminal(client, alice[1], client.post("/api/jobs", headers=headers, json=body).get_json()["id"])
    with app.app_context():  # COMPLETED_JOB_TTL passed: cleanup took the job, the key is still young
        db.session.execute(text("UPDATE jobs SET completed_at = now() - interval '2 days' WHERE id = :id"),
                           {"id": first["id"]})
        db.session.commit()
        from renderq.jobs.maintenance import purge_expired

        purge_expired(86400)
    again = client.post("/api/jobs", headers=headers, json=body)
    assert again.status_code == 202 and again.get_json()["id"] != first["id"]


def test_prefer_wait_answers_when_the_job_is_done(app, client, alice):
    started = time.monotonic()
    response = client.post("/api/jobs", headers={**auth(alice[1]), "Prefer": "wait=20"},
                           json={"kind": "image.generate", "params": {"style": "sepia", "prompt": "[slow:700]"}})
    assert response.status_code == 200 and response.get_json()["status"] == "completed"
    assert 0.7 <= time.monotonic() - started < 10
    short = client.post("/api/jobs", headers={**auth(alice[1]), "Prefer": "wait=0.5"},
                        json={"kind": "image.generate", "params": {"style": "sepia", "prompt": "[slow:3000]"}})
    assert short.status_code == 202 and short.get_json()["status"] in ("pending", "processing")
    too_long = client.post("/api/jobs", headers={**auth(alice[1]), "Prefer": "wait=31"},
                           json={"kind": "image.generate"})
    assert too_long.status_code == 400
    wait_terminal(client, alice[1], short.get_json()["id"])


def test_waiting_requests_hold_no_database_connection_and_are_bounded(app, alice):
    with app.app_context():
        pool = db.engine.pool
        bound = app.extensions["renderq.settings"].max_waiting_requests
    answers: list[tuple[int, float]] = []

    def wait_for_slow_job() -> None:
        started = time.monotonic()
        response = app.test_client().post(
            "/api/jobs", headers={**auth(alice[1]), "Prefer": "wait=10"},
            json={"kind": "image.generate", "params": {"style": "sepia", "prompt": "[slow:2000]"}})
        answers.append((response.status_code, time.monotonic() - started))

    threads = [threading.Thread(target=wait_for_slow_job) for _ in range(bound + 2)]
    for thread in threads:
        thread.start()
    time.sleep(1)  # those let in are now waiting on their jobs
    assert pool.checkedout() == 0
    for thread in threads:
        thread.join()
    # as many as the bound waited for their job; the others were answered at once
    assert sorted(status for status, _ in answers) == [200] * bound + [202] * 2
    assert all(took < 1.5 for status, took in answers if status == 202)


def test_waiting_requests_cannot_keep_other_users_waiting(web_url, make_user):
    _, waiter = make_user()
    _, other = make_user()
    body = {"kind": "image.generate", "params": {"style": "sepia", "prompt": "[slow:4000]"}}

    def wait() -> int:
        return requests.post(web_url + "/api/jobs", json=body, timeout=30,
                             headers={**auth(waiter), "Prefer": "wait=10"}).status_code

    with ThreadPoolExecutor(16) as pool:
        waiting = [pool.submit(wait) for _ in range(16)]  # as many as the web has threads
        time.sleep(1)
        started = time.monotonic()
        assert requests.get(web_url + "/api/me", headers=auth(other), timeout=10).status_code == 200
        assert time.monotonic() - started < 1
        statuses = [future.result() for future in waiting]
    assert statuses.count(202) >= 16 - 2 * 2  # two gunicorn workers, two waiters each


# --- cancel ---------------------------------------------------------------------------------------

def test_cancel_a_waiting_job_and_not_a_finished_one(client, alice):
    job = upload(client, alice[1], prompt="[fail:999]").get_json()
    wait_for(lambda: job_json(client, alice[1], job["id"])["status"] == "retrying", what="a retry")
    canceled = client.post("/api/jobs/%s/cancel" % job["id"], headers=auth(alice[1]))
    assert canceled.status_code == 200 and canceled.get_json()["status"] == "canceled"
    again = client.post("/api/jobs/%s/cancel" % job["id"], headers=auth(alice[1]))
    assert again.status_code == 409
    time.sleep(1.5)
    assert job_json(client, alice[1], job["id"])["status"] == "canceled"


def test_cancel_racing_a_running_attempt_discards_its_result(client, alice, generator):
    job = upload(client, alice[1], prompt="[slow:1500]").get_json()
    wait_for(lambda: generator_calls(generator, job["id"])["in_flight"] == 1, what="the attempt to run")
    assert client.post("/api/jobs/%s/cancel" % job["id"], headers=auth(alice[1])).status_code == 200
    wait_for(lambda: generator_calls(generator, job["id"])["in_flight"] == 0, what="the attempt to end")
    time.sleep(0.5)
    final = job_json(client, alice[1], job["id"])
    assert (final["status"], final["outcome"], final["result_url"]) == ("canceled", None, None)
    for path in ("/api/jobs/%s/result" % job["id"], "/api/photos/%s/result" % job["photo_id"]):
        assert client.get(path, headers=auth(alice[1])).status_code == 409, path
    me = client.get("/api/me", headers=auth(alice[1])).get_json()
    assert me["balance"] == me["available"] == 100  # nothing charged


# --- the caller's profile -------------------------------------------------------------------------

def test_a_locale_set_through_the_profile_speaks_in_the_block_message(client, alice):
    assert client.get("/api/me", headers=auth(alice[1])).get_json()["locale"] == "en"
    for bad in ({"locale": "de"}, {"nickname": "x"}, {}, {"locale": "ru", "webhook_url": "ftp://example.com/"}):
        refused = client.patch("/api/me", json=bad, headers=auth(alice[1]))
        assert refused.status_code == 400 and refused.get_json()["error"]["message"], bad
    assert client.get("/api/me", headers=auth(alice[1])).get_json()["locale"] == "en"  # refusals changed nothing

    changed = client.patch("/api/me", json={"locale": "ru"}, headers=auth(alice[1]))
    assert changed.status_code == 200 and changed.get_json()["locale"] == "ru"
    job = wait_terminal(client, alice[1], upload(client, alice[1], prompt="[block:COPYRIGHT_VIOLATION]").get_json()["id"])
    assert job["message"] == BLOCK_MESSAGES["COPYRIGHT_VIOLATION"]["ru"]


# --- lists and paging -----------------------------------------------------------------------------

def test_user_jobs_newest_first_with_stable_cursor_paging(client, alice):
    ids = [client.post("/api/jobs", headers=auth(alice[1]), json={"kind": "image.generate"}).get_json()["id"]
           for _ in range(5)]
    first = client.get("/api/users/%d/jobs?limit=2" % alice[0], headers=auth(alice[1])).get_json()
    assert [job["id"] for job in first["items"]] == ids[::-1][:2] and first["next_cursor"]
    newer = client.post("/api/jobs", headers=auth(alice[1]), json={"kind": "image.generate"}).get_json()["id"]
    seen = [job["id"] for job in first["items"]]
    cursor = first["next_cursor"]
    while cursor:
        page = client.get("/api/users/%d/jobs?limit=2&cursor=%s" % (alice[0], cursor), headers=auth(alice[1])).get_json()
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
    assert seen == ids[::-1] and newer not in seen  # an insert does not shift the pages
    for job_id in ids + [newer]:
        wait_terminal(client, alice[1], job_id)
    filtered = client.get("/api/users/%d/jobs?status=completed&kind=image.generate" % alice[0],
                          headers=auth(alice[1])).get_json()["items"]
    assert len(filtered) == 6 and {job["status"] for job in filtered} == {"completed"}
    for bad in ["status=done", "kind=x", "limit=0", "limit=abc", "cursor=zzz"]:
        assert client.get("/api/users/%d/jobs?%s" % (alice[0], bad), headers=auth(alice[1])).status_code == 400, bad


def test_queue_position_counts_pending_jobs_ahead(client, alice, stack):
    stack.worker.stop()
    try:
        jobs = [client.post("/api/jobs", headers=auth(alice[1]), json={"kind": "image.generate"}).get_json()
                for _ in range(3)]
        positions = [job_json(client, alice[1], job["id"])["queue_position"] for job in jobs]
        assert positions[1] == positions[0] + 1 and positions[2] == positions[0] + 2
    finally:
        stack.restart_worker()
    assert wait_terminal(client, alice[1], jobs[2]["id"])["queue_position"] is None


def test_queue_position_reads_an_index_among_a_hundred_thousand_finished_jobs(app, client, alice, stack):
    from renderq.jobs.scheduler import jobs_ahead

    stack.worker.stop()
    try:
        job_id = client.post("/api/jobs", headers=auth(alice[1]), json={"kind": "image.generate"}).get_json()["id"]
        with app.app_context():
            # A hundred thousand finished jobs, visible to this transaction only and rolled back after.
            db.session.execute(text(
                "INSERT INTO jobs (id, user_id, kind, params, price, status, outcome, attempts, retry_count) "
                "SELECT gen_random_uuid(), :user_id, 'image.generate', '{}', 2, 'completed', 'succeeded', 1, 0 "
                "FROM generate_series(1, 100000)"), {"user_id": alice[0]})
            db.session.execute(text("ANALYZE jobs"))
            query = jobs_ahead(db.session.get(Job, uuid.UUID(job_id))).compile(db.engine)
            connection = db.session.connection()
            plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN ANALYZE " + str(query), query.params))
            db.session.rollback()
    finally:
        stack.restart_worker()
    assert "Index" in plan and "Seq Scan" not in plan, plan
    execution_ms = float(re.search(r"Execution Time: ([0-9.]+) ms", plan).group(1))
    print("queue_position among 100,000 finished jobs: %.2f ms\n%s" % (execution_ms, plan))


# --- monitoring and admin -------------------------------------------------------------------------

def test_queue_stats(client, alice):
    job = upload(client, alice[1]).get_json()
    wait_terminal(client, alice[1], job["id"])
    started = time.monotonic()
    stats = client.get("/api/queue/stats", headers=auth(alice[1])).get_json()
    assert time.monotonic() - started < 1.5
    assert stats["counts_by_status"]["completed"] >= 1 and set(stats["counts_by_kind"]) >= {"photo.render", "image.generate"}
    assert stats["workers_online"] >= 1 and stats["broker_queue_depth"] >= 0
    durations = stats["attempt_duration_last_hour"]
    assert durations["samples"] >= 1 and 0 <= durations["p50_ms"] <= durations["p95_ms"]


def test_queue_stats_answers_fast_with_no_broker(stack_env, make_user, stack):
    from webapp import create_app

    lonely = create_app({**stack_env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    _, token = make_user()
    wait_for(lambda: lonely.test_client().get("/api/queue/stats", headers=auth(token)).get_json()["workers_online"],
             what="the stack's worker to announce itself")
    started = time.monotonic()
    stats = lonely.test_client().get("/api/queue/stats", headers=auth(token)).get_json()
    # no broker to ask: the view says so (null) instead of hanging (a loose bound for a loaded machine)
    assert time.monotonic() - started < 3
    assert stats["broker_queue_depth"] is None
    assert stats["workers_online"] == 1  # the stack's worker, announced in PostgreSQL


def test_admin_views(client, alice, bob, admin):
    failed = upload(client, alice[1], prompt="[invalid]").get_json()
    wait_terminal(client, alice[1], failed["id"])
    for path in ["/api/admin/background-stats", "/api/admin/api-requests"]:
        assert client.get(path, headers=auth(alice[1])).status_code == 403
    background = client.get("/api/admin/background-stats?user_id=%d" % alice[0], headers=auth(admin[1])).get_json()
    assert background["failed"] == 1 and background["retry_count_histogram"] == {"0": 1}
    assert set(background) >= {"pending_background_retry", "processing", "failed", "completed", "blocked", "by_kind"}
    listed = client.get("/api/admin/api-requests?user_id=%d&status=failed" % alice[0], headers=auth(admin[1])).get_json()
    [row] = listed["items"]
    assert row["id"] == failed["id"] and row["error_code"] == "INVALID_INPUT" and "400" in row["error_detail"]
    assert client.get("/api/admin/api-requests?status=nope", headers=auth(admin[1])).status_code == 400
    assert client.get("/api/admin/background-stats?user_id=abc", headers=auth(admin[1])).status_code == 400
    other = client.get("/api/users/%d/jobs" % alice[0], headers=auth(admin[1])).get_json()["items"]
    assert [job["id"] for job in other] == [failed["id"]]


def test_admin_retry_puts_a_failed_job_back(client, alice, admin, generator):
    job = upload(client, alice[1], prompt="[invalid]").get_json()
    wait_terminal(client, alice[1], job["id"])
    assert client.post("/api/admin/jobs/%s/retry" % job["id"], headers=auth(alice[1])).status_code == 403
    retried = client.post("/api/admin/jobs/%s/retry" % job["id"], headers=auth(admin[1]))
    assert retried.status_code == 200 and retried.get_json()["attempts"] == 0
    again = wait_terminal(client, alice[1], job["id"])
    assert (again["status"], again["attempts"]) == ("failed", 1)
    assert generator_calls(generator, job["id"])["calls"] == 2
    done = upload(client, alice[1]).get_json()
    wait_terminal(client, alice[1], done["id"])
    assert client.post("/api/admin/jobs/%s/retry" % done["id"], headers=auth(admin[1])).status_code == 409
