"""A batch's own row: its state, lease, provider id and the replica that owns it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.tasks import json_text

BATCH_COLUMNS = """id, provider_batch_id, provider, endpoint, model, state, provider_status,
    flush_reason, item_count, input_bytes, input_file_id, submit_attempts, created_at, submitted_at,
    spend_day, reserved_usd"""


NOW = object()  # a set_batch value meaning "the database's now()"
_JSONB_COLUMNS = frozenset({"request_counts", "usage", "errors"})


async def set_batch(conn: AsyncConnection, batch_id: str, **values: Any) -> None:
    """Update named columns of a batch; ``updated_at`` always moves."""
    assigns: list[str] = []
    params: dict[str, Any] = {"_id": batch_id}
    for key, value in values.items():
        if value is NOW:
            assigns.append(f"{key} = now()")
        elif key in _JSONB_COLUMNS:
            assigns.append(f"{key} = CAST(:{key} AS jsonb)")
            params[key] = json_text(value)
        else:
            assigns.append(f"{key} = :{key}")
            params[key] = value
    sql = f"UPDATE batches SET {', '.join(assigns)}, updated_at = now() WHERE id = :_id"
    await conn.execute(text(sql), params)


async def batch_owns_line_ids(conn: AsyncConnection, batch_id: str) -> bool:
    """Whether the batch's input file carries batchd's line ids (see
    resolve_legacy_lines for one that does not)."""
    row = await conn.execute(
        text("SELECT own_line_ids FROM batches WHERE id = :id"), {"id": batch_id}
    )
    return bool(row.scalar_one_or_none())


async def renew_claim(conn: AsyncConnection, batch_id: str, owner: str, seconds: float) -> bool:
    """Extend our claim on an unsent batch; False when it is no longer ours
    (our lease lapsed and another replica took it, or it was recorded)."""
    rows = await conn.execute(
        text("""
        UPDATE batches SET lease_until = now() + make_interval(secs => :s), updated_at = now()
        WHERE id = :id AND lease_owner = :owner AND state IN ('building', 'uploading')
        RETURNING 1"""),
        {"id": batch_id, "owner": owner, "s": seconds},
    )
    return rows.first() is not None


async def record_submitted(
    conn: AsyncConnection,
    batch_id: str,
    *,
    provider_batch_id: str,
    provider_status: str,
    input_file_id: str,
) -> str | None:
    """Mark an unsent batch as submitted, once. Returns None when this call
    recorded it, else the provider batch id someone recorded before."""
    rows = await conn.execute(
        text("""
        UPDATE batches SET state = 'submitted', provider_batch_id = :pid,
               provider_status = :status, input_file_id = :fid, submitted_at = now(),
               next_poll_at = now(), lease_owner = NULL, lease_until = NULL, updated_at = now()
        WHERE id = :id AND state IN ('building', 'uploading')
        RETURNING 1"""),
        {"id": batch_id, "pid": provider_batch_id, "status": provider_status, "fid": input_file_id},
    )
    if rows.first() is not None:
        return None
    earlier = await conn.execute(
        text("SELECT provider_batch_id FROM batches WHERE id = :id"), {"id": batch_id}
    )
    return str(earlier.scalar_one_or_none() or "")


async def release_batch(conn: AsyncConnection, batch_id: str, owner: str, retry_in: float) -> None:
    """Give up our claim; anyone may pick the batch up after ``retry_in``. A
    claim that already lapsed to another replica is left alone."""
    await conn.execute(
        text("""
        UPDATE batches SET lease_owner = NULL,
               lease_until = now() + make_interval(secs => :s), updated_at = now()
        WHERE id = :id AND lease_owner = :owner"""),
        {"id": batch_id, "owner": owner, "s": retry_in},
    )


async def recorded_provider_batches(conn: AsyncConnection, ids: Sequence[str]) -> set[str]:
    """Which of these provider batch ids a batch row of ours has recorded."""
    rows = await conn.execute(
        text(
            "SELECT provider_batch_id FROM batches"
            " WHERE provider_batch_id = ANY(CAST(:ids AS text[]))"
        ),
        {"ids": list(ids)},
    )
    return {r[0] for r in rows}


async def creation_owner(conn: AsyncConnection, provider: str, created_at: float) -> str | None:
    """The batch whose create at ``provider`` was the last to start at or
    before ``created_at`` (a Unix time, as the provider stamps its batches)."""
    row = await conn.execute(
        text("""
        SELECT id FROM batches
        WHERE provider = :pv AND create_started_at <= to_timestamp(:ts)
        ORDER BY create_started_at DESC LIMIT 1"""),
        {"pv": provider, "ts": created_at},
    )
    found = row.scalar()
    return str(found) if found is not None else None


async def try_session_lock(conn: AsyncConnection, key: str) -> bool:
    """A session advisory lock, held until ``session_unlock`` or the connection
    ends (a crashed replica's is gone with it); False when someone holds it."""
    got = await conn.scalar(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": key})
    await conn.commit()
    return bool(got)


async def session_unlock(conn: AsyncConnection, key: str) -> None:
    await conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": key})
    await conn.commit()


async def claim_unsent_batches(
    conn: AsyncConnection, owner: str, lease_seconds: float, limit: int = 10
) -> list[dict[str, Any]]:
    """Batches left in building/uploading whose lease lapsed (a crash, or a
    failed upload waiting out its backoff)."""
    rows = await conn.execute(
        text(f"""
        UPDATE batches SET lease_owner = :owner,
               lease_until = now() + make_interval(secs => :lease), updated_at = now()
        WHERE id IN (SELECT id FROM batches
                     WHERE state IN ('building', 'uploading')
                       AND (lease_until IS NULL OR lease_until < now())
                     ORDER BY created_at LIMIT :lim FOR UPDATE SKIP LOCKED)
        RETURNING {BATCH_COLUMNS}"""),
        {"owner": owner, "lease": lease_seconds, "lim": limit},
    )
    return [dict(r) for r in rows.mappings()]


async def claim_due_batches(
    conn: AsyncConnection, owner: str, lease_seconds: float, limit: int = 20
) -> list[dict[str, Any]]:
    """Submitted batches due for a status check, leased to ``owner``."""
    rows = await conn.execute(
        text(f"""
        UPDATE batches SET lease_owner = :owner,
               lease_until = now() + make_interval(secs => :lease), updated_at = now()
        WHERE id IN (SELECT id FROM batches
                     WHERE state = 'submitted' AND next_poll_at <= now()
                       AND (lease_until IS NULL OR lease_until < now())
                     ORDER BY next_poll_at LIMIT :lim FOR UPDATE SKIP LOCKED)
        RETURNING {BATCH_COLUMNS}"""),
        {"owner": owner, "lease": lease_seconds, "lim": limit},
    )
    return [dict(r) for r in rows.mappings()]
