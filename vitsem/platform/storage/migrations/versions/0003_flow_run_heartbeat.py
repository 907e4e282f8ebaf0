"""flow run heartbeat: the host and process of a run and when it last showed life

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 17:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('flow_runs') as batch:
        batch.add_column(sa.Column('host', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('pid', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_flow_runs_status', 'flow_runs', ['status'])


def downgrade() -> None:
    op.drop_index('ix_flow_runs_status', table_name='flow_runs')
    with op.batch_alter_table('flow_runs') as batch:
        batch.drop_column('heartbeat_at')
        batch.drop_column('pid')
        batch.drop_column('host')
