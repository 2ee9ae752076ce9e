"""counters kept as jobs move

Counts of jobs by kind, status, outcome and retry_count, and counters of attempts, that the
stats views and /metrics read in constant time, whatever the size of the tables.

- Jobs: statement-level triggers append the net change of every INSERT, UPDATE and DELETE
  on jobs to job_count_deltas, in the same transaction (exact, and no row is shared between
  writers, so no lock is waited for); the maintenance consumer folds the deltas into
  job_counts, and readers add what is not folded yet.
- Attempts: job_attempts rows are only ever added, so the folding reads the rows past a
  watermark into all-time totals (Prometheus counters: they never go down, even when cleanup
  deletes old attempts) and per-minute duration buckets (percentiles of the last hour).

Revision ID: 9f790b1e58e9
Revises: 694101dc99b8
Create Date: 2026-11-28 23:50:00

"""
from alembic import op

# revision identifiers, used by Alembic.
revision = '9f790b1e58e9'
down_revision = '694101dc99b8'
branch_labels = None
depends_on = None

DURATION_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000)

TRIGGER_FUNCTION = """
CREATE FUNCTION renderq_count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    INSERT INTO job_count_deltas (kind, status, outcome, retry_count, delta)
    SELECT kind, status, coalesce(outcome, ''), retry_count, count(*) FROM new_rows GROUP BY 1, 2, 3, 4;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO job_count_deltas (kind, status, outcome, retry_count, delta)
    SELECT kind, status, coalesce(outcome, ''), retry_count, -count(*) FROM old_rows GROUP BY 1, 2, 3, 4;
  ELSE
    INSERT INTO job_count_deltas (kind, status, outcome, retry_count, delta)
    SELECT kind, status, outcome, retry_count, sum(delta) FROM (
        SELECT kind, status, coalesce(outcome, '') AS outcome, retry_count, 1 AS delta FROM new_rows
        UNION ALL
        SELECT kind, status, coalesce(outcome, ''), retry_count, -1 FROM old_rows) AS changes
    GROUP BY 1, 2, 3, 4 HAVING sum(delta) <> 0;
  END IF;
  RETURN NULL;
END $$;
"""


def upgrade():
    op.execute("""
        CREATE TABLE job_counts (
            kind varchar(64) NOT NULL, status varchar(32) NOT NULL, outcome varchar(16) NOT NULL,
            retry_count integer NOT NULL, count bigint NOT NULL,
            PRIMARY KEY (kind, status, outcome, retry_count));
        CREATE TABLE job_count_deltas (
            id bigserial PRIMARY KEY, kind varchar(64) NOT NULL, status varchar(32) NOT NULL,
            outcome varchar(16) NOT NULL, retry_count integer NOT NULL, delta bigint NOT NULL);
        CREATE TABLE attempt_totals (
            kind varchar(64) NOT NULL, tier varchar(16) NOT NULL, outcome varchar(16) NOT NULL,
            retry boolean NOT NULL, count bigint NOT NULL, duration_ms bigint NOT NULL,
            PRIMARY KEY (kind, tier, outcome, retry));
        CREATE TABLE attempt_buckets (
            kind varchar(64) NOT NULL, le_ms integer NOT NULL, count bigint NOT NULL,
            PRIMARY KEY (kind, le_ms));
        CREATE TABLE attempt_minutes (
            kind varchar(64) NOT NULL, minute timestamptz NOT NULL, le_ms integer NOT NULL,
            count bigint NOT NULL, PRIMARY KEY (minute, kind, le_ms));
        CREATE TABLE counter_watermarks (name varchar(64) PRIMARY KEY, last_id bigint NOT NULL);
    """)
    op.execute(TRIGGER_FUNCTION)
    op.execute("""
        CREATE TRIGGER jobs_counted_on_insert AFTER INSERT ON jobs REFERENCING NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION renderq_count_jobs();
        CREATE TRIGGER jobs_counted_on_update AFTER UPDATE ON jobs REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
            FOR EACH STATEMENT EXECUTE FUNCTION renderq_count_jobs();
        CREATE TRIGGER jobs_counted_on_delete AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_rows
            FOR EACH STATEMENT EXECUTE FUNCTION renderq_count_jobs();
        INSERT INTO job_counts SELECT kind, status, coalesce(outcome, ''), retry_count, count(*) FROM jobs
            GROUP BY 1, 2, 3, 4;
        INSERT INTO counter_watermarks SELECT 'job_attempts', coalesce(max(id), 0) FROM job_attempts;
        INSERT INTO attempt_totals SELECT kind, tier, outcome, number > 1, count(*), sum(duration_ms)
            FROM job_attempts GROUP BY 1, 2, 3, 4;
    """)
    buckets = "ARRAY[%s]" % ", ".join(str(bound) for bound in DURATION_BUCKETS_MS)
    op.execute("""
        INSERT INTO attempt_buckets
        SELECT kind, coalesce((SELECT min(b) FROM unnest(%s) AS b WHERE duration_ms <= b), -1), count(*)
          FROM job_attempts WHERE outcome <> 'lost' GROUP BY 1, 2;
    """ % buckets)
    op.create_index("ix_jobs_waiting_since", "jobs", ["created_at"], postgresql_where="status = 'pending'")


def downgrade():
    op.drop_index("ix_jobs_waiting_since", "jobs")
    op.execute("""
        DROP TRIGGER jobs_counted_on_insert ON jobs;
        DROP TRIGGER jobs_counted_on_update ON jobs;
        DROP TRIGGER jobs_counted_on_delete ON jobs;
        DROP FUNCTION renderq_count_jobs();
        DROP TABLE job_counts, job_count_deltas, attempt_totals, attempt_buckets, attempt_minutes, counter_watermarks;
    """)
