"""Every statement of ``batchd check``: each query answers one invariant and
returns the rows that break it (at most :limit examples, and how many)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True, slots=True)
class Invariant:
    code: str
    says: str  # what holds when nothing is found
    sql: str  # SELECT of the breaking rows: one text column "item"


INVARIANTS = (
    Invariant(
        "task_in_two_live_batches",
        "each submitted batch-lane task sits in exactly one live batch of ours",
        """
        SELECT t.client || '/' || t.custom_id AS item FROM tasks t
        LEFT JOIN batches b ON b.id = t.batch_id
        WHERE t.state = 'submitted' AND t.lane = 'batch'
          AND (b.id IS NULL OR b.state = 'routed')""",
    ),
    Invariant(
        "ledger_not_results",
        "a routed batch's cost equals its results' costs plus its unattributed lines",
        """
        SELECT b.id || ' cost ' || b.cost_usd::text || ' <> results '
               || coalesce(sum(r.cost_usd), 0)::text || ' + unattributed '
               || b.unattributed_cost_usd::text AS item
        FROM batches b LEFT JOIN results r ON r.batch_id = b.id
        WHERE b.state = 'routed' AND b.pruned_at IS NULL AND b.cost_usd IS NOT NULL
        GROUP BY b.id HAVING b.cost_usd <> coalesce(sum(r.cost_usd), 0) + b.unattributed_cost_usd
        """,
    ),
    Invariant(
        "result_without_success",
        "every result belongs to a succeeded task",
        """
        SELECT r.client || '/' || r.custom_id AS item FROM results r
        LEFT JOIN tasks t ON t.id = r.task_id
        WHERE t.id IS NULL OR t.state <> 'succeeded'""",
    ),
    Invariant(
        "success_without_result",
        "every succeeded task has its result",
        """
        SELECT t.client || '/' || t.custom_id AS item FROM tasks t
        WHERE t.state = 'succeeded'
          AND NOT EXISTS (SELECT 1 FROM results r WHERE r.task_id = t.id)""",
    ),
    Invariant(
        "success_stored_twice",
        "a success is stored once per replay",
        """
        SELECT t.client || '/' || t.custom_id AS item FROM task_events e
        JOIN tasks t ON t.id = e.task_id
        WHERE e.outcome = 'succeeded' GROUP BY t.id, t.client, t.custom_id, t.replay_count
        HAVING count(*) > t.replay_count + 1""",
    ),
    Invariant(
        "orphan_event",
        "every task event belongs to a stored task",
        """
        -- The task is gone, and with it the key (events since migration 0012
        -- do not copy it): the task id names it.
        SELECT DISTINCT coalesce(e.client || '/' || e.custom_id,
                                 'task ' || coalesce(e.task_id::text, '?')) AS item
        FROM task_events e
        WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id)""",
    ),
    Invariant(
        "orphan_callback",
        "every callback belongs to a stored task",
        """
        SELECT c.id::text || ' ' || c.client || '/' || c.custom_id AS item FROM callbacks c
        WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = c.task_id)""",
    ),
    Invariant(
        "rollup_gap",
        "the rolled-up days run without a gap (the manual queue adds up)",
        """
        SELECT d::date::text AS item
        FROM generate_series((SELECT min(day) FROM rollup_days),
                             (SELECT max(day) FROM rollup_days), interval '1 day') d
        WHERE NOT EXISTS (SELECT 1 FROM rollup_days r WHERE r.day = d::date)""",
    ),
    Invariant(
        "rollup_without_day",
        "every rollup row belongs to a rolled-up day",
        """
        SELECT DISTINCT r.day::text AS item FROM daily_rollups r
        WHERE NOT EXISTS (SELECT 1 FROM rollup_days d WHERE d.day = r.day)""",
    ),
)


async def breaking_rows(
    conn: AsyncConnection, invariant: Invariant, limit: int
) -> tuple[int, list[str]]:
    """How many rows break it, and the first ``limit`` of them."""
    rows = await conn.execute(
        text(f"""
        WITH bad AS ({invariant.sql})
        SELECT (SELECT count(*) FROM bad) AS n,
               ARRAY(SELECT item FROM bad ORDER BY item LIMIT :limit) AS items"""),
        {"limit": limit},
    )
    n, items = rows.one()
    return int(n), list(items)
