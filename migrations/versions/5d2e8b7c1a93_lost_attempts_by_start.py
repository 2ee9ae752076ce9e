"""lost attempts by start

Every dispatch round counts the attempts lost in the last few minutes. Through the index on
every attempt's start that count read each attempt of those minutes, thousands a round under
load; lost attempts are a handful.

Revision ID: 5d2e8b7c1a93
Revises: b7e4c2d91f06
Create Date: 2026-11-29 23:50:00.000000

"""
import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = '5d2e8b7c1a93'
down_revision = 'b7e4c2d91f06'
branch_labels = None
depends_on = None


def upgrade():
    op.create_index('ix_job_attempts_lost', 'job_attempts', ['started_at'],
                    postgresql_where=sa.text("outcome = 'lost'"))


def downgrade():
    op.drop_index('ix_job_attempts_lost', table_name='job_attempts')
