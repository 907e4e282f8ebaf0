"""audit findings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:20:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audit_findings',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('audit_digest', sa.String(length=64), nullable=False),
        sa.Column('model_checksum', sa.String(length=64), nullable=False),
        sa.Column('dataset_id', sa.Integer(), nullable=False),
        sa.Column('map_name', sa.String(length=32), nullable=False),
        sa.Column('rank', sa.Integer(), nullable=False),
        sa.Column('class_name', sa.String(length=256), nullable=False),
        sa.Column('confirmed', sa.Boolean(), nullable=False),
        sa.Column('shortcut', sa.Boolean(), nullable=False),
        sa.Column('confidence', sa.Float(), nullable=False),
        sa.Column('effect', sa.Float(), nullable=True),
        sa.Column('random_effect', sa.Float(), nullable=True),
        sa.Column('evidence', sa.JSON(), nullable=False),
        sa.Column('report_uri', sa.String(length=1024), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('audit_digest', 'map_name', 'rank', name='uq_audit_finding'),
    )
    op.create_index(op.f('ix_audit_findings_audit_digest'), 'audit_findings', ['audit_digest'],
                    unique=False)
    op.create_index(op.f('ix_audit_findings_model_checksum'), 'audit_findings',
                    ['model_checksum'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_audit_findings_model_checksum'), table_name='audit_findings')
    op.drop_index(op.f('ix_audit_findings_audit_digest'), table_name='audit_findings')
    op.drop_table('audit_findings')
