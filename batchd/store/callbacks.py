"""Result callbacks: claiming due deliveries, recording attempts, replays and the backlog."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_CLAIM_CALLBACKS = text("""
WITH claimed AS (
    UPDATE callbacks c SET attempts = c.attempts + 1, updated_at = now(),
           next_attempt_at = now() + make_interval(secs => :lease)
    WHERE c.id IN (SELECT id FROM callbacks
                   WHERE state = 'pending' AND next_attempt_at <= now()
                   ORDER BY next_attempt_at, id LIMIT :lim FOR UPDATE SKIP LOCKED)
    RETURNING c.id, c.task_id, c.custom_id, c.client, c.url, c.task_state, c.task_attempts,
              c.task_error, c.finished_at, c.attempts, c.job, c.job_summary
)
SELECT c.*, t.endpoint, t.model, t.metadata, r.status_code, r.response
FROM claimed c
LEFT JOIN tasks t ON t.id = c.task_id
LEFT JOIN results r ON r.task_id = c.task_id AND c.task_state = 'succeeded'
ORDER BY c.id
""")


async def claim_callbacks(
    conn: AsyncConnection, limit: int, lease_seconds: float
) -> list[dict[str, Any]]:
    """Due deliveries with what their payload needs. The claim counts the
    attempt and pushes the row out by the lease, so no other replica POSTs it
    meanwhile, and a replica that dies mid-POST leaves it due again."""
    rows = await conn.execute(_CLAIM_CALLBACKS, {"lim": limit, "lease": lease_seconds})
    return [dict(r) for r in rows.mappings()]


async def record_callback_attempt(
    conn: AsyncConnection,
    callback_id: int,
    attempt: int,
    *,
    status: int | None,
    error: str | None,
    duration: float,
    delivered: bool,
    retry_in: float | None,
) -> str | None:
    """Record one POST and what follows from it: delivered, due again after
    ``retry_in``, or (``retry_in`` None) failed for good. Returns the new
    state, or None when another replica re-claimed the row meanwhile (the
    attempt is still recorded: it happened)."""
    row = await conn.execute(
        text("""
        WITH att AS (
            INSERT INTO callback_attempts (callback_id, attempt, status_code, error,
                                           duration_seconds)
            VALUES (:id, :attempt, :status, :error, :duration)
        )
        UPDATE callbacks SET
            state = CASE WHEN :ok THEN 'delivered'
                         WHEN CAST(:delay AS float8) IS NULL THEN 'failed' ELSE 'pending' END,
            delivered_at = CASE WHEN :ok THEN now() END,
            next_attempt_at = CASE WHEN :ok OR CAST(:delay AS float8) IS NULL
                THEN next_attempt_at ELSE now() + make_interval(secs => :delay) END,
            last_status = :status, last_error = :error, updated_at = now()
        WHERE id = :id AND state = 'pending' AND attempts = :attempt
        RETURNING state"""),
        {
            "id": callback_id,
            "attempt": attempt,
            "status": status,
            "error": error,
            "duration": duration,
            "ok": delivered,
            "delay": retry_in,
        },
    )
    return row.scalar_one_or_none()


_CALLBACK_COLUMNS = """id, custom_id, client, url, task_state, state, attempts, last_status,
    last_error, replay_count, created_at, updated_at, delivered_at"""


async def page_failed_callbacks(
    conn: AsyncConnection, after: int, limit: int, client: str | None = None
) -> list[dict[str, Any]]:
    """Deliveries that used up their attempts, oldest first."""
    rows = await conn.execute(
        text(f"""
        SELECT {_CALLBACK_COLUMNS} FROM callbacks
        WHERE state = 'failed' AND id > :after
          AND (CAST(:client AS text) IS NULL OR client = :client)
        ORDER BY id LIMIT :limit"""),
        {"after": after, "limit": limit, "client": client},
    )
    return [dict(r) for r in rows.mappings()]


async def callbacks_of_task(
    conn: AsyncConnection, client: str, custom_id: str
) -> list[dict[str, Any]]:
    """Every delivery of a task with each of its attempts."""
    rows = await conn.execute(
        text(f"""
        SELECT {", ".join("c." + c.strip() for c in _CALLBACK_COLUMNS.split(","))},
               coalesce((SELECT jsonb_agg(jsonb_build_object(
                            'attempt', a.attempt, 'status_code', a.status_code,
                            'error', a.error, 'duration_seconds', a.duration_seconds,
                            'at', a.created_at) ORDER BY a.id)
                         FROM callback_attempts a WHERE a.callback_id = c.id), '[]'::jsonb)
                 AS attempt_log
        FROM callbacks c JOIN tasks t ON t.id = c.task_id
        WHERE t.client = :cl AND t.custom_id = :cid ORDER BY c.id"""),
        {"cl": client, "cid": custom_id},
    )
    return [dict(r) for r in rows.mappings()]


async def replay_callbacks(
    conn: AsyncConnection,
    ids: Sequence[int],
    custom_ids: Sequence[str],
    *,
    everything: bool = False,
    client: str | None = None,
    owner: str | None = None,
) -> list[int]:
    """Failed deliveries (by id or task, or all) due again now, with a fresh
    set of attempts; the attempt log is kept. Only ``client``'s deliveries
    (None: every client's) are touched; ``custom_ids`` name tasks of
    ``owner``."""
    rows = await conn.execute(
        text("""
        UPDATE callbacks c SET state = 'pending', attempts = 0, next_attempt_at = now(),
               replay_count = c.replay_count + 1, updated_at = now()
        WHERE c.state = 'failed'
          AND (CAST(:client AS text) IS NULL OR c.client = :client)
          AND (:all OR c.id = ANY(CAST(:ids AS bigint[]))
               OR c.task_id IN (SELECT id FROM tasks WHERE client = :owner
                                AND custom_id = ANY(CAST(:cids AS text[]))))
        RETURNING c.id"""),
        {
            "ids": list(ids),
            "cids": list(custom_ids),
            "all": everything,
            "client": client,
            "owner": owner,
        },
    )
    return sorted(r[0] for r in rows)


async def callback_backlog(conn: AsyncConnection) -> dict[str, int]:
    """Deliveries waiting (pending) and given up on (failed), for the gauges."""
    # One count per partial index: delivered rows, the bulk, are never read.
    row = await conn.execute(
        text("""
        SELECT (SELECT count(*) FROM callbacks WHERE state = 'pending') AS pending,
               (SELECT count(*) FROM callbacks WHERE state = 'failed') AS failed""")
    )
    return {k: int(v) for k, v in row.mappings().one().items()}
