"""Every statement retention and ``batchd stats`` run: bounded deletes of
finished history and the sizes of what is kept.

A prune step is one short transaction over at most ``limit`` rows of its
table, claimed with SKIP LOCKED, so ingest, routing and other replicas'
steps never wait on it. Finished tasks go with everything keyed by them
(result, events, callbacks and their attempts) in one statement, so no step
leaves a half-deleted task behind. What is never a victim: failed tasks (the
manual queue, until replayed or dismissed), tasks not finished, tasks whose
batch is still live, tasks of a job still open, and tasks with a callback
still to deliver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# States retention may delete once finished long enough ago; 'failed' is not
# one of them. 'cancelled' is the jobs workstream's terminal state (DESIGN 13).
PRUNABLE = ("succeeded", "dismissed", "cancelled")
PRUNED_TABLES = (
    "tasks",
    "results",
    "task_events",
    "callbacks",
    "callback_attempts",
    "batches",
    "sync_spend",
    "client_spend",
)

_PRUNE_TASKS = text("""
WITH victims AS (
    SELECT t.id, t.batch_id FROM tasks t
    WHERE t.state IN ('succeeded', 'dismissed', 'cancelled') AND t.finished_at < :cutoff
      AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = t.batch_id AND b.state <> 'routed')
      AND NOT EXISTS (SELECT 1 FROM callbacks c
                      WHERE c.task_id = t.id AND c.state = 'pending')
      -- A job still open keeps all its tasks (its results stream reads them).
      AND (t.job IS NULL OR NOT EXISTS (
          SELECT 1 FROM jobs j WHERE j.client = t.client AND j.job = t.job
            AND j.finished_at IS NULL))
    ORDER BY t.finished_at LIMIT :limit
    FOR UPDATE OF t SKIP LOCKED
), marked AS (
    -- A batch that lost results no longer adds up to its ledger row: say so,
    -- so `batchd check` compares only the batches still whole.
    UPDATE batches b SET pruned_at = now()
    WHERE b.id = ANY(ARRAY(SELECT DISTINCT batch_id FROM victims)) AND b.pruned_at IS NULL
    RETURNING 1
), ids AS (
    -- Each table's rows found by its index, one probe a victim: a join
    -- could hash the whole table instead (a scan of every result a step).
    SELECT ARRAY(SELECT id FROM victims) AS task_ids
), r AS (
    DELETE FROM results x USING ids WHERE x.task_id = ANY(ids.task_ids) RETURNING 1
), e AS (
    DELETE FROM task_events x USING ids WHERE x.task_id = ANY(ids.task_ids) RETURNING 1
), cb AS (
    SELECT ARRAY(SELECT c.id FROM callbacks c, ids WHERE c.task_id = ANY(ids.task_ids))
        AS callback_ids
), ca AS (
    DELETE FROM callback_attempts a USING cb WHERE a.callback_id = ANY(cb.callback_ids)
    RETURNING 1
), c AS (
    DELETE FROM callbacks x USING cb WHERE x.id = ANY(cb.callback_ids) RETURNING 1
), t AS (
    DELETE FROM tasks x USING ids WHERE x.id = ANY(ids.task_ids) RETURNING 1
)
SELECT (SELECT count(*) FROM t) AS tasks, (SELECT count(*) FROM r) AS results,
       (SELECT count(*) FROM e) AS task_events, (SELECT count(*) FROM c) AS callbacks,
       (SELECT count(*) FROM ca) AS callback_attempts, (SELECT count(*) FROM marked) AS marked
""")

# A routed batch goes once no task and no result points at it any more (a
# failed task in the manual queue keeps its batch). A succeeded task points
# at it through its result (tasks_batch_held leaves succeeded tasks out).
_PRUNE_BATCHES = text("""
DELETE FROM batches WHERE id IN (
    SELECT b.id FROM batches b
    WHERE b.state = 'routed' AND b.routed_at < :cutoff
      AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.batch_id = b.id AND t.state <> 'succeeded')
      AND NOT EXISTS (SELECT 1 FROM results r WHERE r.batch_id = b.id)
    ORDER BY b.routed_at LIMIT :limit
    FOR UPDATE OF b SKIP LOCKED)
""")

# The synchronous lane's budget ledger: only a day's total matters, and only
# while the day is current; settled rows of rolled-up days go.
_PRUNE_SYNC_SPEND = text("""
DELETE FROM sync_spend WHERE id IN (
    SELECT id FROM sync_spend
    WHERE spend_day < :cutoff_day AND settled_at IS NOT NULL
    ORDER BY spend_day LIMIT :limit
    FOR UPDATE SKIP LOCKED)
""")

# The per-client budget ledger: like sync_spend, only the current day counts.
_PRUNE_CLIENT_SPEND = text("""
DELETE FROM client_spend WHERE id IN (
    SELECT id FROM client_spend WHERE spend_day < :cutoff_day
    ORDER BY spend_day LIMIT :limit
    FOR UPDATE SKIP LOCKED)
""")

_COUNT_DUE = text("""
SELECT
  (SELECT count(*) FROM tasks t
   WHERE t.state IN ('succeeded', 'dismissed', 'cancelled') AND t.finished_at < :cutoff
     AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.id = t.batch_id AND b.state <> 'routed')
     AND NOT EXISTS (SELECT 1 FROM callbacks c
                     WHERE c.task_id = t.id AND c.state = 'pending')
     AND (t.job IS NULL OR NOT EXISTS (
         SELECT 1 FROM jobs j WHERE j.client = t.client AND j.job = t.job
           AND j.finished_at IS NULL))) AS tasks,
  (SELECT count(*) FROM batches b WHERE b.state = 'routed' AND b.routed_at < :cutoff) AS batches,
  (SELECT count(*) FROM sync_spend
   WHERE spend_day < :cutoff_day AND settled_at IS NOT NULL) AS sync_spend
""")


@dataclass(slots=True)
class Pruned:
    """Rows deleted, by table."""

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRUNED_TABLES, 0))

    def add(self, table: str, n: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + n

    @property
    def total(self) -> int:
        return sum(self.rows.values())


async def prune_tasks(conn: AsyncConnection, cutoff: datetime, limit: int) -> Pruned:
    row = (await conn.execute(_PRUNE_TASKS, {"cutoff": cutoff, "limit": limit})).mappings().one()
    out = Pruned()
    for table in ("tasks", "results", "task_events", "callbacks", "callback_attempts"):
        out.add(table, int(row[table]))
    return out


async def prune_batches(conn: AsyncConnection, cutoff: datetime, limit: int) -> int:
    return (await conn.execute(_PRUNE_BATCHES, {"cutoff": cutoff, "limit": limit})).rowcount


async def prune_sync_spend(conn: AsyncConnection, cutoff_day: date, limit: int) -> int:
    return (
        await conn.execute(_PRUNE_SYNC_SPEND, {"cutoff_day": cutoff_day, "limit": limit})
    ).rowcount


async def prune_client_spend(conn: AsyncConnection, cutoff_day: date, limit: int) -> int:
    return (
        await conn.execute(_PRUNE_CLIENT_SPEND, {"cutoff_day": cutoff_day, "limit": limit})
    ).rowcount


async def count_due(conn: AsyncConnection, cutoff: datetime) -> dict[str, int]:
    """What a prune with this cutoff would delete (tasks with their rows,
    routed batches, settled sync ledger rows): ``batchd prune --dry-run``."""
    row = (
        (await conn.execute(_COUNT_DUE, {"cutoff": cutoff, "cutoff_day": cutoff.date()}))
        .mappings()
        .one()
    )
    return {k: int(v) for k, v in row.items()}


async def oldest_prunable(conn: AsyncConnection) -> datetime | None:
    """Finish time of the oldest task retention may delete (the prune's head)."""
    found: datetime | None = (
        await conn.execute(
            text("""
        SELECT min(finished_at) FROM tasks
        WHERE state IN ('succeeded', 'dismissed', 'cancelled')""")
        )
    ).scalar_one()
    return found


async def database_bytes(conn: AsyncConnection) -> int:
    return int(
        (await conn.execute(text("SELECT pg_database_size(current_database())"))).scalar_one()
    )


# ------------------------------------------------------------------ stats

_TABLE_SIZES = text("""
SELECT c.relname AS name, pg_total_relation_size(c.oid) AS total,
       pg_relation_size(c.oid) AS heap, pg_indexes_size(c.oid) AS indexes,
       coalesce(pg_total_relation_size(c.reltoastrelid), 0) AS toast,
       greatest(c.reltuples, 0)::bigint AS rows_estimate,
       coalesce(s.n_dead_tup, 0) AS dead_rows
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p')
ORDER BY total DESC, name
""")

_INDEX_SIZES = text("""
SELECT i.relname AS name, t.relname AS table_name, pg_relation_size(i.oid) AS bytes
FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = current_schema()
ORDER BY bytes DESC, name
""")

_OLDEST = text("""
SELECT (SELECT min(created_at) FROM tasks) AS tasks,
       (SELECT min(finished_at) FROM tasks
        WHERE state IN ('succeeded', 'dismissed', 'cancelled')) AS finished_tasks,
       (SELECT min(finished_at) FROM tasks WHERE state = 'failed') AS manual_queue,
       (SELECT min(created_at) FROM results) AS results,
       (SELECT min(created_at) FROM task_events) AS task_events,
       (SELECT min(routed_at) FROM batches WHERE state = 'routed') AS batches,
       (SELECT min(day) FROM rollup_days) AS first_rolled_up_day,
       (SELECT max(day) FROM rollup_days) AS last_rolled_up_day
""")


async def table_sizes(conn: AsyncConnection) -> list[dict[str, Any]]:
    return [dict(r) for r in (await conn.execute(_TABLE_SIZES)).mappings()]


async def index_sizes(conn: AsyncConnection) -> list[dict[str, Any]]:
    return [dict(r) for r in (await conn.execute(_INDEX_SIZES)).mappings()]


async def tasks_by_state(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(text("SELECT state, count(*) FROM tasks GROUP BY state"))
    return {r[0]: int(r[1]) for r in rows}


async def oldest_rows(conn: AsyncConnection) -> dict[str, Any]:
    return dict((await conn.execute(_OLDEST)).mappings().one())
