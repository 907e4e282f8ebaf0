"""review decisions: a person's shortcut / legitimate decision on a confirmed pattern

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 20:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'review_decisions',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('family', sa.String(length=256), nullable=False),
        sa.Column('class_name', sa.String(length=256), nullable=False),
        sa.Column('signature', sa.String(length=64), nullable=False),
        sa.Column('decision', sa.String(length=16), nullable=False),
        sa.Column('centroids', sa.JSON(), nullable=False),
        sa.Column('radii', sa.JSON(), nullable=False),
        sa.Column('excess_effect', sa.Float(), nullable=True),
        sa.Column('reviewer', sa.String(length=256), nullable=False),
        sa.Column('note', sa.Text(), nullable=False),
        sa.Column('finding_id', sa.Integer(), nullable=True),
        sa.Column('audit_digest', sa.String(length=64), nullable=True),
        sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('family', 'class_name', 'signature', name='uq_review_decision'),
    )
    op.create_index(op.f('ix_review_decisions_family'), 'review_decisions', ['family'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_review_decisions_family'), table_name='review_decisions')
    op.drop_table('review_decisions')
