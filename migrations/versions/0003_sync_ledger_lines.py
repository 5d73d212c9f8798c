"""sync lane: spend ledger for the daily budget, batch line numbers, fallback action

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without defaults: adding them rewrites nothing.
    op.add_column('tasks', sa.Column('fallback_action', sa.Text(), nullable=True))
    op.add_column('tasks', sa.Column('batch_line', sa.Integer(), nullable=True))
    op.create_table('sync_spend',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('claim_id', sa.Text(), nullable=False),
    sa.Column('custom_id', sa.Text(), nullable=False),
    sa.Column('model', sa.Text(), nullable=False),
    sa.Column('spend_day', sa.Date(), nullable=False),
    sa.Column('reserved_usd', sa.Numeric(24, 12), nullable=False),
    sa.Column('cost_usd', sa.Numeric(24, 12), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
              nullable=False),
    sa.Column('settled_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('sync_spend_day', 'sync_spend', ['spend_day'], unique=False)
    op.create_index('sync_spend_claim', 'sync_spend', ['claim_id', 'custom_id'], unique=False)


def downgrade() -> None:
    op.drop_index('sync_spend_claim', table_name='sync_spend')
    op.drop_index('sync_spend_day', table_name='sync_spend')
    op.drop_table('sync_spend')
    op.drop_column('tasks', 'batch_line')
    op.drop_column('tasks', 'fallback_action')
