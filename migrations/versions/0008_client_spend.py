"""client spend ledger for BATCHD_CLIENT_BUDGETS

Revision ID: 0008_client_spend
Revises: 0007_console
Create Date: 2026-12-06 02:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008_client_spend'
down_revision: str | None = '0007_console'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A new, empty table: no lock on anything that exists.
    op.create_table(
        'client_spend',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('spend_day', sa.Date(), nullable=False),
        sa.Column('client', sa.Text(), nullable=False),
        sa.Column('batch_id', sa.Text(), nullable=False),
        sa.Column('reserved_usd', sa.Numeric(24, 12), server_default='0', nullable=False),
        sa.Column('cost_usd', sa.Numeric(24, 12), server_default='0', nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('client_spend_day', 'client_spend', ['spend_day', 'client'])
    op.create_index('client_spend_batch', 'client_spend', ['batch_id'])


def downgrade() -> None:
    op.drop_index('client_spend_batch', table_name='client_spend')
    op.drop_index('client_spend_day', table_name='client_spend')
    op.drop_table('client_spend')
