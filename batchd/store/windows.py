"""Windows to batches: what is queued per window, claiming a window's tasks into
a batch, what is in flight, and a batch's input lines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd.store.jobs import moved_deltas

# The distinct window keys of the queue, by a skip scan of the partial index
# on queued tasks (one index probe per key, however deep the queue).
QUEUED_KEYS = """
WITH RECURSIVE keys AS (
    (SELECT provider, endpoint, model FROM tasks WHERE state = 'queued'
     ORDER BY provider, endpoint, model LIMIT 1)
    UNION ALL
    SELECT nxt.provider, nxt.endpoint, nxt.model FROM keys k, LATERAL (
        SELECT provider, endpoint, model FROM tasks
        WHERE state = 'queued'
          AND (provider, endpoint, model) > (k.provider, k.endpoint, k.model)
        ORDER BY provider, endpoint, model LIMIT 1) nxt
)"""


@dataclass(frozen=True, slots=True)
class WindowStat:
    provider: str
    endpoint: str
    model: str
    count: int
    oldest: datetime
    input_bytes: int
    now: datetime


async def queued_windows(conn: AsyncConnection, cap: int) -> list[WindowStat]:
    """Each window key (provider, endpoint, model) with eligible tasks: how
    many (counted up to ``cap``), the oldest one's ``not_before`` and the input
    bytes of those counted.

    The distinct keys come from a skip scan over the partial index, and each
    window is counted only up to the cap, so a deep queue stays cheap.
    """
    rows = await conn.execute(
        text(
            QUEUED_KEYS
            + """
        SELECT k.provider, k.endpoint, k.model, w.n, w.oldest, w.nbytes, now() AS now
        FROM keys k, LATERAL (
            SELECT count(*) AS n, min(not_before) AS oldest,
                   coalesce(sum(line_bytes), 0) AS nbytes FROM (
                SELECT not_before, line_bytes FROM tasks
                WHERE state = 'queued' AND lane = 'batch' AND provider = k.provider
                  AND endpoint = k.endpoint AND model = k.model
                  AND not_before <= now()
                ORDER BY not_before LIMIT :cap) s
        ) w
        WHERE w.n > 0"""
        ),
        {"cap": cap},
    )
    return [WindowStat(*r) for r in rows]


@dataclass(frozen=True, slots=True)
class Claim:
    picked: int
    count: int
    input_bytes: int
    est_input_tokens: int
    est_output_tokens: int
    reserved_pico: int = 0  # the kept tasks' reservations, in 1e-12 USD
    budget_cut: bool = False  # tasks that fit the file were left for the budget
    # The kept tasks' reservations by client (1e-12 USD), for client caps.
    by_client: dict[str | None, int] | None = None


@dataclass(frozen=True, slots=True)
class Reserve:
    """What a task reserves: ceil(input estimate * factor) * input price +
    output estimate * output price, prices in 1e-12 USD a token; and how
    much is left today (None: no budget)."""

    factor: Decimal
    input_pico: int
    output_pico: int
    left_pico: int | None
    # What each capped client has left today (1e-12 USD): its tasks past it
    # wait, the other clients' go on.
    client_left: dict[str, int] | None = None


async def claim_window(
    conn: AsyncConnection,
    *,
    batch_id: str,
    endpoint: str,
    model: str,
    limit: int,
    max_bytes: int,
    reserve: Reserve | None = None,
    provider: str = "openai",
) -> Claim:
    """Assign up to ``limit`` eligible tasks of a window to ``batch_id``,
    oldest first, stopping before the input file would pass ``max_bytes``
    or their reservations the budget left (``reserve``): the part of a
    window that fits goes, the rest waits. Counts the attempt.

    The update finds each row by the ``ctid`` it was locked at: the row lock
    keeps it there until commit, and a TID fetch costs no primary-key
    descent (a sixth of the statement's buffer reads for 50,000 rows)."""
    reserve = reserve or Reserve(Decimal(1), 0, 0, None)
    row = await conn.execute(
        text(f"""
        WITH picked AS (
            SELECT ctid, id, line_bytes, not_before, client,
                   ceil(est_input_tokens * CAST(:factor AS numeric)) * CAST(:pin AS numeric)
                     + est_output_tokens * CAST(:pout AS numeric) AS res
            FROM tasks
            WHERE state = 'queued' AND lane = 'batch' AND provider = :pv AND endpoint = :ep
              AND model = :mdl AND not_before <= now()
            ORDER BY not_before, id LIMIT :lim
            FOR UPDATE SKIP LOCKED
        ), own AS (
            -- Each capped client's tasks in order: those past its cap wait.
            SELECT p.*, c.left_pico,
                   sum(p.res) OVER (PARTITION BY p.client ORDER BY p.not_before, p.id) AS mine
            FROM picked p LEFT JOIN unnest(CAST(:cap_names AS text[]),
                                           CAST(:cap_left AS numeric[])) AS c(name, left_pico)
                 ON c.name = p.client
        ), sized AS (
            SELECT ctid, id, res, sum(line_bytes) OVER w AS running, row_number() OVER w AS n,
                   sum(res) OVER w AS reserved FROM own
            WHERE left_pico IS NULL OR mine <= left_pico
            WINDOW w AS (ORDER BY not_before, id)
        ), in_file AS (
            -- The first task always goes as far as the file is concerned:
            -- ingest keeps every task under the limit, and skipping it would
            -- stall the window behind it.
            SELECT * FROM sized WHERE running <= :maxb OR n = 1
        ), kept AS (
            -- The input file is written in id order: its line numbers, fixed now.
            SELECT ctid, res, row_number() OVER (ORDER BY id) AS line FROM in_file
            WHERE CAST(:left AS numeric) IS NULL OR reserved <= CAST(:left AS numeric)
        ), upd AS (
            UPDATE tasks t SET state = 'submitted', batch_id = :bid, attempts = t.attempts + 1,
                   batch_line = k.line, submitted_at = now(), updated_at = now()
            FROM kept k WHERE t.ctid = k.ctid
            RETURNING t.line_bytes, t.est_input_tokens, t.est_output_tokens, k.res, t.client,
                      t.job
        ), jd AS ({moved_deltas("upd", "'queued'", "'submitted'")}
        )
        SELECT (SELECT count(*) FROM picked), count(*), coalesce(sum(line_bytes), 0),
               coalesce(sum(est_input_tokens), 0), coalesce(sum(est_output_tokens), 0),
               coalesce(sum(res), 0),
               (SELECT count(*) FROM in_file) > count(*)
                 OR (SELECT count(*) FROM own) > (SELECT count(*) FROM sized),
               (SELECT coalesce(jsonb_agg(jsonb_build_array(client, s)), '[]')
                FROM (SELECT client, sum(res) AS s FROM upd GROUP BY client) g)
        FROM upd"""),
        {
            "pv": provider,
            "ep": endpoint,
            "mdl": model,
            "lim": limit,
            "bid": batch_id,
            "maxb": max_bytes,
            "factor": reserve.factor,
            "pin": reserve.input_pico,
            "pout": reserve.output_pico,
            "left": reserve.left_pico,
            "cap_names": list((reserve.client_left or {}).keys()),
            "cap_left": list((reserve.client_left or {}).values()),
        },
    )
    picked, count, nbytes, est_in, est_out, reserved, cut, by_client = row.one()
    shares = by_client if isinstance(by_client, list) else orjson.loads(by_client)
    return Claim(
        int(picked),
        int(count),
        int(nbytes),
        int(est_in),
        int(est_out),
        int(reserved),
        bool(cut),
        {c: int(Decimal(str(s))) for c, s in shares},
    )


async def insert_batch(
    conn: AsyncConnection,
    *,
    batch_id: str,
    provider: str,
    endpoint: str,
    model: str,
    reason: str,
    claim: Claim,
    spend_day: date,
    reserved_usd: Decimal,
    owner: str,
    lease_seconds: float,
) -> None:
    await conn.execute(
        text("""
        INSERT INTO batches (id, provider, endpoint, model, state, flush_reason, item_count,
                             input_bytes, est_input_tokens, spend_day, reserved_usd,
                             lease_owner, lease_until, own_line_ids)
        VALUES (:id, :pv, :ep, :mdl, 'building', :reason, :n, :nb, :ei, :day, :res, :owner,
                now() + make_interval(secs => :lease), true)"""),
        {
            "id": batch_id,
            "pv": provider,
            "ep": endpoint,
            "mdl": model,
            "reason": reason,
            "n": claim.count,
            "ei": claim.est_input_tokens,
            "nb": claim.input_bytes,
            "day": spend_day,
            "res": reserved_usd,
            "owner": owner,
            "lease": lease_seconds,
        },
    )


async def token_held_models(conn: AsyncConnection) -> set[tuple[str, str]]:
    """(provider, model) pairs whose last batch hit the provider's
    enqueued-token cap and that still have a live batch there: their windows
    wait for one to finish."""
    rows = await conn.execute(
        text("""
        SELECT DISTINCT b.provider, b.model FROM batches b
        WHERE b.token_limited AND b.routed_at > now() - interval '1 day'
          AND NOT EXISTS (SELECT 1 FROM batches o WHERE o.model = b.model
                          AND o.provider = b.provider
                          AND o.finished_at > b.routed_at AND NOT o.token_limited)
          AND EXISTS (SELECT 1 FROM batches l WHERE l.model = b.model
                      AND l.provider = b.provider AND l.state = 'submitted')
    """)
    )
    return {(r[0], r[1]) for r in rows}


@dataclass(frozen=True, slots=True)
class InFlight:
    requests: int = 0
    input_tokens: int = 0


async def in_flight(conn: AsyncConnection) -> dict[tuple[str, str], InFlight]:
    """Requests and estimated input tokens of the batches not yet finished
    at each provider, by (provider, model): what waits in its queue. Read
    every scheduler tick, so through the live-batch index (its predicate,
    state <> 'routed', spelled out): a year of routed batches is never read."""
    rows = await conn.execute(
        text("""
        SELECT provider, model, sum(item_count), sum(est_input_tokens) FROM batches
        WHERE state <> 'routed' AND state IN ('building', 'uploading', 'submitted')
        GROUP BY provider, model""")
    )
    return {(r[0], r[1]): InFlight(int(r[2]), int(r[3])) for r in rows}


_BATCH_LINES_PAGE = """
    SELECT id, endpoint, body::text, batch_line, replay_count, attempts, client, custom_id
    FROM tasks
    WHERE batch_id = $1 AND id > $2 AND state = 'submitted'
    ORDER BY batch_id, id LIMIT $3"""


async def stream_batch_lines(
    conn: AsyncConnection, batch_id: str, chunk: int = 2000
) -> AsyncGenerator[Sequence[Any], None]:
    """The tasks of a batch in file order, in chunks of (id, endpoint, body as
    JSON text, batch_line, replay_count, attempts, client, custom_id)
    records. Close it (``aclosing``) before the connection: a page may still
    be in flight.

    Each chunk is the next range of the ``tasks_batch_held`` index, read in
    file order. A bitmap scan, which the planner takes for a batch it has no
    statistics for yet, loses that order and sorts the bodies on disk (30 MB
    for 50,000 lines), so it is off for this read. The rows come straight
    from the driver, bodies as text: SQLAlchemy's row layer and per-value
    jsonb decoder cost more CPU than building the lines (two thirds of a
    50,000-line stream's). The next page is read while the caller writes
    this one, so the database and the caller work at the same time."""
    await conn.execute(text("SET LOCAL enable_bitmapscan = off"))
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    ahead: asyncio.Future[Any] | None = None
    try:
        rows = await driver.fetch(_BATCH_LINES_PAGE, batch_id, 0, chunk)
        while rows:
            if len(rows) == chunk:
                ahead = asyncio.ensure_future(
                    driver.fetch(_BATCH_LINES_PAGE, batch_id, rows[-1][0], chunk)
                )
                await asyncio.sleep(0)  # the query goes out before the caller's work
            yield rows
            rows = await ahead if ahead is not None else []
            ahead = None
    finally:
        if ahead is not None:
            ahead.cancel()
            await asyncio.gather(ahead, return_exceptions=True)


async def renumber_batch_lines(
    conn: AsyncConnection, task_ids: Sequence[int], lines: Sequence[int]
) -> None:
    """Line numbers of a file written after a task left its batch (the file
    closes the gap, so the tasks after it moved up)."""
    await conn.execute(
        text("""
        UPDATE tasks t SET batch_line = u.line
        FROM unnest(CAST(:ids AS bigint[]), CAST(:lines AS int[])) AS u(id, line)
        WHERE t.id = u.id"""),
        {"ids": list(task_ids), "lines": list(lines)},
    )
