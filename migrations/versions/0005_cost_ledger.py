"""cost ledger: unattributed batch cost, unpriced flags, manual-queue index

Revision ID: 0005_cost_ledger
Revises: 0004_queue_lane
Create Date: 2026-12-01 08:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005_cost_ledger'
down_revision: str | None = '0004_queue_lane'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Constant defaults: PostgreSQL 11+ adds these without rewriting the table.
    op.add_column('batches', sa.Column('unattributed_cost_usd', sa.Numeric(24, 12),
                                       server_default='0', nullable=False))
    op.add_column('batches', sa.Column('unattributed_lines', sa.Integer(),
                                       server_default='0', nullable=False))
    op.add_column('batches', sa.Column('unpriced', sa.Boolean(),
                                       server_default='false', nullable=False))
    op.add_column('results', sa.Column('unpriced', sa.Boolean(),
                                       server_default='false', nullable=False))
    op.create_index('task_events_manual', 'task_events', ['custom_id', 'id'], unique=False,
                    postgresql_where=sa.text("outcome IN ('failed', 'replayed')"))


def downgrade() -> None:
    op.drop_index('task_events_manual', table_name='task_events',
                  postgresql_where=sa.text("outcome IN ('failed', 'replayed')"))
    op.drop_column('results', 'unpriced')
    op.drop_column('batches', 'unpriced')
    op.drop_column('batches', 'unattributed_lines')
    op.drop_column('batches', 'unattributed_cost_usd')
