"""Replaying failed jobs in bulk (POST /api/admin/jobs/retry, `flask jobs retry`), end to end:
jobs fail for real at the reference generator, are replayed through the API, the CLI and
the single-job retry, and run the ladder again; the ledger gives every replay a hold of its own.

The session's database is shared with the other test modules, so every filter here is narrowed
to this module's own users (or to a time window of its own failures) and assertions are about
this module's jobs."""
from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import requests
from sqlalchemy import func, select

from renderq.db import db
from renderq.models import JobReplay, LedgerEntry, User
from tests.conftest import generator_calls, upload, wait_terminal
from tests.support import wait_for
from tests.test_billing import assert_books_balance, ledger_of, me

FAIL_THEN_SUCCEED = "[fail:9]"  # the first 9 calls answer 503 GENERATOR_BUSY: 1 + 5 retries + 3 background tries
# A job's ledger rows (generation, kind, amount) once it failed, was replayed, and succeeded or failed again.
FAILED_THEN_SUCCEEDED = [(0, "hold", 1), (0, "release", 1), (1, "capture", 1), (1, "hold", 1)]
FAILED_TWICE = [(0, "hold", 1), (0, "release", 1), (1, "hold", 1), (1, "release", 1)]
CREDIT_MESSAGE = "its user has not enough credits available for a new hold of its price"


def auth(token: str) -> dict:
    return {"Authorization": "Bearer " + token}


def submit_generate(client, token: str, prompt: str) -> dict:
    response = client.post("/api/jobs", json={"kind": "image.generate", "params": {"prompt": prompt}},
                           headers=auth(token))
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def failed(client, token: str, job_ids: list[str], timeout: float = 90) -> list[dict]:
    jobs = [wait_terminal(client, token, job_id, timeout=timeout) for job_id in job_ids]
    assert [job["status"] for job in jobs] == ["failed"] * len(jobs)
    return jobs


def replay(client, token: str, **body):
    return client.post("/api/admin/jobs/retry", json=body, headers=auth(token))


def email_of(app, user_id: int) -> str:
    with app.app_context():
        return db.session.get(User, user_id).email


def entries_by_generation(app, job_id: str) -> list[tuple[int, str, int]]:
    with app.app_context():
        return sorted(db.session.execute(select(LedgerEntry.generation, LedgerEntry.entry_type, LedgerEntry.amount)
                                         .where(LedgerEntry.job_id == uuid.UUID(job_id))).all())


def later(moment: str, microseconds: int = 1) -> str:
    return (datetime.fromisoformat(moment) + timedelta(microseconds=microseconds)).isoformat()


@pytest.fixture(scope="module")
def failures(app, stack):
    """Failed jobs of two users, for the (dry-run) filter tests: alice has two GENERATOR_BUSY
    failures (photo.render) and two INVALID_INPUT ones (one of each kind), bob one INVALID_INPUT."""
    client, runner = app.test_client(), app.test_cli_runner()

    def user(admin: bool = False) -> tuple[int, str]:
        output = runner.invoke(args=["users", "create", "--email", "replay-%s@example.com" % uuid.uuid4().hex[:10],
                                     "--balance", "100"] + (["--admin"] if admin else [])).output
        return int(output.split()[2]), output.strip().splitlines()[-1]

    alice, bob, admin = user(), user(), user(admin=True)
    busy = [upload(client, alice[1], prompt=FAIL_THEN_SUCCEED).get_json()["id"] for _ in range(2)]
    invalid_photo = upload(client, alice[1], prompt="[invalid]").get_json()["id"]
    invalid_generate = submit_generate(client, alice[1], "[invalid]")["id"]
    bob_invalid = upload(client, bob[1], prompt="[invalid]").get_json()["id"]
    jobs = {job["id"]: job for job in failed(client, alice[1], busy + [invalid_photo, invalid_generate])
            + failed(client, bob[1], [bob_invalid])}
    return dict(alice=alice, bob=bob, admin=admin, busy=busy, invalid_photo=invalid_photo,
                invalid_generate=invalid_generate, bob_invalid=bob_invalid, jobs=jobs)


def dry_run(client, failures, **body) -> set[str]:
    response = replay(client, failures["admin"][1], dry_run=True, **body)
    assert response.status_code == 200, response.get_json()
    answer = response.get_json()
    assert answer["dry_run"] is True and answer["id"] is None and answer["skipped"] == 0
    assert answer["replayed"] == len(answer["replayed_jobs"])
    return set(answer["replayed_jobs"])


def test_filters_select_by_error_code_kind_user_time_and_limit(client, failures):
    alice, bob = failures["alice"][0], failures["bob"][0]
    busy, invalid_photo = set(failures["busy"]), failures["invalid_photo"]
    invalid_generate = failures["invalid_generate"]
    assert dry_run(client, failures, user_id=alice, limit=100) == busy | {invalid_photo, invalid_generate}
    assert dry_run(client, failures, user_id=alice, error_code="GENERATOR_BUSY", limit=100) == busy
    assert dry_run(client, failures, user_id=alice, error_code="GENERATOR_UNAVAILABLE", limit=100) == busy
    assert dry_run(client, failures, user_id=alice, error_code="INVALID_INPUT", limit=100) == {invalid_photo,
                                                                                               invalid_generate}
    assert dry_run(client, failures, user_id=alice, error_code="TIME_LIMIT", limit=100) == set()
    assert dry_run(client, failures, user_id=alice, kind="image.generate", limit=100) == {invalid_generate}
    assert dry_run(client, failures, user_id=bob, status="failed", limit=100) == {failures["bob_invalid"]}
    alices = [failures["jobs"][job_id] for job_id in busy | {invalid_photo, invalid_generate}]
    oldest_first = [job["id"] for job in sorted(alices, key=lambda job: (datetime.fromisoformat(job["completed_at"]),
                                                                         job["id"]))]
    assert dry_run(client, failures, user_id=alice, limit=1) == set(oldest_first[:1])
    assert dry_run(client, failures, user_id=alice, limit=3) == set(oldest_first[:3])


def test_an_error_code_alone_matches_every_user_with_that_failure(client, failures):
    matched = dry_run(client, failures, error_code="INVALID_INPUT", limit=10_000)
    assert {failures["invalid_photo"], failures["invalid_generate"], failures["bob_invalid"]} <= matched
    assert not set(failures["busy"]) & matched


def test_the_time_window_is_when_the_job_failed(client, failures):
    alice = failures["alice"][0]
    first, second = sorted((failures["jobs"][job_id]["completed_at"], job_id) for job_id in failures["busy"])
    window = dict(user_id=alice, error_code="GENERATOR_BUSY", limit=100)
    assert dry_run(client, failures, failed_after=first[0], failed_before=later(first[0]), **window) == {first[1]}
    assert dry_run(client, failures, failed_after=later(first[0]), **window) == {second[1]}
    assert dry_run(client, failures, failed_before=first[0], **window) == set()
    in_moscow = datetime.fromisoformat(first[0]).astimezone(timezone(timedelta(hours=3))).isoformat()
    assert dry_run(client, failures, failed_after=in_moscow, **window) == {first[1], second[1]}


def test_a_dry_run_changes_nothing(app, client, failures):
    alice_id, alice_token = failures["alice"]
    with app.app_context():
        replays_before = db.session.execute(select(func.count()).select_from(JobReplay)).scalar()
    ledger_before, account_before = ledger_of(app, alice_id), me(client, alice_token)
    assert len(dry_run(client, failures, user_id=alice_id, limit=100)) == 4
    for job_id, job in failures["jobs"].items():
        after = client.get("/api/jobs/%s" % job_id, headers=auth(failures["admin"][1])).get_json()
        assert (after["status"], after["attempts"]) == ("failed", job["attempts"])
        assert after["updated_at"] == job["updated_at"]
    assert ledger_of(app, alice_id) == ledger_before and me(client, alice_token) == account_before
    with app.app_context():
        assert db.session.execute(select(func.count()).select_from(JobReplay)).scalar() == replays_before


def test_replayed_jobs_run_the_ladder_again_and_are_charged_once_for_the_run_that_delivered(
        app, client, make_user, stack, generator):
    user_id, token = make_user(balance=5)
    admin = make_user(balance=0, admin=True)
    job_ids = [upload(client, token, prompt=FAIL_THEN_SUCCEED).get_json()["id"] for _ in range(2)]
    failed(client, token, job_ids)
    assert (me(client, token)["balance"], me(client, token)["available"]) == (5, 5)  # failures cost nothing

    answer = replay(client, admin[1], user_id=user_id, error_code="GENERATOR_UNAVAILABLE", limit=10).get_json()
    assert (answer["replayed"], answer["skipped"], answer["credits_held"]) == (2, 0, 2)
    assert set(answer["replayed_jobs"]) == set(job_ids) and answer["requested_by"] == email_of(app, admin[0])
    assert me(client, token)["available"] == 3  # held, or already captured
    for job_id in job_ids:
        done = wait_terminal(client, token, job_id)
        assert (done["status"], done["outcome"]) == ("completed", "succeeded")
        assert (done["attempts"], done["retry_count"]) == (1, 0)  # fresh counters
        assert generator_calls(generator, job_id)["calls"] == 10  # nine failed calls, then the replay's one
        assert entries_by_generation(app, job_id) == FAILED_THEN_SUCCEEDED
    assert (me(client, token)["balance"], me(client, token)["available"]) == (3, 3)
    assert ledger_of(app, user_id) == {"topup": (1, 5), "hold": (4, 4), "release": (2, 2), "capture": (2, 2)}
    assert_books_balance(app, user_id)
    inbox = client.get("/api/me/notifications", headers=auth(token)).get_json()["items"]
    assert sorted((item["job_id"], item["event"]) for item in inbox) == sorted((job, "succeeded") for job in job_ids)

    listed = client.get("/api/admin/replays?limit=5", headers=auth(admin[1])).get_json()["items"]
    [record] = [item for item in listed if item["id"] == answer["id"]]
    assert record["filter"] == {"status": "failed", "error_code": "GENERATOR_UNAVAILABLE", "user_id": user_id,
                                "limit": 10}
    assert (record["replayed"], record["skipped"], record["credits_held"]) == (2, 0, 2)
    assert record["requested_by"] == answer["requested_by"] and record["created_at"] == answer["created_at"]
    detail = client.get("/api/admin/replays/%d" % answer["id"], headers=auth(admin[1])).get_json()
    assert sorted(detail["replayed_jobs"]) == sorted(job_ids) and detail["skipped_jobs"] == []
    internal = client.get("/api/admin/api-requests?user_id=%d" % user_id, headers=auth(admin[1])).get_json()
    assert [job["generation"] for job in internal["items"]] == [1, 1]


def test_a_user_without_the_credit_is_skipped_with_the_reason(app, client, make_user, stack):
    carol, dave = make_user(balance=3), make_user(balance=1)
    admin = make_user(balance=0, admin=True)
    carol_job = upload(client, carol[1], prompt="[invalid]").get_json()["id"]
    dave_job = upload(client, dave[1], prompt="[invalid]").get_json()["id"]
    jobs = failed(client, carol[1], [carol_job]) + failed(client, dave[1], [dave_job])
    # Dave's one credit is on hold for a slow job while the replay runs.
    slow = upload(client, dave[1], prompt="[slow:6000]").get_json()["id"]
    assert me(client, dave[1])["available"] == 0
    window = dict(failed_after=min(job["completed_at"] for job in jobs),
                  failed_before=later(max(job["completed_at"] for job in jobs)))

    preview = replay(client, admin[1], error_code="INVALID_INPUT", limit=100, dry_run=True, **window).get_json()
    answer = replay(client, admin[1], error_code="INVALID_INPUT", limit=100, **window).get_json()
    for shown in (preview, answer):
        assert carol_job in shown["replayed_jobs"]
        assert {"job_id": dave_job, "user_id": dave[0], "reason": "INSUFFICIENT_CREDITS",
                "message": CREDIT_MESSAGE} in shown["skipped_jobs"]
        assert shown["skipped_reasons"]["INSUFFICIENT_CREDITS"] >= 1
    assert client.get("/api/jobs/%s" % dave_job, headers=auth(dave[1])).get_json()["status"] == "failed"
    assert entries_by_generation(app, dave_job) == [(0, "hold", 1), (0, "release", 1)]
    detail = client.get("/api/admin/replays/%d" % answer["id"], headers=auth(admin[1])).get_json()
    assert detail["skipped"] == answer["skipped"] and dave_job in [skip["job_id"] for skip in detail["skipped_jobs"]]

    refused = client.post("/api/admin/jobs/%s/retry" % dave_job, headers=auth(admin[1]))
    assert refused.status_code == 402 and refused.get_json()["error"]["code"] == "INSUFFICIENT_CREDITS"
    wait_terminal(client, dave[1], slow)
    assert me(client, dave[1])["available"] == 0  # the slow job was charged
    result = app.test_cli_runner().invoke(args=["users", "topup", "--email", email_of(app, dave[0]), "--amount", "1"])
    assert result.exit_code == 0, result.output
    retried = client.post("/api/admin/jobs/%s/retry" % dave_job, headers=auth(admin[1]))
    assert retried.status_code == 200 and retried.get_json()["status"] in ("pending", "processing", "failed")
    assert wait_terminal(client, dave[1], dave_job)["status"] == "failed"  # [invalid] fails again, for free
    assert entries_by_generation(app, dave_job) == FAILED_TWICE
    assert (me(client, dave[1])["balance"], me(client, dave[1])["available"]) == (1, 1)
    assert_books_balance(app, dave[0])
    [single] = [item for item in client.get("/api/admin/replays", headers=auth(admin[1])).get_json()["items"]
                if item["filter"].get("job_id") == dave_job]
    assert (single["replayed"], single["filter"]["limit"]) == (1, 1)


def test_only_admins_may_replay_or_read_the_record(client, make_user, stack):
    _, token = make_user()
    assert replay(client, token, limit=1, dry_run=True).status_code == 403
    assert client.get("/api/admin/replays", headers=auth(token)).status_code == 403
    assert client.get("/api/admin/replays/1", headers=auth(token)).status_code == 403
    assert client.post("/api/admin/jobs/retry", json={"limit": 1}).status_code == 401


@pytest.mark.parametrize("body, code, says", [
    ({"limit": 5, "dry_run": True, "errorcode": "X"}, "INVALID_BODY", "Unknown fields: errorcode"),
    ({"status": "completed", "limit": 5}, "INVALID_STATUS", "Only failed jobs"),
    ({"dry_run": True}, "INVALID_LIMIT", "limit is required"),
    ({"limit": 0}, "INVALID_LIMIT", "from 1 to 10000"),
    ({"limit": 10_001}, "INVALID_LIMIT", "from 1 to 10000"),
    ({"limit": "5"}, "INVALID_LIMIT", "whole number"),
    ({"limit": True}, "INVALID_LIMIT", "whole number"),
    ({"limit": 5, "failed_after": "yesterday"}, "INVALID_TIME", "failed_after must be an ISO 8601 time"),
    ({"limit": 5, "failed_before": "2026-11-28T14:00:00"}, "INVALID_TIME", "UTC offset"),
    ({"limit": 5, "failed_after": "2026-11-28T15:00:00Z", "failed_before": "2026-11-28T14:00:00Z"},
     "INVALID_TIME_WINDOW", "earlier than failed_before"),
    ({"limit": 5, "error_code": "generator busy"}, "INVALID_ERROR_CODE", "GENERATOR_UNAVAILABLE"),
    ({"limit": 5, "kind": "video.render"}, "INVALID_KIND", "image.generate, photo.render"),
    ({"limit": 5, "user_id": "7"}, "INVALID_USER_ID", "whole number"),
    ({"limit": 5, "dry_run": "yes"}, "INVALID_DRY_RUN", "true or false"),
    ([{"limit": 5}], "INVALID_BODY", "JSON object"),
])
def test_bad_filters_are_refused_with_400_saying_what_to_fix(client, make_user, body, code, says):
    _, admin = make_user(balance=0, admin=True)
    response = client.post("/api/admin/jobs/retry", json=body, headers=auth(admin))
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["code"] == code and says in response.get_json()["error"]["message"]


def test_a_missing_user_is_404_and_a_body_that_is_not_json_415(client, make_user):
    _, admin = make_user(balance=0, admin=True)
    assert replay(client, admin, user_id=2 ** 62, limit=5).status_code == 404
    response = client.post("/api/admin/jobs/retry", data="limit=5", headers=auth(admin))
    assert response.status_code == 415
    assert client.get("/api/admin/replays/%d" % 2 ** 62, headers=auth(admin)).status_code == 404
    assert client.get("/api/admin/replays?cursor=abc", headers=auth(admin)).status_code == 400


def test_concurrent_replays_of_the_same_filter_replay_each_job_once(app, client, make_user, web_url, generator):
    user_id, token = make_user(balance=100)
    admin = make_user(balance=0, admin=True)
    job_ids = [upload(client, token, prompt="[invalid]").get_json()["id"] for _ in range(40)]
    failed(client, token, job_ids)
    barrier, answers = threading.Barrier(4), []

    def replay_now() -> None:
        barrier.wait()
        answers.append(requests.post(web_url + "/api/admin/jobs/retry", headers=auth(admin[1]), timeout=60,
                                     json={"user_id": user_id, "error_code": "INVALID_INPUT", "limit": 100}))

    threads = [threading.Thread(target=replay_now) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answer.status_code for answer in answers] == [200] * 4
    replayed = [job_id for answer in answers for job_id in answer.json()["replayed_jobs"]]
    assert sorted(replayed) == sorted(job_ids)  # each exactly once, across the four
    assert sum(answer.json()["credits_held"] for answer in answers) == 40
    for job_id in job_ids:
        assert wait_terminal(client, token, job_id)["status"] == "failed"
    wait_for(lambda: me(client, token)["available"] == 100, what="every replay's hold to be released")
    for job_id in job_ids:
        assert entries_by_generation(app, job_id) == FAILED_TWICE
        assert generator_calls(generator, job_id)["calls"] == 2
    assert ledger_of(app, user_id) == {"topup": (1, 100), "hold": (80, 80), "release": (80, 80)}
    assert_books_balance(app, user_id)


def test_the_cli_replays_and_prints_the_counts_and_the_skipped_reasons(app, client, make_user, stack):
    user_id, token = make_user(balance=1)
    first = upload(client, token, prompt="[invalid]").get_json()["id"]
    jobs = failed(client, token, [first])
    second = upload(client, token, prompt="[invalid]").get_json()["id"]
    jobs += failed(client, token, [second])
    slow = upload(client, token, prompt="[slow:4000]").get_json()["id"]  # holds the one credit meanwhile
    runner, email = app.test_cli_runner(), email_of(app, user_id)
    arguments = ["jobs", "retry", "--user-email", email, "--error-code", "INVALID_INPUT", "--kind", "photo.render",
                 "--failed-after", jobs[0]["completed_at"], "--failed-before", later(jobs[1]["completed_at"]),
                 "--limit", "10"]

    preview = runner.invoke(args=arguments + ["--dry-run"])
    assert preview.exit_code == 0, preview.output
    assert preview.output.splitlines()[0] == ("dry run: would replay 0 failed job(s), skip 2; would hold 0 credit(s); "
                                              "nothing changed")
    assert "skipped 2: INSUFFICIENT_CREDITS (%s)" % CREDIT_MESSAGE in preview.output
    assert "%s user %d INSUFFICIENT_CREDITS" % (first, user_id) in preview.output
    wait_terminal(client, token, slow)
    runner.invoke(args=["users", "topup", "--email", email, "--amount", "1"])  # now 1 available: one fits
    result = runner.invoke(args=arguments)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("replay ")
    assert "replayed 1 failed job(s), skipped 1; held 1 credit(s)" in result.output
    assert "%s user %d INSUFFICIENT_CREDITS" % (second, user_id) in result.output  # the oldest failure went first
    assert wait_terminal(client, token, first)["status"] == "failed" and len(entries_by_generation(app, first)) == 4
    with app.app_context():
        record = db.session.execute(select(JobReplay).order_by(JobReplay.id.desc()).limit(1)).scalar_one()
        assert record.requested_by.startswith("cli:") and record.job_ids == [first]
        assert record.skipped_reasons == {"INSUFFICIENT_CREDITS": 1} and record.filter["user_id"] == user_id

    for bad, says in [(["--failed-after", "yesterday"], "failed_after must be an ISO 8601 time"),
                      (["--limit", "0"], "limit is required"), (["--user-email", "nobody@example.com"], "no user")]:
        refused = runner.invoke(args=["jobs", "retry", "--limit", "5"] + bad)
        assert refused.exit_code == 2 and says in refused.output, refused.output
    assert runner.invoke(args=["jobs", "retry"]).exit_code == 2  # --limit is required
