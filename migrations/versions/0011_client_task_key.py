"""the task key is (client, custom_id); other tables follow tasks by id

Every task belongs to a client: rows stored without one (anonymous tokens,
no-token mode) take the client ``local``, and a custom_id is unique within
its client only. results, task_events, callbacks and sync_spend gain the
task's id (and results and task_events its client), so two clients sharing a
custom_id never meet there. batches gain ``own_line_ids``: true for a batch
whose input file carries batchd's per-attempt ids; batches built before this
revision (false) carry the caller's custom_id and are routed by it.
task_events_left_manual (custom_id, id) becomes task_events_left_manual_task
(task_id, id): a task's stay in the manual queue is its own, not its
custom_id's.

No long lock on a big table: columns are added without defaults that
rewrite, backfills run in steps of 5,000 rows each committed on its own,
NOT NULL is proven by a CHECK constraint validated without blocking writes
(each step its own transaction, under a 5 s lock_timeout),
and the new unique indexes are built CONCURRENTLY before the old ones go.

The downgrade keeps every row too, so it refuses (naming the rows) while two
clients share a custom_id: the old schema cannot hold both.

Revision ID: 0011_client_task_key
Revises: 0010_retention
Create Date: 2026-12-06 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = '0011_client_task_key'
down_revision: str | None = '0010_retention'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_STEP = 5000


def _in_steps(sql: str) -> None:
    """Run an UPDATE of at most ``:step`` rows until it changes none, each
    step its own transaction (inside an autocommit block)."""
    bind = op.get_bind()
    while bind.execute(text(sql), {"step": _STEP}).rowcount:
        pass


def _not_null(table: str, column: str) -> None:
    """SET NOT NULL without a table scan under an exclusive lock: a CHECK
    validated first (which lets writes go on) is what PostgreSQL trusts.
    Called inside an autocommit block, so each step is its own transaction:
    ADD CONSTRAINT's ACCESS EXCLUSIVE lock ends before VALIDATE scans the
    table (in one transaction it lasted the scans: 8.5 s of ingest held
    back at 10,000,000 tasks, the benchmark's migrations row), and each
    ALTER waits at most 5 s for its lock instead of queueing every writer
    behind a long transaction (run it again: every step is idempotent)."""
    name = f"{table}_{column}_not_null"
    op.execute(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
    op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {name} CHECK ({column} IS NOT NULL) "
               "NOT VALID")
    op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {name}")
    op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL")
    op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {name}")


def upgrade() -> None:
    op.execute("ALTER TABLE results ADD COLUMN IF NOT EXISTS task_id bigint, "
               "ADD COLUMN IF NOT EXISTS client text")
    op.execute("ALTER TABLE task_events ADD COLUMN IF NOT EXISTS task_id bigint, "
               "ADD COLUMN IF NOT EXISTS client text")
    op.execute("ALTER TABLE callbacks ADD COLUMN IF NOT EXISTS task_id bigint")
    op.execute("ALTER TABLE sync_spend ADD COLUMN IF NOT EXISTS task_id bigint")
    # A constant default is stored in the catalog, not written to each row;
    # it is false, so a batch an older replica builds still routes by custom_id.
    op.execute("ALTER TABLE batches ADD COLUMN IF NOT EXISTS own_line_ids boolean NOT NULL "
               "DEFAULT false")
    op.execute("ALTER TABLE tasks ALTER COLUMN client SET DEFAULT 'local'")
    with op.get_context().autocommit_block():
        _in_steps("""
            UPDATE tasks SET client = 'local' WHERE id IN (
                SELECT id FROM tasks WHERE client IS NULL LIMIT :step)""")
        # custom_id is still unique across tasks here, so it finds the task;
        # a row whose task is gone keeps its custom_id under 'local'. Each
        # step sets client on every row it picks, so the loop always ends.
        _in_steps("""
            UPDATE results r SET
                task_id = (SELECT t.id FROM tasks t WHERE t.custom_id = r.custom_id),
                client = coalesce((SELECT t.client FROM tasks t WHERE t.custom_id = r.custom_id),
                                  'local')
            WHERE r.seq IN (SELECT seq FROM results WHERE client IS NULL LIMIT :step)""")
        _in_steps("""
            UPDATE task_events e SET
                task_id = (SELECT t.id FROM tasks t WHERE t.custom_id = e.custom_id),
                client = coalesce((SELECT t.client FROM tasks t WHERE t.custom_id = e.custom_id),
                                  'local')
            WHERE e.id IN (SELECT id FROM task_events WHERE client IS NULL LIMIT :step)""")
        _in_steps("""
            UPDATE callbacks c SET task_id = t.id, client = t.client FROM tasks t
            WHERE t.custom_id = c.custom_id AND c.id IN (
                SELECT id FROM callbacks WHERE task_id IS NULL
                  AND EXISTS (SELECT 1 FROM tasks x WHERE x.custom_id = callbacks.custom_id)
                LIMIT :step)""")
        _in_steps("""
            UPDATE callbacks SET client = 'local' WHERE id IN (
                SELECT id FROM callbacks WHERE client IS NULL LIMIT :step)""")
        _in_steps("""
            UPDATE sync_spend s SET task_id = t.id FROM tasks t
            WHERE t.custom_id = s.custom_id AND s.id IN (
                SELECT id FROM sync_spend WHERE task_id IS NULL
                  AND EXISTS (SELECT 1 FROM tasks x WHERE x.custom_id = sync_spend.custom_id)
                LIMIT :step)""")
        op.execute("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS tasks_client_custom_id "
                   "ON tasks (client, custom_id)")
        op.execute("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS results_task "
                   "ON results (task_id)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS results_client "
                   "ON results (client, seq)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS task_events_task "
                   "ON task_events (task_id)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS task_events_left_manual_task "
                   "ON task_events (task_id, id) "
                   "WHERE outcome IN ('failed', 'replayed', 'dismissed')")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS callbacks_task "
                   "ON callbacks (task_id)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS sync_spend_claim_task "
                   "ON sync_spend (claim_id, task_id)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_failed_client "
                   "ON tasks (client, id) WHERE state = 'failed'")
        op.execute("SET lock_timeout = '5s'")
        _not_null("tasks", "client")
        _not_null("results", "client")
        _not_null("task_events", "client")
        op.execute("RESET lock_timeout")
    op.execute("ALTER TABLE tasks DROP CONSTRAINT IF EXISTS tasks_custom_id_key")
    op.execute("ALTER TABLE results DROP CONSTRAINT IF EXISTS results_custom_id_key")
    op.execute("DROP INDEX IF EXISTS task_events_left_manual")
    op.execute("DROP INDEX IF EXISTS sync_spend_claim")


def downgrade() -> None:
    bind = op.get_bind()
    shared = bind.execute(text("""
        SELECT custom_id FROM tasks GROUP BY custom_id HAVING count(*) > 1 LIMIT 5""")).all()
    if shared:
        raise RuntimeError(
            "cannot downgrade: clients share custom_ids (e.g. "
            f"{', '.join(r[0] for r in shared)}); the old schema keys tasks by custom_id "
            "alone and would lose one of each pair")
    op.execute("ALTER TABLE tasks ALTER COLUMN client DROP NOT NULL")
    op.execute("ALTER TABLE tasks ALTER COLUMN client DROP DEFAULT")
    with op.get_context().autocommit_block():
        op.execute("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS tasks_custom_id_key "
                   "ON tasks (custom_id)")
        op.execute("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS results_custom_id_key "
                   "ON results (custom_id)")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS task_events_left_manual "
                   "ON task_events (custom_id, id) "
                   "WHERE outcome IN ('failed', 'replayed', 'dismissed')")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS sync_spend_claim "
                   "ON sync_spend (claim_id, custom_id)")
        # Anonymous tasks were stored without a client before.
        _in_steps("""
            UPDATE tasks SET client = NULL WHERE id IN (
                SELECT id FROM tasks WHERE client = 'local' LIMIT :step)""")
        _in_steps("""
            UPDATE callbacks SET client = NULL WHERE id IN (
                SELECT id FROM callbacks WHERE client = 'local' LIMIT :step)""")
    op.execute("ALTER TABLE tasks ADD CONSTRAINT tasks_custom_id_key "
               "UNIQUE USING INDEX tasks_custom_id_key")
    op.execute("ALTER TABLE results ADD CONSTRAINT results_custom_id_key "
               "UNIQUE USING INDEX results_custom_id_key")
    for index in ("tasks_client_custom_id", "results_task", "results_client", "task_events_task",
                  "task_events_left_manual_task", "callbacks_task", "sync_spend_claim_task",
                  "tasks_failed_client"):
        op.execute(f"DROP INDEX IF EXISTS {index}")
    op.execute("ALTER TABLE results DROP COLUMN task_id, DROP COLUMN client")
    op.execute("ALTER TABLE task_events DROP COLUMN task_id, DROP COLUMN client")
    op.execute("ALTER TABLE callbacks DROP COLUMN task_id")
    op.execute("ALTER TABLE sync_spend DROP COLUMN task_id")
    op.execute("ALTER TABLE batches DROP COLUMN own_line_ids")
