"""operator console: dismissed tasks, the action audit, indexes its pages read

- ``tasks.state`` may be ``dismissed``: a failed task an operator took out
  of the manual queue without replaying it (terminal; kept for lookup).
  The check is added NOT VALID and validated after, so only a share lock is
  held while the existing rows are checked.
- ``console_actions``: one row per console action (who, what, how many,
  which tasks), the audit the manual queue page shows.
- Indexes, built CONCURRENTLY so ingest and routing go on meanwhile:
  ``tasks_manual`` pages the manual queue newest first; ``tasks_finished``
  and ``results_created`` let a day of the report read that day's rows
  instead of every task and result ever stored; ``task_events_left_manual``
  replaces ``task_events_manual`` so a dismissal, like a replay, ends a
  task's stay in the manual queue as the report counts it.

Revision ID: 0007_console
Revises: 0006_results_batch
Create Date: 2026-12-06 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = '0007_console'
down_revision: str | None = '0006_results_batch'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_STATES = "'queued','submitted','succeeded','failed'"
_NEW_STATES = _OLD_STATES + ",'dismissed'"


def _state_check(states: str) -> None:
    op.execute("ALTER TABLE tasks DROP CONSTRAINT IF EXISTS task_state")
    op.execute(f"ALTER TABLE tasks ADD CONSTRAINT task_state CHECK (state IN ({states})) "
               "NOT VALID")
    op.execute("ALTER TABLE tasks VALIDATE CONSTRAINT task_state")


def upgrade() -> None:
    _state_check(_NEW_STATES)
    op.create_table(
        "console_actions",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("client", sa.Text),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("requested", sa.Integer, nullable=False),
        sa.Column("affected", sa.Integer, nullable=False),
        sa.Column("detail", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.text("now()")),
    )
    op.create_index("console_actions_client", "console_actions", ["client", "id"])
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_manual ON tasks (id) "
                   "WHERE state = 'failed'")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_finished ON tasks "
                   "(finished_at) WHERE finished_at IS NOT NULL")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS results_created ON results "
                   "(created_at)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS task_events_left_manual ON "
                   "task_events (custom_id, id) "
                   "WHERE outcome IN ('failed', 'replayed', 'dismissed')")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS task_events_manual")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS task_events_manual ON "
                   "task_events (custom_id, id) WHERE outcome IN ('failed', 'replayed')")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS task_events_left_manual")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS results_created")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS tasks_finished")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS tasks_manual")
    op.drop_table("console_actions")
    # A dismissed task goes back to the manual queue it was taken out of.
    op.execute("UPDATE tasks SET state = 'failed' WHERE state = 'dismissed'")
    _state_check(_OLD_STATES)
