"""Billing: holds on acceptance, one capture on success, a release otherwise, 402 past the balance."""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from renderq.db import db
from renderq.models import LedgerEntry, User
from tests.conftest import png_bytes, upload, wait_terminal
from tests.support import wait_for


def me(client, token: str) -> dict:
    return client.get("/api/me", headers={"Authorization": "Bearer " + token}).get_json()


def ledger_of(app, user_id: int) -> dict:
    with app.app_context():
        rows = db.session.execute(select(LedgerEntry.entry_type, func.count(), func.sum(LedgerEntry.amount))
                                  .where(LedgerEntry.user_id == user_id).group_by(LedgerEntry.entry_type)).all()
        return {entry_type: (count, total) for entry_type, count, total in rows}


def assert_books_balance(app, user_id: int) -> None:
    """The user's balance and held credits are exactly what the ledger says."""
    with app.app_context():
        user = db.session.get(User, user_id)
        entries = ledger_of(app, user_id)
        total = lambda kind: entries.get(kind, (0, 0))[1]  # noqa: E731
        assert user.balance == total("topup") - total("capture")
        assert user.held == total("hold") - total("capture") - total("release")


def test_twenty_concurrent_submissions_with_credit_for_ten(app, client, make_user, web_url):
    user_id, token = make_user(balance=10)  # photo.render costs 1
    image = png_bytes()
    availability: list[int] = []

    def submit(_: int) -> int:
        response = requests.post(web_url + "/api/photos", headers={"Authorization": "Bearer " + token},
                                 files={"file": ("p.png", image)}, data={"style": "sepia", "prompt": "[slow:300]"},
                                 timeout=30)
        availability.append(requests.get(web_url + "/api/me", headers={"Authorization": "Bearer " + token},
                                         timeout=30).json()["available"])
        return response.status_code

    with ThreadPoolExecutor(20) as pool:
        codes = sorted(pool.map(submit, range(20)))
    assert codes == [202] * 10 + [402] * 10
    assert min(availability) >= 0
    with app.app_context():
        photos = db.session.execute(select(func.count()).select_from(db.metadata.tables["photos"])
                                    .where(db.metadata.tables["photos"].c.user_id == user_id)).scalar()
    assert photos == 10  # a refused submission stores nothing
    refused = requests.post(web_url + "/api/photos", headers={"Authorization": "Bearer " + token},
                            files={"file": ("p.png", image)}, timeout=30).json()
    assert refused["error"]["code"] == "INSUFFICIENT_CREDITS" and "available" in refused["error"]["message"]
    wait_for(lambda: me(client, token)["available"] == me(client, token)["balance"], timeout=60,
             what="every hold to be settled")
    assert me(client, token)["balance"] == 0  # ten renders delivered, ten credits charged
    assert ledger_of(app, user_id)["capture"] == (10, 10)
    assert_books_balance(app, user_id)


def test_success_charges_the_price_once(app, client, make_user):
    user_id, token = make_user(balance=5)
    job_id = upload(client, token).get_json()["id"]
    assert me(client, token)["available"] == 4  # on hold while it runs
    wait_terminal(client, token, job_id)
    assert (me(client, token)["balance"], me(client, token)["available"]) == (4, 4)
    assert ledger_of(app, user_id) == {"topup": (1, 5), "hold": (1, 1), "capture": (1, 1)}
    assert_books_balance(app, user_id)


@pytest.mark.parametrize("prompt", ["[block:COPYRIGHT_VIOLATION]", "[invalid]"])
def test_blocks_and_failures_charge_nothing(app, client, make_user, prompt):
    user_id, token = make_user(balance=5)
    job_id = upload(client, token, prompt=prompt).get_json()["id"]
    wait_terminal(client, token, job_id)
    assert (me(client, token)["balance"], me(client, token)["available"]) == (5, 5)
    assert ledger_of(app, user_id) == {"topup": (1, 5), "hold": (1, 1), "release": (1, 1)}


def test_exhausted_retries_charge_nothing_and_notify_nobody(app, client, make_user):
    user_id, token = make_user(balance=5)
    job_id = upload(client, token, prompt="[fail:999]").get_json()["id"]
    assert wait_terminal(client, token, job_id, timeout=90)["status"] == "failed"
    assert (me(client, token)["balance"], me(client, token)["available"]) == (5, 5)
    assert ledger_of(app, user_id)["release"] == (1, 1) and "capture" not in ledger_of(app, user_id)
    inbox = client.get("/api/me/notifications", headers={"Authorization": "Bearer " + token}).get_json()
    assert inbox["items"] == []


def test_cancel_releases_the_hold(app, client, make_user, stack_env):
    from renderq.jobs import lifecycle

    user_id, token = make_user(balance=5)
    job_id = upload(client, token, prompt="[fail:999]").get_json()["id"]
    wait_for(lambda: client.get("/api/jobs/%s" % job_id, headers={"Authorization": "Bearer " + token})
             .get_json()["status"] == "retrying", what="a retry")
    with app.app_context():
        assert lifecycle.cancel(uuid.UUID(job_id), app.extensions["renderq.settings"])
        assert lifecycle.cancel(uuid.UUID(job_id), app.extensions["renderq.settings"]) is None  # terminal stays
    time.sleep(1.5)  # the pending retry message arrives and must step aside
    job = client.get("/api/jobs/%s" % job_id, headers={"Authorization": "Bearer " + token}).get_json()
    assert job["status"] == "canceled"
    assert (me(client, token)["balance"], me(client, token)["available"]) == (5, 5)
    assert ledger_of(app, user_id)["release"] == (1, 1)


def test_topup_command_adds_credits(app, client, make_user):
    user_id, token = make_user(balance=0)
    refused = upload(client, token)
    assert refused.status_code == 402
    with app.app_context():
        email = db.session.get(User, user_id).email
    result = app.test_cli_runner().invoke(args=["users", "topup", "--email", email, "--amount", "3"])
    assert result.exit_code == 0, result.output
    assert me(client, token)["balance"] == 3
    assert upload(client, token).status_code == 202
    bad = app.test_cli_runner().invoke(args=["users", "topup", "--email", email, "--amount", "0"])
    assert bad.exit_code != 0 and me(client, token)["balance"] == 3
