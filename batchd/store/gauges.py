"""The statement behind the queue and budget gauges (batchd/snapshots.py):
one cheap query every few seconds, so scrapes never touch the database."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.spend import DAY_SPEND_SQL

# Each count reads a partial index, never the table: a year of finished tasks
# made the submitted count a parallel scan of every task every 5 s (1.1 s of
# three processes at 10,000,000 tasks, taken from ingest). A submitted task
# always names its batch (or sync claim), so the count reads tasks_batch_held,
# whose predicate the planner proves only with batch_id IS NOT NULL spelled out.
_QUEUE = text(f"""
SELECT
  (SELECT count(*) FROM tasks WHERE state = 'queued') AS queued,
  (SELECT count(*) FROM tasks WHERE state = 'submitted' AND batch_id IS NOT NULL) AS submitted,
  (SELECT count(*) FROM tasks WHERE state = 'failed') AS failed,
  (SELECT extract(epoch FROM min(not_before)) FROM tasks WHERE state = 'queued') AS oldest,
  (SELECT count(*) FROM batches WHERE state <> 'routed') AS in_flight,
  (SELECT extract(epoch FROM min(submitted_at)) FROM batches
     WHERE state = 'submitted') AS oldest_batch,
  {DAY_SPEND_SQL} AS spent
""")


async def queue_and_spend(conn: AsyncConnection, day: date) -> dict[str, Any]:
    """Tasks by state, the oldest queued task and live batch (epoch seconds),
    live batches, and the day's spend with reservations."""
    return dict((await conn.execute(_QUEUE, {"day": day})).mappings().one())


async def batch_archive_state(conn: AsyncConnection, batch_id: str) -> Any:
    """A batch's state, spend day and provider id, for the spool sweep (None: unknown)."""
    return (
        await conn.execute(
            text("SELECT state, spend_day, provider_batch_id FROM batches WHERE id = :id"),
            {"id": batch_id},
        )
    ).first()
