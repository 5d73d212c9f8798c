"""Tasks in and out: bulk ingest, a task's view, result and failure pages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.domain import TaskIn
from batchd.store.jobs import LOCAL, added_deltas, open_jobs


def json_text(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


# A task as its caller names it: (client, custom_id).
TaskKey = tuple[str, str]


@dataclass(frozen=True, slots=True)
class IngestResult:
    inserted: list[TaskKey]
    duplicates: dict[TaskKey, str]  # -> its current state
    conflicts: list[TaskKey]
    # (client, job) of tasks whose job was cancelled: nothing was stored.
    cancelled_jobs: list[tuple[str, str]] = field(default_factory=list)


_INSERT_TASKS = text(f"""
WITH ins AS (
INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, metadata, line_bytes,
                   est_input_tokens, est_output_tokens, lane, not_before, deadline, fallback_at,
                   client, callback_url, fallback_action, job, provider)
SELECT cid, coalesce(ep, CAST(:ep1 AS text)), coalesce(mdl, CAST(:mdl1 AS text)), bdy::jsonb,
       dg, md::jsonb, lb, ei, eo, coalesce(ln, CAST(:ln1 AS text)),
       now() - make_interval(secs => coalesce(bd, 0)), dl, fb,
       coalesce(cl, CAST(:cl1 AS text)), cb, fa, coalesce(jb, CAST(:jb1 AS text)),
       coalesce(pv, CAST(:pv1 AS text))
FROM unnest(CAST(:cid AS text[]), CAST(:ep AS text[]), CAST(:mdl AS text[]),
            CAST(:bdy AS text[]), CAST(:dg AS text[]), CAST(:md AS text[]),
            CAST(:lb AS int[]), CAST(:ei AS int[]), CAST(:eo AS int[]),
            CAST(:ln AS text[]), CAST(:bd AS float8[]), CAST(:dl AS timestamptz[]),
            CAST(:fb AS timestamptz[]), CAST(:cl AS text[]), CAST(:cb AS text[]),
            CAST(:fa AS text[]), CAST(:jb AS text[]), CAST(:pv AS text[]))
     AS t(cid, ep, mdl, bdy, dg, md, lb, ei, eo, ln, bd, dl, fb, cl, cb, fa, jb, pv)
ON CONFLICT (client, custom_id) DO NOTHING
RETURNING custom_id, client, job
), jd AS ({added_deltas("ins")})
SELECT client, custom_id FROM ins
""")

_EXISTING_DIGESTS = text("""
    SELECT t.client, t.custom_id, t.body_digest, t.state
    FROM unnest(CAST(:cl AS text[]), CAST(:ids AS text[])) AS k(cl, cid)
    JOIN tasks t ON t.client = k.cl AND t.custom_id = k.cid""")


async def limit_lock_wait(conn: AsyncConnection, seconds: float) -> None:
    """In this transaction, give up on a lock after ``seconds`` (an error that
    rolls it back) instead of waiting behind a slow or stuck writer."""
    await conn.execute(
        text("SELECT set_config('lock_timeout', :ms, true)"),
        {"ms": f"{max(1, int(seconds * 1000))}ms"},
    )


# The driver checks each element of an array it sends (0.1-0.2 us apiece,
# a good part of a bulk request's CPU), so _INSERT_TASKS takes a column that
# is the same in every row as NULL: unnest pads a missing array with NULLs,
# and the statement reads them as that one value (or as NULL, or 0).


def _or_null(column: list[Any]) -> list[Any] | None:
    """``column``, or NULL when every value in it is NULL."""
    return column if any(v is not None for v in column) else None


def _shared(column: list[Any]) -> tuple[list[Any] | None, Any]:
    """(NULL, the value) when every row has the same one, else (``column``, NULL)."""
    if column.count(column[0]) == len(column):
        return None, column[0]
    return column, None


async def insert_tasks(conn: AsyncConnection, tasks: Sequence[TaskIn]) -> IngestResult:
    """Insert new tasks; report the ones already stored (same or other body)."""
    if not tasks:
        return IngestResult([], {}, [])
    jobs: dict[tuple[str, str], str | None] = {}
    for t in tasks:
        if t.job is not None:
            key = (t.client or LOCAL, t.job)
            if jobs.get(key) is None:
                jobs[key] = t.job_callback_url
    if jobs:
        cancelled = await open_jobs(conn, list(jobs), list(jobs.values()))
        if cancelled:
            return IngestResult([], {}, [], sorted(cancelled))
    ep, ep1 = _shared([t.endpoint for t in tasks])
    mdl, mdl1 = _shared([t.model for t in tasks])
    ln, ln1 = _shared([t.lane for t in tasks])
    jb, jb1 = _shared([t.job for t in tasks])
    cl, cl1 = _shared([t.client for t in tasks])
    pv, pv1 = _shared([t.provider or "openai" for t in tasks])
    rows = await conn.execute(
        _INSERT_TASKS,
        {
            "pv": pv,
            "pv1": pv1,
            "cid": [t.custom_id for t in tasks],
            "ep": ep,
            "ep1": ep1,
            "mdl": mdl,
            "mdl1": mdl1,
            "bdy": [t.body_json or orjson.dumps(t.body).decode() for t in tasks],
            "dg": [t.digest for t in tasks],
            "md": _or_null([json_text(t.metadata) for t in tasks]),
            "lb": [t.line_bytes for t in tasks],
            "ei": [t.est_input_tokens for t in tasks],
            "eo": [t.est_output_tokens for t in tasks],
            "ln": ln,
            "ln1": ln1,
            "bd": _or_null([t.backdate_seconds or None for t in tasks]),
            "dl": _or_null([t.deadline for t in tasks]),
            "fb": _or_null([t.fallback_at for t in tasks]),
            "cl": cl,
            "cl1": cl1,
            "cb": _or_null([t.callback_url for t in tasks]),
            "fa": _or_null([t.fallback_action for t in tasks]),
            "jb": jb,
            "jb1": jb1,
        },
    )
    inserted: list[TaskKey] = [(r[0], r[1]) for r in rows]
    if len(inserted) == len(tasks):
        return IngestResult(inserted, {}, [])
    fresh = set(inserted)
    others = [t for t in tasks if (t.client, t.custom_id) not in fresh]
    found = await conn.execute(
        _EXISTING_DIGESTS, {"cl": [t.client for t in others], "ids": [t.custom_id for t in others]}
    )
    stored = {(cl, cid): (digest, state) for cl, cid, digest, state in found}
    duplicates: dict[TaskKey, str] = {}
    conflicts: list[TaskKey] = []
    for t in others:
        key = (t.client, t.custom_id)
        if key in stored and stored[key][0] == t.digest:
            duplicates[key] = stored[key][1]
        else:
            conflicts.append(key)
    return IngestResult(inserted, duplicates, conflicts)


async def count_queued(conn: AsyncConnection) -> int:
    row = await conn.execute(text("SELECT count(*) FROM tasks WHERE state = 'queued'"))
    return int(row.scalar_one())


_QUEUED_BY_CLIENT = text("""
    SELECT client, count(*) FROM tasks WHERE state = 'queued' GROUP BY client""")


async def queued_by_client(conn: AsyncConnection) -> dict[str, int]:
    """Queued tasks of each client that has any (BATCHD_CLIENT_MAX_QUEUED, the
    per-client queue gauge)."""
    rows = await conn.execute(_QUEUED_BY_CLIENT)
    return {c: int(n) for c, n in rows}


async def get_task(conn: AsyncConnection, client: str, custom_id: str) -> dict[str, Any] | None:
    """A task by its caller's key: another client's custom_id is not found."""
    row = await conn.execute(
        text("""
        SELECT t.custom_id, t.endpoint, t.model, t.state, t.attempts, t.batch_id,
               t.last_error, t.replay_count, t.metadata, t.created_at, t.updated_at,
               t.submitted_at, t.finished_at, t.not_before, t.client, t.callback_url,
               r.status_code, r.response, round(r.cost_usd, 6) AS cost_usd, r.unpriced,
               t.lane, b.state AS b_state, b.provider_batch_id AS b_pid,
               b.provider_status AS b_status
        FROM tasks t LEFT JOIN results r ON r.task_id = t.id AND t.state = 'succeeded'
        LEFT JOIN batches b ON b.id = t.batch_id AND t.state = 'submitted'
        WHERE t.client = :cl AND t.custom_id = :cid"""),
        {"cl": client, "cid": custom_id},
    )
    found = row.mappings().first()
    if not found:
        return None
    task = dict(found)
    task["location"] = _location(
        task.pop("lane"), task.pop("b_state"), task.pop("b_pid"), task.pop("b_status"), task
    )
    return task


def _location(
    lane: str, b_state: str | None, b_pid: str | None, b_status: str | None, task: dict[str, Any]
) -> dict[str, Any]:
    """Where a task really is: its own state says queued/submitted/finished,
    its batch row says whether a 'submitted' task reached the provider."""
    state = task["state"]
    if state == "queued":
        return {"stage": "queued", "eligible_at": task["not_before"]}
    if state in ("succeeded", "failed"):
        return {"stage": "routed", "outcome": state, "batch_id": task["batch_id"]}
    if b_state is None:  # a sync-lane claim holds no batch row
        return {
            "stage": "sync_call" if lane == "sync" else "uploading",
            "batch_id": task["batch_id"],
        }
    if b_state in ("building", "uploading"):
        return {"stage": "uploading", "batch_id": task["batch_id"], "batch_state": b_state}
    if b_state == "submitted":
        return {
            "stage": "at_provider",
            "batch_id": task["batch_id"],
            "batch_state": b_state,
            "provider_batch_id": b_pid,
            "provider_status": b_status,
        }
    return {
        "stage": "routing",
        "batch_id": task["batch_id"],
        "batch_state": b_state,
        "provider_batch_id": b_pid,
        "provider_status": b_status,
    }


async def finished_custom_ids(
    conn: AsyncConnection, client: str, custom_ids: list[str]
) -> set[str]:
    """Which of ``client``'s tasks are finished: succeeded, failed, or
    cancelled with their job (one query for all ?wait callers of one client)."""
    rows = await conn.execute(
        text("""
        SELECT custom_id FROM tasks
        WHERE client = :client AND custom_id = ANY(:ids)
          AND state IN ('succeeded', 'failed', 'cancelled')"""),
        {"ids": custom_ids, "client": client},
    )
    return {r[0] for r in rows}


async def get_tasks(
    conn: AsyncConnection, client: str, custom_ids: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Several of one client's tasks (as get_task), by custom_id, in one query."""
    rows = await conn.execute(
        text("""
        SELECT t.custom_id, t.endpoint, t.model, t.state, t.attempts, t.batch_id,
               t.last_error, t.replay_count, t.metadata, t.created_at, t.updated_at,
               t.submitted_at, t.finished_at, t.not_before, t.client, t.callback_url,
               r.status_code, r.response, round(r.cost_usd, 6) AS cost_usd, r.unpriced
        FROM tasks t LEFT JOIN results r ON r.task_id = t.id AND t.state = 'succeeded'
        WHERE t.client = :cl AND t.custom_id = ANY(CAST(:cids AS text[]))"""),
        {"cl": client, "cids": list(custom_ids)},
    )
    return {r["custom_id"]: dict(r) for r in rows.mappings()}


async def page_results(
    conn: AsyncConnection, after: int, limit: int, client: str | None = None
) -> list[dict[str, Any]]:
    """Results in completion order: one client's, or (None) every client's."""
    rows = await conn.execute(
        text("""
        SELECT seq, client, custom_id, batch_id, status_code, response,
               round(cost_usd, 6) AS cost_usd, unpriced, created_at
        FROM results WHERE seq > :after
          AND (CAST(:client AS text) IS NULL OR client = :client)
        ORDER BY seq LIMIT :limit"""),
        {"after": after, "limit": limit, "client": client},
    )
    return [dict(r) for r in rows.mappings()]


async def page_failed(
    conn: AsyncConnection,
    after: int,
    limit: int,
    *,
    reason: str | None = None,
    day: date | None = None,
    endpoint: str | None = None,
    client: str | None = None,
) -> list[dict[str, Any]]:
    rows = await conn.execute(
        text("""
        SELECT id, client, custom_id, endpoint, model, attempts, replay_count, batch_id,
               last_error, created_at, finished_at
        FROM tasks
        WHERE state = 'failed' AND id > :after
          AND (CAST(:client AS text) IS NULL OR client = :client)
          AND (CAST(:reason AS text) IS NULL OR last_error->>'code' = :reason)
          AND (CAST(:day AS date) IS NULL OR (finished_at AT TIME ZONE 'UTC')::date = :day)
          AND (CAST(:endpoint AS text) IS NULL OR endpoint = :endpoint)
        ORDER BY id LIMIT :limit"""),
        {
            "after": after,
            "limit": limit,
            "reason": reason,
            "day": day,
            "endpoint": endpoint,
            "client": client,
        },
    )
    return [dict(r) for r in rows.mappings()]
