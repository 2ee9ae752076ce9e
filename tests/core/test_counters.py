"""The attempt counters, read directly: folded counters plus the attempts not folded yet, the
same before and after a fold, and never an attempt counted twice when a fold lands between the
watermark's read and the counters' read."""
from __future__ import annotations

from datetime import datetime, timezone

from renderq import counters
from renderq.db import db
from renderq.enums import Status
from renderq.models import JobAttempt
from tests.core.conftest import new_job, new_user


def _succeeded() -> int:
    return sum(row.count for row in counters.attempt_totals() if row.outcome == "succeeded")


def _attempt(job_id, number: int) -> JobAttempt:
    return JobAttempt(job_id=job_id, number=number, tier="fast", kind="photo.render", outcome="succeeded",
                      started_at=datetime.now(timezone.utc), duration_ms=120)


def test_attempts_are_counted_once_before_after_and_across_a_fold(ctx, monkeypatch):
    before = _succeeded()
    job = new_job(new_user(), Status.PROCESSING)
    db.session.add_all([_attempt(job.id, 1), _attempt(job.id, 2)])
    db.session.commit()
    assert _succeeded() == before + 2  # not folded yet: counted from job_attempts
    assert counters.fold()
    db.session.commit()
    assert _succeeded() == before + 2  # folded: counted from attempt_totals
    assert counters.last_hour_percentiles(0.5)[0] >= 2

    # A fold lands after the watermark was read: the read that follows sees a newer watermark
    # in its snapshot and is repeated, rather than adding the folded attempts a second time.
    db.session.add(_attempt(job.id, 3))
    db.session.commit()
    read_watermark = db.session.execute
    stale = []

    def fold_after_the_watermark(statement, *args, **kwargs):
        result = read_watermark(statement, *args, **kwargs)
        if not stale and "SELECT last_id FROM counter_watermarks" in str(statement) and not args:
            stale.append(True)
            assert counters.fold()
            db.session.commit()
        return result

    monkeypatch.setattr(db.session, "execute", fold_after_the_watermark)
    assert _succeeded() == before + 3
    assert stale  # the fold did land in between
