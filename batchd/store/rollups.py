"""Every statement of the daily rollups: a day's report numbers per (client,
provider, model, lane), computed from the live tables for one UTC day and
stored once when the day has closed (``daily_rollups``, ``rollup_days``).

Each measure is its own query over an indexed day range (tasks by
created_at, events by created_at, results by created_at, batches by
routed_at, sync_spend by settled_at, finished tasks by finished_at), each row
finding its task by one probe of the primary key (LIMIT 1 keeps the
planner from hashing the whole of tasks instead); the caller merges them by
dimension. The provider is the task's (routed at ingest, migration 0013), or
for billed lines no task kept the batch's. Client ''
holds what belongs to no task: billed lines no task kept, and events or
results of tasks gone before migration 0011 gave them a task id.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.tables import ROLLUP_COUNTS

DIMS = ("client", "provider", "model", "lane")
COUNTS = (*ROLLUP_COUNTS, "lane_succeeded", "lane_failed")
MONEY = ("spend_usd", "sync_usd", "unattributed_usd", "lane_spend_usd")

_T_DIMS = "t.client, t.provider, t.model, t.lane"

_TASKS_IN = text(f"""
SELECT {_T_DIMS}, count(*) AS tasks_in FROM tasks t
WHERE t.created_at >= :lo AND t.created_at < :hi GROUP BY 1, 2, 3, 4
""")

_EVENTS = text(f"""
SELECT {_T_DIMS},
       count(*) FILTER (WHERE e.outcome = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE e.outcome = 'failed') AS failed,
       count(*) FILTER (WHERE e.outcome = 'cancelled') AS cancelled,
       count(*) FILTER (WHERE e.outcome = 'retried') AS retried,
       count(*) FILTER (WHERE e.outcome = 'replayed') AS replayed,
       count(*) FILTER (WHERE e.outcome = 'dismissed') AS dismissed,
       count(DISTINCT e.task_id) FILTER (WHERE e.outcome IN ('succeeded', 'failed'))
           AS finished,
       count(DISTINCT e.task_id) FILTER (WHERE e.outcome IN ('succeeded', 'failed')
                                         AND t.state = 'succeeded') AS finished_ok
FROM task_events e, LATERAL (SELECT * FROM tasks t WHERE t.id = e.task_id LIMIT 1) t
WHERE e.created_at >= :lo AND e.created_at < :hi
  AND e.outcome IN ('succeeded', 'failed', 'cancelled', 'retried', 'replayed', 'dismissed')
GROUP BY 1, 2, 3, 4
""")

_MONEY = text(f"""
SELECT {_T_DIMS}, sum(r.cost_usd) AS spend_usd, sum(r.sync_cost_usd) AS sync_usd,
       bool_or(r.unpriced) AS unpriced
FROM results r, LATERAL (SELECT * FROM tasks t WHERE t.id = r.task_id LIMIT 1) t
WHERE r.created_at >= :lo AND r.created_at < :hi GROUP BY 1, 2, 3, 4
""")

_UNATTRIBUTED = text("""
SELECT '' AS client, b.provider, b.model, 'batch' AS lane,
       sum(b.unattributed_cost_usd) AS unattributed_usd, bool_or(b.unpriced) AS unpriced
FROM batches b
WHERE b.state = 'routed' AND b.routed_at >= :lo AND b.routed_at < :hi
GROUP BY 1, 2, 3, 4
""")

# Sync calls answered and paid whose task had moved on (no result kept). A
# task pruned since leaves its call to no client, at 'openai' (its provider
# is not kept beside the call).
_SYNC_UNKEPT = text("""
SELECT coalesce(t.client, '') AS client, coalesce(t.provider, 'openai') AS provider, s.model,
       'sync' AS lane,
       sum(s.cost_usd) AS unattributed_usd
FROM sync_spend s LEFT JOIN LATERAL (
    SELECT * FROM tasks t WHERE t.id = s.task_id LIMIT 1) t ON true
WHERE s.settled_at >= :lo AND s.settled_at < :hi AND s.cost_usd > 0
  AND NOT EXISTS (SELECT 1 FROM results r
                  WHERE r.task_id = s.task_id AND r.batch_id = s.claim_id)
GROUP BY 1, 2, 3, 4
""")

# Tasks that finished in the day, by the lane they ran in: what a task cost,
# how often it failed, and ingest-to-finish seconds as a log histogram
# (:per_doubling buckets per doubling from 10 ms), which adds up across rows.
_LANES = text(f"""
SELECT {_T_DIMS}, bucket,
       count(*) FILTER (WHERE t.state = 'succeeded') AS lane_succeeded,
       count(*) FILTER (WHERE t.state = 'failed') AS lane_failed,
       coalesce(sum(r.cost_usd), 0) AS lane_spend_usd, count(*) AS n
FROM tasks t LEFT JOIN LATERAL (
         SELECT cost_usd FROM results r WHERE r.task_id = t.id LIMIT 1) r ON true,
     LATERAL (SELECT greatest(0, floor(:per_doubling * log(2.0, greatest(
         extract(epoch FROM t.finished_at - t.created_at), 0.01) / 0.01)))::int AS bucket) h
WHERE t.finished_at >= :lo AND t.finished_at < :hi AND t.state IN ('succeeded', 'failed')
GROUP BY 1, 2, 3, 4, 5
""")


def _key(row: Any) -> tuple[str, str, str, str]:
    return (str(row["client"]), str(row["provider"]), str(row["model"]), str(row["lane"]))


def _empty() -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(COUNTS, 0)
    out.update(dict.fromkeys(MONEY, Decimal(0)))
    out["unpriced"] = False
    out["latency"] = {}
    return out


async def on_one_core(conn: AsyncConnection) -> None:
    """The rest of this transaction runs in its own backend only, no parallel
    workers: a roll-up is background work, and a day of 1,666,666 tasks had
    PostgreSQL plan its counts with two workers, every core of a two-core
    machine for minutes while ingest waited for CPU (``batchd prune`` in the
    benchmark's prune row)."""
    await conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))


async def compute_day(
    conn: AsyncConnection, lo: datetime, hi: datetime, per_doubling: int
) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """The day [lo, hi) from the live tables, by (client, provider, model, lane)."""
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}

    def merge(found: Iterable[Any]) -> None:
        for r in found:
            into = rows.setdefault(_key(r), _empty())
            for name, value in r.items():
                if name in COUNTS:
                    into[name] += int(value)
                elif name in MONEY:
                    into[name] += Decimal(value or 0)
                elif name == "unpriced":
                    into["unpriced"] = into["unpriced"] or bool(value)

    bounds = {"lo": lo, "hi": hi}
    for query in (_TASKS_IN, _EVENTS, _MONEY, _UNATTRIBUTED, _SYNC_UNKEPT):
        merge((await conn.execute(query, bounds)).mappings())
    lanes = list((await conn.execute(_LANES, {**bounds, "per_doubling": per_doubling})).mappings())
    merge(lanes)
    for r in lanes:
        hist = rows[_key(r)]["latency"]
        hist[str(r["bucket"])] = hist.get(str(r["bucket"]), 0) + int(r["n"])
    return rows


_INSERT_MARK = text("""
INSERT INTO rollup_days (day) VALUES (:day) ON CONFLICT (day) DO NOTHING RETURNING day
""")

_INSERT_ROWS = text("""
INSERT INTO daily_rollups (day, client, provider, model, lane, tasks_in, succeeded, failed,
    cancelled, retried, replayed, dismissed, finished, finished_ok, spend_usd, sync_usd,
    unattributed_usd, unpriced, lane_succeeded, lane_failed, lane_spend_usd, latency)
SELECT :day, * FROM unnest(
    CAST(:client AS text[]), CAST(:provider AS text[]), CAST(:model AS text[]),
    CAST(:lane AS text[]), CAST(:tasks_in AS bigint[]), CAST(:succeeded AS bigint[]),
    CAST(:failed AS bigint[]), CAST(:cancelled AS bigint[]), CAST(:retried AS bigint[]),
    CAST(:replayed AS bigint[]),
    CAST(:dismissed AS bigint[]), CAST(:finished AS bigint[]), CAST(:finished_ok AS bigint[]),
    CAST(:spend_usd AS numeric[]), CAST(:sync_usd AS numeric[]),
    CAST(:unattributed_usd AS numeric[]), CAST(:unpriced AS bool[]),
    CAST(:lane_succeeded AS bigint[]), CAST(:lane_failed AS bigint[]),
    CAST(:lane_spend_usd AS numeric[]), CAST(:latency AS jsonb[]))
""")


async def store_day(
    conn: AsyncConnection, day: date, rows: dict[tuple[str, str, str, str], dict[str, Any]]
) -> bool:
    """Store a closed day once: False (and nothing written) when another
    replica stored it first. The caller's transaction holds both writes."""
    if (await conn.execute(_INSERT_MARK, {"day": day})).first() is None:
        return False
    if rows:
        cols: dict[str, list[Any]] = {name: [] for name in (*DIMS, *COUNTS, *MONEY)}
        cols["unpriced"], cols["latency"] = [], []
        for key, values in rows.items():
            for name, part in zip(DIMS, key, strict=True):
                cols[name].append(part)
            for name in (*COUNTS, *MONEY, "unpriced"):
                cols[name].append(values[name])
            cols["latency"].append(orjson.dumps(values["latency"]).decode())
        await conn.execute(_INSERT_ROWS, {"day": day, **cols})
    return True


async def rolled_days(conn: AsyncConnection, first: date, last: date) -> set[date]:
    rows = await conn.execute(
        text("SELECT day FROM rollup_days WHERE day BETWEEN :first AND :last"),
        {"first": first, "last": last},
    )
    return {r[0] for r in rows}


async def last_rolled_day(conn: AsyncConnection) -> date | None:
    found: date | None = (await conn.execute(text("SELECT max(day) FROM rollup_days"))).scalar_one()
    return found


async def first_activity(conn: AsyncConnection) -> datetime | None:
    """When anything the report counts first happened (each by its index)."""
    found: datetime | None = (
        await conn.execute(
            text("""
        SELECT least((SELECT min(created_at) FROM tasks),
                     (SELECT min(created_at) FROM task_events),
                     (SELECT min(routed_at) FROM batches WHERE state = 'routed'),
                     (SELECT min(settled_at) FROM sync_spend))""")
        )
    ).scalar_one()
    return found


async def stored_rows(
    conn: AsyncConnection, first: date, last: date, client: str | None
) -> list[dict[str, Any]]:
    """The stored rows of the days [first, last] (one client's, or all)."""
    rows = await conn.execute(
        text("""
        SELECT * FROM daily_rollups
        WHERE day BETWEEN :first AND :last
          AND (CAST(:client AS text) IS NULL OR client = :client)"""),
        {"first": first, "last": last, "client": client},
    )
    return [dict(r) for r in rows.mappings()]


async def manual_queue_before(
    conn: AsyncConnection, day: date, client: str | None
) -> dict[str, int]:
    """Each client's tasks in the manual queue when ``day`` began, from the
    stored days: every failure enters it once, every replay or dismissal
    leaves it once."""
    rows = await conn.execute(
        text("""
        SELECT client, sum(failed - replayed - dismissed) FROM daily_rollups
        WHERE day < :day AND (CAST(:client AS text) IS NULL OR client = :client)
        GROUP BY client"""),
        {"day": day, "client": client},
    )
    return {r[0]: int(r[1]) for r in rows if r[1]}
