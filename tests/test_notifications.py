"""Notifications: exactly one per success or block, in the user's language, and one
signed webhook per notification that a Standard Webhooks library verifies."""
from __future__ import annotations

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import func, select
from standardwebhooks.webhooks import Webhook

from renderq.db import db
from renderq.messages import BLOCK_MESSAGES
from renderq.models import LedgerEntry, Notification, User
from tests.conftest import (
    WEBHOOK_SECRET,
    generator_calls,
    job_json,
    upload,
    wait_terminal,
)
from tests.support import free_port, wait_for


class Receiver:
    """A real HTTP endpoint that records every POST and answers with the next scripted status."""

    def __init__(self, statuses: list[int] | None = None):
        self.statuses = list(statuses or [])
        self.posts: list[tuple[dict, bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                receiver.posts.append(({k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = "http://127.0.0.1:%d/hooks/renderq" % self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def receiver():
    created: list[Receiver] = []

    def make(statuses: list[int] | None = None) -> Receiver:
        created.append(Receiver(statuses))
        return created[-1]

    yield make
    for each in created:
        each.close()


def auth(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def set_webhook(client, token: str, url: str) -> None:
    response = client.patch("/api/me", json={"webhook_url": url}, headers=auth(token))
    assert response.status_code == 200, response.get_json()


def inbox(client, token: str) -> list[dict]:
    return client.get("/api/me/notifications", headers=auth(token)).get_json()["items"]


def test_success_notifies_once_with_a_verifiable_webhook(client, make_user, stack, receiver):
    _, token = make_user()
    hook = receiver()
    set_webhook(client, token, hook.url)
    job_id = upload(client, token).get_json()["id"]
    job = wait_terminal(client, token, job_id)
    wait_for(lambda: len(hook.posts) == 1, what="the webhook")
    headers, body, _ = hook.posts[0]
    payload = Webhook(WEBHOOK_SECRET).verify(body, headers)  # raises unless the signature is right
    assert payload["event"] == "job.succeeded" and payload["job_id"] == job_id
    assert payload["result_url"] == job["result_url"]
    # The delivery is recorded once the receiver has answered, a moment after it saw the post.
    wait_for(lambda: inbox(client, token)[0]["delivered_at"], what="the delivery recorded")
    items = inbox(client, token)
    assert len(items) == 1 and items[0]["webhook_id"] == headers["webhook-id"]
    assert items[0]["delivery"] == {"state": "delivered", "attempts": 1, "last_error": None}
    time.sleep(1.5)  # reconciler runs: nothing more arrives
    assert len(hook.posts) == 1


def test_a_failing_receiver_gets_the_same_notification_again_until_it_accepts(client, make_user, stack, receiver):
    _, token = make_user()
    hook = receiver([500, 503])
    set_webhook(client, token, hook.url)
    job_id = upload(client, token, prompt="[block:CONTENT_SAFETY_VIOLATION]").get_json()["id"]
    wait_terminal(client, token, job_id)
    wait_for(lambda: len(hook.posts) == 3, timeout=30, what="two retried deliveries")
    ids = {headers["webhook-id"] for headers, _, _ in hook.posts}
    assert len(ids) == 1  # stable across redeliveries, so the receiver can drop duplicates
    assert [status for _, _, status in hook.posts] == [500, 503, 200]
    for headers, body, _ in hook.posts:
        assert Webhook(WEBHOOK_SECRET).verify(body, headers)["event"] == "job.blocked"
    time.sleep(2)
    assert len(hook.posts) == 3 and inbox(client, token)[0]["delivered_at"]
    assert inbox(client, token)[0]["delivery"] == {"state": "delivered", "attempts": 3, "last_error": None}


def test_retries_notify_only_the_final_success(client, make_user, stack, receiver):
    _, token = make_user()
    hook = receiver()
    set_webhook(client, token, hook.url)
    job_id = upload(client, token, prompt="[fail:2]").get_json()["id"]
    assert wait_terminal(client, token, job_id)["attempts"] == 3
    wait_for(lambda: hook.posts, what="the webhook")
    time.sleep(1)
    assert [item["event"] for item in inbox(client, token)] == ["succeeded"]
    assert len(hook.posts) == 1


@pytest.mark.parametrize("code", sorted(BLOCK_MESSAGES))
@pytest.mark.parametrize("locale", ["ru", "en"])
def test_block_messages_word_for_word(client, make_user, stack, code, locale):
    _, token = make_user(locale=locale)
    job_id = upload(client, token, prompt="[block:%s]" % code).get_json()["id"]
    job = wait_terminal(client, token, job_id)
    assert job["message"] == BLOCK_MESSAGES[code][locale]
    [notification] = inbox(client, token)
    assert notification["event"] == "blocked" and notification["payload"]["message"] == BLOCK_MESSAGES[code][locale]


def test_the_spec_texts(app):
    assert BLOCK_MESSAGES["CONTENT_SAFETY_VIOLATION"]["ru"] == (
        "🚫 К сожалению, это изображение не может быть обработано по соображениям безопасности. "
        "Пожалуйста, выберите другое фото.")
    assert BLOCK_MESSAGES["SAFETY_AGREEMENT_REQUIRED"]["en"] == (
        "🚫 You need to accept the safety rules. Please read the rules and confirm your agreement.")


def test_safety_agreement_lets_unfiltered_renders_through(client, make_user, stack):
    _, token = make_user(locale="en")
    blocked = wait_terminal(client, token, upload(client, token, style="unfiltered").get_json()["id"])
    assert (blocked["outcome"], blocked["block_reason"]) == ("blocked", "SAFETY_AGREEMENT_REQUIRED")
    assert "accept the safety rules" in blocked["message"]
    agreed = client.post("/api/me/safety-agreement", headers=auth(token))
    assert agreed.status_code == 200 and agreed.get_json()["safety_agreed_at"]
    rendered = wait_terminal(client, token, upload(client, token, style="unfiltered").get_json()["id"])
    assert rendered["outcome"] == "succeeded"


def test_worker_killed_after_the_capture_and_a_redelivered_message_change_nothing(
        app, client, make_user, stack, receiver, generator):
    user_id, token = make_user(balance=3)
    hook = receiver()
    set_webhook(client, token, hook.url)
    job_id = upload(client, token).get_json()["id"]
    wait_for(lambda: job_json(client, token, job_id)["status"] == "completed", interval=0.005, what="success")
    stack.worker.kill()  # as close after the capture's commit as the test can get: the ack may be lost
    with app.app_context():  # and the broker hands the same message out again
        app.extensions["celery"].send_task("renderq.jobs.attempt", args=[job_id])
        app.extensions["celery"].send_task("renderq.jobs.attempt", args=[job_id])
    stack.restart_worker()
    wait_for(lambda: hook.posts, timeout=30, what="the webhook")
    time.sleep(3)
    with app.app_context():
        captures = db.session.execute(select(func.count()).select_from(LedgerEntry).where(
            LedgerEntry.job_id == uuid.UUID(job_id), LedgerEntry.entry_type == "capture")).scalar()
        notifications = db.session.execute(select(Notification.webhook_id).where(
            Notification.job_id == uuid.UUID(job_id))).scalars().all()
    assert captures == 1 and len(notifications) == 1
    assert {headers["webhook-id"] for headers, _, _ in hook.posts} == set(notifications)
    assert client.get("/api/me", headers=auth(token)).get_json()["balance"] == 2
    assert generator_calls(generator, job_id)["calls"] == 1


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "http://169.254.169.254/latest/meta-data",
                                 "http://[fe80::1]/hook", "http://metadata.google.internal/", "not a url",
                                 "http://10.0.0.1/hook", "http://[::1]:8080/hook"])
def test_unsafe_webhook_urls_are_refused(client, make_user, url):
    _, token = make_user()
    response = client.patch("/api/me", json={"webhook_url": url}, headers=auth(token))
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "INVALID_WEBHOOK_URL"
    assert client.get("/api/me", headers=auth(token)).get_json()["webhook_url"] is None


def test_users_create_and_update_check_the_webhook_url_the_same_way(app, make_user):
    runner = app.test_cli_runner()
    created = runner.invoke(args=["users", "create", "--email", "cli-%s@example.com" % uuid.uuid4().hex[:8],
                                  "--webhook-url", "http://192.168.1.1/hook"])
    assert created.exit_code != 0 and "a private address" in created.output
    user_id, _ = make_user()
    with app.app_context():
        email = db.session.get(User, user_id).email
        db.session.rollback()
    updated = runner.invoke(args=["users", "update", "--email", email, "--webhook-url", "http://[::1]:9000/hook"])
    assert updated.exit_code != 0 and "a loopback address" in updated.output
    allowed = runner.invoke(args=["users", "update", "--email", email, "--webhook-url", "http://127.0.0.1:9000/hook"])
    assert allowed.exit_code == 0, allowed.output  # the tests' WEBHOOK_ALLOWED_NETWORKS names 127.0.0.0/8
