"""Every statement of the manual queue (failed tasks): replay back into the
queue, dismissal for good, the reasons a named task was left alone, and the
stream an export writes. Tasks are named by (client, custom_id) keys; a
client of None means every client's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.jobs import moved_deltas

Keys = list[tuple[str, str]]


def _key_params(client: str | None, keys: Keys | None) -> dict[str, Any]:
    return {
        "client": client,
        "cls": None if keys is None else [k[0] for k in keys],
        "cids": None if keys is None else [k[1] for k in keys],
    }


# The failed tasks a replay or dismissal acts on: ``client``'s (all clients'
# when NULL), and of those the named keys (all when NULL).
_CHOSEN = """state = 'failed'
              AND (CAST(:client AS text) IS NULL OR client = :client)
              AND (CAST(:cids AS text[]) IS NULL OR (client, custom_id) IN (
                   SELECT * FROM unnest(CAST(:cls AS text[]), CAST(:cids AS text[]))))"""

_REPLAY = text(f"""
WITH upd AS (
    UPDATE tasks SET state = 'queued', attempts = 0,
           replay_count = replay_count + 1, not_before = now(),
           batch_id = NULL, finished_at = NULL, updated_at = now()
    WHERE {_CHOSEN}
    RETURNING id, client, custom_id, replay_count, last_error, job
), jd AS ({moved_deltas("upd", "'failed'", "'queued'")}
), ev AS (
    INSERT INTO task_events (task_id, attempt, outcome, error)
    SELECT id, 0, 'replayed', last_error FROM upd
)
SELECT client, custom_id FROM upd""")


async def replay_failed(conn: AsyncConnection, client: str | None, keys: Keys | None) -> Keys:
    """Re-queue the chosen failed tasks with their attempts reset and
    ``replay_count + 1``, a ``replayed`` event each; the keys re-queued."""
    rows = await conn.execute(_REPLAY, _key_params(client, keys))
    return [(r[0], r[1]) for r in rows]


_DISMISS = text(f"""
WITH upd AS (
    -- Retention counts from the dismissal, so the task's events (the
    -- dismissal's among them) all precede its finish time.
    UPDATE tasks SET state = 'dismissed', finished_at = now(), updated_at = now()
    WHERE {_CHOSEN}
    RETURNING id, client, custom_id, attempts, last_error
), ev AS (
    INSERT INTO task_events (task_id, attempt, outcome, error)
    SELECT id, attempts, 'dismissed', last_error FROM upd
)
SELECT client, custom_id FROM upd""")


async def dismiss_failed(conn: AsyncConnection, client: str | None, keys: Keys | None) -> Keys:
    """Take the chosen failed tasks out of the manual queue for good: they
    become ``dismissed`` with a ``dismissed`` event, and retention deletes
    them like any finished task; the keys dismissed."""
    rows = await conn.execute(_DISMISS, _key_params(client, keys))
    return [(r[0], r[1]) for r in rows]


async def task_states(conn: AsyncConnection, keys: Keys) -> dict[tuple[str, str], str]:
    """The state of each task named by a (client, custom_id) key that exists."""
    rows = await conn.execute(
        text("""
        SELECT t.client, t.custom_id, t.state FROM tasks t
        JOIN unnest(CAST(:cls AS text[]), CAST(:cids AS text[])) AS k(cl, cid)
          ON t.client = k.cl AND t.custom_id = k.cid"""),
        {"cls": [k[0] for k in keys], "cids": [k[1] for k in keys]},
    )
    return {(r[0], r[1]): r[2] for r in rows}


async def stream_failed(conn: AsyncConnection, client: str | None) -> AsyncIterator[dict[str, Any]]:
    """The manual queue in id order, read as a stream (an export)."""
    result = await conn.stream(
        text("""
        SELECT client, custom_id, endpoint, body, metadata, attempts, replay_count,
               batch_id, last_error, finished_at FROM tasks
        WHERE state = 'failed' AND (CAST(:client AS text) IS NULL OR client = :client)
        ORDER BY id"""),
        {"client": client},
    )
    async for part in result.mappings().partitions(1000):
        for r in part:
            yield dict(r)
