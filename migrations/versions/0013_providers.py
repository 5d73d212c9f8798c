"""tasks and batches carry their provider; the window key is (provider, endpoint, model)

DESIGN section 14: a task is routed to a provider at ingest and a batch holds
one provider's tasks. Every existing row was sent to OpenAI, so both columns
take 'openai' as a constant default: PostgreSQL keeps such a default in the
catalog and adds the column without rewriting the table or touching a row,
so there is nothing to backfill; the brief catalog lock is taken under a 5 s
lock_timeout, so a long transaction in the way makes the upgrade fail fast
instead of queueing every writer behind it. batches.est_input_tokens (what a live batch
holds, for the providers' queued-token caps; 0 for old rows) and
batches.create_started_at (which send a provider batch without metadata came
from) are added the same way. The queued-window index leads with the
provider, so the scheduler's skip scan and claims stay index-only; it is
built CONCURRENTLY (no lock on writes) before the old one is dropped, also
concurrently; so is the small index that finds which row's create came last
before a given time (only rows whose create started have an entry).

Until every replica runs this revision, route nothing but OpenAI's
endpoints to OpenAI (no BATCHD_MODEL_ROUTES to another provider): an older
replica claims windows by (endpoint, model) and would send such tasks there.

Revision ID: 0013_providers
Revises: 0012_lean_rows
Create Date: 2026-12-06 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0013_providers'
down_revision: str | None = '0012_lean_rows'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("ALTER TABLE tasks ADD COLUMN provider text NOT NULL DEFAULT 'openai'")
    op.execute("ALTER TABLE batches ADD COLUMN provider text NOT NULL DEFAULT 'openai', "
               "ADD COLUMN est_input_tokens bigint NOT NULL DEFAULT 0, "
               "ADD COLUMN create_started_at timestamptz")
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_queued_provider ON tasks "
                   "(provider, endpoint, model, lane, not_before, id) WHERE state = 'queued'")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS tasks_queued_lane")
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS batches_create_started ON batches "
                   "(provider, create_started_at) WHERE create_started_at IS NOT NULL")


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_queued_lane ON tasks "
                   "(endpoint, model, lane, not_before, id) WHERE state = 'queued'")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS tasks_queued_provider")
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS batches_create_started")
    op.execute("ALTER TABLE batches DROP COLUMN create_started_at, "
               "DROP COLUMN est_input_tokens, DROP COLUMN provider")
    op.execute("ALTER TABLE tasks DROP COLUMN provider")
