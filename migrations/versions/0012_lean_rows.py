"""fewer bytes a settled task: no index entry for a succeeded task's batch, no
key copies in task_events

Measured by the benchmark's storage row (README "Running it for a year"):

* ``tasks_batch`` (batch_id, id) held an entry for every version of every
  task that ever sat in a batch, ~110 bytes a settled task. Its readers want
  a batch's tasks that are still in flight, in the manual queue or dismissed
  (routing, the requeue of a lost batch, retention's "does a task still
  point at this batch"); a succeeded task is found through its result
  (``results_batch``). ``tasks_batch_held`` indexes only tasks not succeeded,
  so a task leaves it when it succeeds and VACUUM gives the space back.
* ``task_events_custom_id`` had no reader left once the client key came
  (every reader goes by task_id), ~42 bytes a task.
* task_events.custom_id and task_events.client copied the task's key into
  each event (~20 bytes a task); every reader joins tasks by task_id, so
  batchd stops writing them. The columns become nullable and stay (events
  stored before keep their copies): a replica of the release before, still
  running while the upgrade rolls out, writes them, and dropping a column it
  writes would fail its inserts. A later release may drop them.
  results keeps its copy of custom_id: that replica pages GET /v1/results
  from it, and would hand out results without their custom_id.

All online: DROP NOT NULL changes only the catalog (under a 5 s lock_timeout,
so a long transaction in the way makes it fail fast instead of queueing every
writer), indexes are built and dropped CONCURRENTLY, nothing is backfilled.

The downgrade refills the events' copies from tasks in steps of 5,000 rows, sets NOT
NULL again through a CHECK validated without blocking writes, and rebuilds
both indexes concurrently.

Revision ID: 0012_lean_rows
Revises: 0011_client_task_key
Create Date: 2026-12-06 05:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = '0012_lean_rows'
down_revision: str | None = '0011_client_task_key'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STEP = 5000
_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '5s'"


def upgrade() -> None:
    op.execute(_LOCK_TIMEOUT)
    op.execute("ALTER TABLE task_events ALTER COLUMN custom_id DROP NOT NULL, "
               "ALTER COLUMN client DROP NOT NULL")
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_batch_held "
                   "ON tasks (batch_id, id) "
                   "WHERE batch_id IS NOT NULL AND state <> 'succeeded'")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS tasks_batch")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS task_events_custom_id")


def _in_steps(sql: str) -> None:
    bind = op.get_bind()
    while bind.execute(text(sql), {"step": _STEP}).rowcount:
        pass


def _not_null(table: str, column: str) -> None:
    """As 0011's: inside an autocommit block, so ADD CONSTRAINT's exclusive
    lock is not held through VALIDATE's scan."""
    name = f"{table}_{column}_not_null"
    op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({column} IS NOT NULL) "
               "NOT VALID")
    op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")
    op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL")
    op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_batch "
                   "ON tasks (batch_id, id) WHERE batch_id IS NOT NULL")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS task_events_custom_id "
                   "ON task_events (custom_id)")
        # An event whose task is gone (none should be: retention deletes them
        # together) gets a visible placeholder rather than blocking the way back.
        _in_steps("""
            UPDATE task_events e SET
                custom_id = coalesce((SELECT t.custom_id FROM tasks t WHERE t.id = e.task_id),
                                     '(task gone)'),
                client = coalesce((SELECT t.client FROM tasks t WHERE t.id = e.task_id),
                                  'local')
            WHERE e.id IN (SELECT id FROM task_events
                           WHERE custom_id IS NULL OR client IS NULL LIMIT :step)""")
    with op.get_context().autocommit_block():
        op.execute("SET lock_timeout = '5s'")
        _not_null("task_events", "custom_id")
        _not_null("task_events", "client")
        op.execute("RESET lock_timeout")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS tasks_batch_held")
