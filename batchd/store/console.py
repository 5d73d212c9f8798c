"""The operator console's questions, one function each (batchd/console.py asks them).

Every statement reads a bounded slice through an index: the queue per window
counts at most ``cap`` rows of the queued partial index, live batches come
from ``batches_live``, the manual queue pages ``tasks_manual`` newest first,
a task is found by its custom_id. tests/integration/test_console_sql.py
EXPLAINs each one against a filled database and fails on a sequential scan
of ``tasks``.

``client`` is the viewer's scope: ``None`` for an admin (every client),
else the client's name, applied in the statement itself so another client's
row is never read into Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.windows import QUEUED_KEYS

# Two ways to say "this client only, or everyone when :client is NULL".
_MINE = "(CAST(:client AS text) IS NULL OR client = CAST(:client AS text))"
_MINE_T = "(CAST(:client AS text) IS NULL OR t.client = CAST(:client AS text))"
# Batch b holds one of the viewer's tasks: one not succeeded (tasks_batch_held
# indexes only those) or one that succeeded in it (its result names the batch).
_HOLDS_MINE = """(EXISTS (SELECT 1 FROM tasks t WHERE t.batch_id = b.id AND t.state <> 'succeeded'
                    AND t.client = CAST(:client AS text))
     OR EXISTS (SELECT 1 FROM results r WHERE r.batch_id = b.id
                AND r.client = CAST(:client AS text)))"""


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


# ------------------------------------------------------------------ overview

QUEUE_WINDOWS = text(
    QUEUED_KEYS
    + f"""
SELECT k.provider, k.endpoint, k.model, w.n, w.oldest, w.due, now() AS now
FROM keys k, LATERAL (
    SELECT count(*) AS n, min(not_before) AS oldest,
           count(*) FILTER (WHERE not_before <= now()) AS due FROM (
        SELECT not_before FROM tasks
        WHERE state = 'queued' AND lane = 'batch' AND provider = k.provider
          AND endpoint = k.endpoint AND model = k.model AND {_MINE}
        ORDER BY not_before LIMIT :cap) s
) w
WHERE w.n > 0
ORDER BY w.oldest
LIMIT 200
"""
)


async def queue_windows(
    conn: AsyncConnection, client: str | None, cap: int
) -> list[dict[str, Any]]:
    """Per (provider, endpoint, model) window of the batch lane: queued tasks (counted
    up to ``cap``), how many may join a batch now (the rest wait out a
    retry's backoff) and the oldest ``not_before``, from which the window's
    age and flush time are measured."""
    rows = await conn.execute(QUEUE_WINDOWS, {"client": client, "cap": cap})
    return [dict(r) for r in rows.mappings()]


SYNC_QUEUE = text(f"""
SELECT count(*) AS n, min(not_before) AS oldest FROM (
    SELECT not_before FROM tasks WHERE state = 'queued' AND lane = 'sync' AND {_MINE}
    ORDER BY not_before, id LIMIT :cap) s
""")


async def sync_queue(conn: AsyncConnection, client: str | None, cap: int) -> dict[str, Any]:
    """The synchronous lane's queue: tasks waiting (up to ``cap``) and the oldest."""
    row = await conn.execute(SYNC_QUEUE, {"client": client, "cap": cap})
    return dict(row.mappings().one())


LIVE_BATCHES = text(f"""
SELECT b.id, b.provider_batch_id, b.endpoint, b.model, b.state, b.provider_status,
       b.flush_reason, b.item_count, b.request_counts, b.created_at, b.submitted_at,
       now() AS now
FROM batches b
WHERE b.state <> 'routed'
  AND (CAST(:client AS text) IS NULL OR {_HOLDS_MINE})
ORDER BY b.created_at, b.id
LIMIT :lim
""")


async def live_batches(
    conn: AsyncConnection, client: str | None, limit: int
) -> list[dict[str, Any]]:
    """Batches not yet routed, oldest first; a client sees those holding a
    task of its own."""
    rows = await conn.execute(LIVE_BATCHES, {"client": client, "lim": limit})
    return [dict(r) for r in rows.mappings()]


# A result carries its task's client (migration 0011): no look-up in tasks.
SPEND_BY_CLIENT = text(f"""
SELECT client, round(sum(cost_usd), 6) AS spend_usd, count(*) AS results FROM (
    SELECT r.cost_usd, r.client
    FROM results r WHERE r.created_at >= :lo AND r.created_at < :hi) s
WHERE {_MINE}
GROUP BY client ORDER BY sum(cost_usd) DESC, client LIMIT 100
""")


async def spend_by_client(
    conn: AsyncConnection, client: str | None, day: date
) -> list[dict[str, Any]]:
    """What each client's results stored on ``day`` cost."""
    lo, hi = _day_bounds(day)
    rows = await conn.execute(SPEND_BY_CLIENT, {"client": client, "lo": lo, "hi": hi})
    return [dict(r) for r in rows.mappings()]


# -------------------------------------------------------------- manual queue

_FAILED_FILTER = f"""
    state = 'failed' AND {_MINE}
      AND (CAST(:model AS text) IS NULL OR model = CAST(:model AS text))
      AND (CAST(:code AS text) IS NULL OR last_error->>'code' = CAST(:code AS text))
      AND (CAST(:lo AS timestamptz) IS NULL
           OR (finished_at >= CAST(:lo AS timestamptz) AND finished_at < CAST(:hi AS timestamptz)))
"""

MANUAL_PAGE = text(f"""
SELECT id, client, custom_id, endpoint, model, attempts, replay_count, batch_id, last_error,
       created_at, finished_at
FROM tasks
WHERE {_FAILED_FILTER} AND id < :before
ORDER BY id DESC LIMIT :lim
""")

MANUAL_IDS = text(f"""
SELECT id FROM tasks WHERE {_FAILED_FILTER} ORDER BY id DESC LIMIT :lim
""")

MANUAL_COUNT = text(f"""
SELECT count(*) FROM (SELECT 1 FROM tasks WHERE {_FAILED_FILTER} LIMIT :cap) s
""")


def _filter_params(
    client: str | None, model: str | None, code: str | None, day: date | None
) -> dict[str, Any]:
    lo, hi = _day_bounds(day) if day else (None, None)
    return {"client": client, "model": model, "code": code, "lo": lo, "hi": hi}


async def manual_page(
    conn: AsyncConnection,
    *,
    client: str | None,
    model: str | None,
    code: str | None,
    day: date | None,
    before: int,
    limit: int,
) -> list[dict[str, Any]]:
    """Failed tasks matching the filters, newest first, below id ``before``."""
    rows = await conn.execute(
        MANUAL_PAGE, {**_filter_params(client, model, code, day), "before": before, "lim": limit}
    )
    return [dict(r) for r in rows.mappings()]


async def manual_count(
    conn: AsyncConnection,
    *,
    client: str | None,
    model: str | None,
    code: str | None,
    day: date | None,
    cap: int,
) -> int:
    """How many failed tasks match, counted up to ``cap``."""
    row = await conn.execute(MANUAL_COUNT, {**_filter_params(client, model, code, day), "cap": cap})
    return int(row.scalar_one())


async def manual_ids(
    conn: AsyncConnection,
    *,
    client: str | None,
    model: str | None,
    code: str | None,
    day: date | None,
    limit: int,
) -> list[int]:
    """The ids of up to ``limit`` failed tasks matching the filters, newest first."""
    rows = await conn.execute(
        MANUAL_IDS, {**_filter_params(client, model, code, day), "lim": limit}
    )
    return [int(r[0]) for r in rows]


CHOSEN_FAILED = text(f"""
SELECT id, client, custom_id FROM tasks
WHERE id = ANY(CAST(:ids AS bigint[])) AND state = 'failed' AND {_MINE}
ORDER BY id
""")


async def chosen_failed(
    conn: AsyncConnection, client: str | None, ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Of the chosen task ids, the ones that are failed and the viewer's."""
    rows = await conn.execute(CHOSEN_FAILED, {"client": client, "ids": list(ids)})
    return [dict(r) for r in rows.mappings()]


EXPORT_ROWS = text(f"""
SELECT custom_id, client, endpoint, body, metadata, attempts, replay_count, batch_id,
       last_error, finished_at
FROM tasks WHERE id = ANY(CAST(:ids AS bigint[])) AND state = 'failed' AND {_MINE}
ORDER BY id
""")


async def export_rows(
    conn: AsyncConnection, client: str | None, ids: Sequence[int]
) -> list[dict[str, Any]]:
    """The chosen failed tasks with their request bodies, for an export file."""
    rows = await conn.execute(EXPORT_ROWS, {"client": client, "ids": list(ids)})
    return [dict(r) for r in rows.mappings()]


async def record_action(
    conn: AsyncConnection,
    *,
    actor: str,
    client: str | None,
    action: str,
    requested: int,
    affected: int,
    detail: dict[str, Any],
) -> int:
    """The audit row of one console action; its id."""
    row = await conn.execute(
        text("""
        INSERT INTO console_actions (actor, client, action, requested, affected, detail)
        VALUES (:actor, :client, :action, :requested, :affected, CAST(:detail AS jsonb))
        RETURNING id"""),
        {
            "actor": actor,
            "client": client,
            "action": action,
            "requested": requested,
            "affected": affected,
            "detail": orjson.dumps(detail).decode(),
        },
    )
    return int(row.scalar_one())


RECENT_ACTIONS = text(f"""
SELECT id, actor, client, action, requested, affected, created_at FROM console_actions
WHERE {_MINE} ORDER BY id DESC LIMIT :lim
""")


async def recent_actions(
    conn: AsyncConnection, client: str | None, limit: int
) -> list[dict[str, Any]]:
    rows = await conn.execute(RECENT_ACTIONS, {"client": client, "lim": limit})
    return [dict(r) for r in rows.mappings()]


# ---------------------------------------------------------------- task lookup

TASKS_BY_CUSTOM_ID = text(f"""
SELECT id, client, custom_id, endpoint, model, lane, state, attempts, replay_count, batch_id,
       last_error, metadata, created_at, updated_at, submitted_at, finished_at, not_before,
       deadline
FROM tasks WHERE custom_id = :cid AND {_MINE}
ORDER BY id LIMIT 20
""")

EVENTS = text("""
SELECT id, batch_id, attempt, outcome, error, created_at FROM task_events
WHERE task_id = :tid ORDER BY id DESC LIMIT :lim
""")

BATCHES_BY_ID = text("""
SELECT id, provider_batch_id, endpoint, model, state, provider_status, flush_reason,
       item_count, request_counts, cost_usd, created_at, submitted_at, finished_at, routed_at
FROM batches WHERE id = ANY(CAST(:ids AS text[])) ORDER BY created_at
""")

RESULT = text("""
SELECT seq, batch_id, status_code, round(cost_usd, 6) AS cost_usd,
       round(sync_cost_usd, 6) AS sync_cost_usd, usage, replay_count, created_at
FROM results WHERE task_id = :tid
""")


async def task_history(
    conn: AsyncConnection, client: str | None, custom_id: str, event_limit: int
) -> list[dict[str, Any]]:
    """The viewer's tasks with this custom_id, each with its events (newest
    first, up to ``event_limit``), the batches they name and its result."""
    found = [
        dict(r)
        for r in (
            await conn.execute(TASKS_BY_CUSTOM_ID, {"client": client, "cid": custom_id})
        ).mappings()
    ]
    for task in found:
        events = [
            dict(r)
            for r in (
                await conn.execute(EVENTS, {"tid": task["id"], "lim": event_limit})
            ).mappings()
        ]
        batch_ids = sorted(
            {e["batch_id"] for e in events if e["batch_id"]}
            | ({task["batch_id"]} if task["batch_id"] else set())
        )
        batches = (
            [dict(r) for r in (await conn.execute(BATCHES_BY_ID, {"ids": batch_ids})).mappings()]
            if batch_ids
            else []
        )
        result = (await conn.execute(RESULT, {"tid": task["id"]})).mappings().first()
        task.update(events=events, batches=batches, result=dict(result) if result else None)
    return found


BATCH_DETAIL = text(f"""
SELECT b.id, b.provider_batch_id, b.endpoint, b.model, b.state, b.provider_status,
       b.flush_reason, b.item_count, b.input_bytes, b.input_file_id, b.output_file_id,
       b.error_file_id, b.request_counts, b.usage, b.errors, round(b.cost_usd, 6) AS cost_usd,
       round(b.sync_cost_usd, 6) AS sync_cost_usd, b.spend_day, b.created_at,
       b.submitted_at, b.finished_at, b.routed_at
FROM batches b
WHERE b.id = :bid AND (CAST(:client AS text) IS NULL OR {_HOLDS_MINE})
""")


async def batch_detail(
    conn: AsyncConnection, client: str | None, batch_id: str
) -> dict[str, Any] | None:
    """One batch, if the viewer may see it: an admin always, a client when
    one of its tasks is in it (a task keeps the batch that finished it)."""
    row = await conn.execute(BATCH_DETAIL, {"client": client, "bid": batch_id})
    found = row.mappings().first()
    return dict(found) if found else None
