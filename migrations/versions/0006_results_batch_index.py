"""results indexed by batch

Settling a batch sums and rounds the batch's results (``results WHERE
batch_id = ...``); without an index that is a scan of every result ever
stored, once per batch (about a second at 1,000,000 results, and growing with
history). Built CONCURRENTLY, outside the migration's transaction, so routing
goes on while it builds.

Revision ID: 0006_results_batch
Revises: 0005_cost_ledger
Create Date: 2026-12-01 08:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0006_results_batch'
down_revision: str | None = '0005_cost_ledger'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS results_batch ON results (batch_id)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS results_batch")
