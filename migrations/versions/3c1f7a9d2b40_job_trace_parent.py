"""the submitting request's trace context on each job

Revision ID: 3c1f7a9d2b40
Revises: 9f790b1e58e9
Create Date: 2026-12-02 10:00:00.000000

"""
from alembic import op
import sqlalchemy as sa

# revision identifiers, used by Alembic.
revision = '3c1f7a9d2b40'
down_revision = '9f790b1e58e9'
branch_labels = None
depends_on = None


def upgrade():
    # Nullable and without a default: adding it rewrites nothing, however many jobs there are.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('trace_parent', sa.String(length=64), nullable=True))


def downgrade():
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('trace_parent')
