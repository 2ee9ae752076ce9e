"""idempotency keys by age

The cleanup deletes keys past their lifetime by `created_at`; without an index that DELETE read
the whole table on every run.

Revision ID: b7e4c2d91f06
Revises: 63517a4c6252
Create Date: 2026-11-29 03:20:00.000000

"""
from alembic import op

# revision identifiers, used by Alembic.
revision = 'b7e4c2d91f06'
down_revision = '63517a4c6252'
branch_labels = None
depends_on = None


def upgrade():
    op.create_index('ix_idempotency_keys_created_at', 'idempotency_keys', ['created_at'])


def downgrade():
    op.drop_index('ix_idempotency_keys_created_at', table_name='idempotency_keys')
