"""retention and daily rollups; bodies dropped after success

* ``tasks.body`` may be NULL: a task's body is dropped when it succeeds in a
  batch (its input file is archived; replay only needs failed tasks' bodies).
  DROP NOT NULL changes the catalog only: no scan, no rewrite.
* ``batches.pruned_at`` (nullable, no default: a catalog change) marks a
  batch some of whose results retention deleted.
* Indexes the retention pass and the report's day ranges walk (routed
  batches by routing time, the sync ledger by settling time), built
  CONCURRENTLY outside the migration's transaction. Finished tasks by finish
  time and results by creation came with 0007_console.
* ``daily_rollups`` (one row per closed UTC day and client, provider, model,
  lane) and ``rollup_days`` (which days are rolled up): the report of a closed
  day reads these, so it survives the pruning of the rows it came from.

Every ALTER runs under a short lock_timeout: behind a long transaction it
fails fast (run it again) instead of queueing every writer behind it.
tests/migration/test_online.py holds inserts going while it runs.

Revision ID: 0010_retention
Revises: 0009_jobs
Create Date: 2026-12-06 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = '0010_retention'
down_revision: str | None = '0009_jobs'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MONEY = sa.Numeric(24, 12)
_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '5s'"


def upgrade() -> None:
    op.execute(_LOCK_TIMEOUT)
    op.execute("ALTER TABLE tasks ALTER COLUMN body DROP NOT NULL")
    op.execute(_LOCK_TIMEOUT)
    op.add_column("batches", sa.Column("pruned_at", sa.DateTime(timezone=True)))
    op.create_table(
        "daily_rollups",
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("client", sa.Text, nullable=False),
        sa.Column("provider", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("lane", sa.Text, nullable=False),
        sa.Column("tasks_in", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("succeeded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("failed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("cancelled", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("retried", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("replayed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("dismissed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("finished", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("finished_ok", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("spend_usd", _MONEY, nullable=False, server_default="0"),
        sa.Column("sync_usd", _MONEY, nullable=False, server_default="0"),
        sa.Column("unattributed_usd", _MONEY, nullable=False, server_default="0"),
        sa.Column("unpriced", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("lane_succeeded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("lane_failed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("lane_spend_usd", _MONEY, nullable=False, server_default="0"),
        sa.Column("latency", JSONB, nullable=False, server_default="{}"),
        sa.PrimaryKeyConstraint("day", "client", "provider", "model", "lane",
                                name="daily_rollups_pkey"),
    )
    op.create_table(
        "rollup_days",
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("rolled_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
    )
    with op.get_context().autocommit_block():
        op.execute("""CREATE INDEX CONCURRENTLY IF NOT EXISTS batches_routed ON batches (routed_at)
                      WHERE state = 'routed'""")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS sync_spend_settled "
                   "ON sync_spend (settled_at)")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for index in ("sync_spend_settled", "batches_routed"):
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
    op.drop_table("rollup_days")
    op.drop_table("daily_rollups")
    op.drop_column("batches", "pruned_at")
    # Bodiless successes keep an empty body: the older schema needs one, and
    # no row is lost.
    op.execute("UPDATE tasks SET body = '{}'::jsonb WHERE body IS NULL")
    op.execute(_LOCK_TIMEOUT)
    op.execute("ALTER TABLE tasks ALTER COLUMN body SET NOT NULL")
