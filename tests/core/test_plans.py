"""What runs every few seconds, on the plan PostgreSQL keeps for it once psycopg has prepared
it: it still reads its partial index, not every job of that status."""
from __future__ import annotations

from sqlalchemy import text

from renderq.db import db
from tests.core.conftest import generic_plan, new_user
from webapp import metrics


def test_a_scrape_finds_the_oldest_pending_job_without_reading_every_pending_job(ctx):
    user = new_user(balance=0)
    db.session.execute(text(  # a backlog: thousands of pending jobs, most of them already sent
        "INSERT INTO jobs (id, user_id, kind, params, price, status, attempts, retry_count, fair_tag, dispatch_token, "
        "created_at) SELECT gen_random_uuid(), :user_id, 'image.generate', '{}', 1, 'pending', 0, 0, number, "
        "gen_random_uuid(), now() - number * interval '1 second' FROM generate_series(1, 5000) AS number"),
        {"user_id": user.id})
    db.session.execute(text("ANALYZE jobs"))
    db.session.commit()
    plan = generic_plan(metrics.OLDEST_PENDING)
    assert "ix_jobs_waiting_since" in plan and "ix_jobs_status_kind" not in plan, plan
