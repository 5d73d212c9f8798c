"""The synchronous lane: claiming urgent tasks, their spend, and falling back to batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.jobs import moved_deltas


async def sync_candidates(
    conn: AsyncConnection, limit: int, providers: Sequence[str] = ("openai",)
) -> list[dict[str, Any]]:
    """Due sync-lane tasks at ``providers`` in order, row-locked (SKIP LOCKED)
    until the transaction ends, with what the budget check needs."""
    rows = await conn.execute(
        text("""
        SELECT id, custom_id, provider, model, est_input_tokens, est_output_tokens, client
        FROM tasks
        WHERE state = 'queued' AND lane = 'sync' AND not_before <= now()
          AND provider = ANY(CAST(:pvs AS text[]))
        ORDER BY not_before, id LIMIT :lim FOR UPDATE SKIP LOCKED"""),
        {"lim": limit, "pvs": list(providers)},
    )
    return [dict(r) for r in rows.mappings()]


async def claim_sync(
    conn: AsyncConnection, claim_id: str, task_ids: Sequence[int]
) -> list[dict[str, Any]]:
    """Take the chosen sync-lane tasks for one synchronous call each; the
    attempt is counted now, as for a batch."""
    if not task_ids:
        return []
    rows = await conn.execute(
        text(f"""
        WITH upd AS (
            UPDATE tasks t SET state = 'submitted', batch_id = :claim, attempts = t.attempts + 1,
                   submitted_at = now(), updated_at = now()
            WHERE t.id = ANY(CAST(:ids AS bigint[])) AND t.state = 'queued'
            RETURNING t.id, t.client, t.custom_id, t.provider, t.endpoint, t.model, t.body,
                      t.created_at, t.replay_count, t.attempts, t.job
        ), jd AS ({moved_deltas("upd", "'queued'", "'submitted'")})
        SELECT id, client, custom_id, provider, endpoint, model, body, created_at, replay_count,
               attempts
        FROM upd"""),
        {"claim": claim_id, "ids": list(task_ids)},
    )
    return [dict(r) for r in rows.mappings()]


async def reserve_sync_spend(
    conn: AsyncConnection,
    claim_id: str,
    day: date,
    task_ids: Sequence[int],
    models: Sequence[str],
    reserved: Sequence[Decimal],
) -> None:
    """One ledger row per claimed call, holding its high-side estimate."""
    if not task_ids:
        return
    await conn.execute(
        text("""
        INSERT INTO sync_spend (claim_id, task_id, custom_id, model, spend_day, reserved_usd)
        SELECT :claim, u.tid, t.custom_id, u.mdl, :day, u.res
        FROM unnest(CAST(:tid AS bigint[]), CAST(:mdl AS text[]), CAST(:res AS numeric[]))
             AS u(tid, mdl, res) JOIN tasks t ON t.id = u.tid"""),
        {
            "claim": claim_id,
            "day": day,
            "tid": list(task_ids),
            "mdl": list(models),
            "res": list(reserved),
        },
    )


async def give_back_sync_call(
    conn: AsyncConnection, claim_id: str, task_id: int, error: dict[str, Any]
) -> None:
    """A sync call the provider refused before running it (our credentials):
    back to the queue with the attempt given back, as a batch never created."""
    await conn.execute(
        text(f"""
        WITH upd AS (
            UPDATE tasks SET state = 'queued', batch_id = NULL, not_before = now(),
                   attempts = greatest(attempts - 1, 0), last_error = CAST(:err AS jsonb),
                   updated_at = now()
            WHERE id = :tid AND batch_id = :claim AND state = 'submitted'
            RETURNING id, client, custom_id, attempts, job
        ), jd AS ({moved_deltas("upd", "'submitted'", "'queued'")}
        )
        INSERT INTO task_events (task_id, batch_id, attempt, outcome, error)
        SELECT id, :claim, attempts, 'requeued', CAST(:err AS jsonb)
        FROM upd"""),
        {"tid": task_id, "claim": claim_id, "err": orjson.dumps(error).decode()},
    )


async def settle_sync_spend(
    conn: AsyncConnection, claim_id: str, task_id: int, cost_usd: Decimal
) -> None:
    """A finished call's ledger row takes its real cost in place of the estimate."""
    await conn.execute(
        text("""
        UPDATE sync_spend SET cost_usd = :cost, settled_at = now()
        WHERE claim_id = :claim AND task_id = :tid AND cost_usd IS NULL"""),
        {"claim": claim_id, "tid": task_id, "cost": cost_usd},
    )


async def stale_sync_calls(
    conn: AsyncConnection, older_than: float, limit: int = 1000
) -> dict[str, list[int]]:
    """Sync calls whose replica died mid-call (claim id -> task ids),
    row-locked so the caller settles them in the same transaction."""
    rows = await conn.execute(
        text("""
        SELECT batch_id, id FROM tasks
        WHERE lane = 'sync' AND state = 'submitted' AND batch_id LIKE 'sync\\_%'
          AND submitted_at < now() - make_interval(secs => :s)
        ORDER BY id LIMIT :lim FOR UPDATE SKIP LOCKED"""),
        {"s": older_than, "lim": limit},
    )
    out: dict[str, list[int]] = {}
    for claim, tid in rows:
        out.setdefault(claim, []).append(int(tid))
    return out


@dataclass(frozen=True, slots=True)
class Moved:
    """Tasks the fallback sweep took out of the batch lane's way."""

    to_sync: list[str]
    resubmitted: list[str]


async def fall_back(
    conn: AsyncConnection, window_seconds: float, margin: float, limit: int = 1000
) -> Moved:
    """Tasks past their fallback time that no batch has answered.

    ``fallback_action`` 'sync' (or NULL): the task moves to the sync lane and
    is called at once. 'resubmit' (the 24h profile): it stays in the batch
    lane, re-queued so old that its window is due on the next scheduler tick,
    once: its next fallback is its deadline's (sync, ``margin`` seconds
    ahead), or none.

    A task still in a live batch leaves it (its line is ignored when that
    batch is routed, though it may still be billed) and gets that unanswered
    attempt back, so the sync call or the fresh batch never takes it past
    BATCHD_MAX_ATTEMPTS."""
    rows = await conn.execute(
        text(f"""
        WITH due AS (
            SELECT id, batch_id AS left_batch, state AS was,
                   coalesce(fallback_action, 'sync') = 'sync' AS to_sync
            FROM tasks
            WHERE fallback_at <= now() AND lane = 'batch' AND state IN ('queued', 'submitted')
            ORDER BY fallback_at LIMIT :lim FOR UPDATE SKIP LOCKED
        ), upd AS (
            UPDATE tasks t SET
                lane = CASE WHEN d.to_sync THEN 'sync' ELSE 'batch' END,
                state = 'queued', batch_id = NULL, batch_line = NULL,
                attempts = CASE WHEN d.was = 'submitted' THEN greatest(t.attempts - 1, 0)
                                ELSE t.attempts END,
                not_before = CASE WHEN d.to_sync THEN now()
                                  ELSE now() - make_interval(secs => :window) END,
                fallback_at = CASE WHEN d.to_sync THEN t.fallback_at
                                   ELSE t.deadline - make_interval(secs => :margin) END,
                fallback_action = CASE WHEN d.to_sync THEN t.fallback_action ELSE 'sync' END,
                updated_at = now()
            FROM due d WHERE t.id = d.id
            RETURNING t.id, t.client, t.custom_id, t.attempts, d.left_batch, d.to_sync, d.was,
                      t.job
        ), jd AS ({moved_deltas("upd", "was", "'queued'")}
        ), ev AS (
        INSERT INTO task_events (task_id, batch_id, attempt, outcome, error)
        SELECT id, left_batch, attempts,
               CASE WHEN to_sync THEN 'fallback' ELSE 'resubmitted' END,
               CASE WHEN to_sync
                    THEN '{{"code": "latency_fallback", "message": "moved to the sync lane"}}'
                    ELSE '{{"code": "latency_resubmit", "message": "resubmitted in a new batch"}}'
               END::jsonb
        FROM upd RETURNING task_id, outcome
        )
        SELECT u.custom_id, e.outcome FROM ev e JOIN upd u ON u.id = e.task_id"""),
        {"lim": limit, "window": window_seconds, "margin": margin},
    )
    moved = Moved([], [])
    for cid, outcome in rows:
        (moved.to_sync if outcome == "fallback" else moved.resubmitted).append(cid)
    return moved
