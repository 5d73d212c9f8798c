"""Every SQL statement batchd runs, one function per question.

Every statement that adds tasks or changes ``tasks.state`` also writes, in
the same statement, the job deltas of what it moved (store/jobs.py
``added_deltas``/``moved_deltas``): the job counters are kept nowhere else,
and tests/invariants.py checks them against the tasks.

Functions take an open connection; the caller owns the transaction, so a
step that must be atomic (claim tasks + create the batch row) is one
``async with engine.begin()`` in the flow module. Bulk writes go through
``unnest`` of parallel arrays: one statement per chunk, never a loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import CursorResult, TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.util.typing import TupleAny

from batchd.backoff import sql_equal_jitter, sql_exponential
from batchd.domain import TaskIn
from batchd.prices import Tokens
from batchd.store.jobs import LOCAL, added_deltas, moved_deltas, open_jobs


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


# --------------------------------------------------------------------- ingest

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
    await conn.execute(text("SELECT set_config('lock_timeout', :ms, true)"),
                       {"ms": f"{max(1, int(seconds * 1000))}ms"})


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
    rows = await conn.execute(_INSERT_TASKS, {
        "pv": pv, "pv1": pv1,
        "cid": [t.custom_id for t in tasks],
        "ep": ep, "ep1": ep1,
        "mdl": mdl, "mdl1": mdl1,
        "bdy": [t.body_json or orjson.dumps(t.body).decode() for t in tasks],
        "dg": [t.digest for t in tasks],
        "md": _or_null([_json(t.metadata) for t in tasks]),
        "lb": [t.line_bytes for t in tasks],
        "ei": [t.est_input_tokens for t in tasks],
        "eo": [t.est_output_tokens for t in tasks],
        "ln": ln, "ln1": ln1,
        "bd": _or_null([t.backdate_seconds or None for t in tasks]),
        "dl": _or_null([t.deadline for t in tasks]),
        "fb": _or_null([t.fallback_at for t in tasks]),
        "cl": cl, "cl1": cl1,
        "cb": _or_null([t.callback_url for t in tasks]),
        "fa": _or_null([t.fallback_action for t in tasks]),
        "jb": jb, "jb1": jb1,
    })
    inserted: list[TaskKey] = [(r[0], r[1]) for r in rows]
    if len(inserted) == len(tasks):
        return IngestResult(inserted, {}, [])
    fresh = set(inserted)
    others = [t for t in tasks if (t.client, t.custom_id) not in fresh]
    found = await conn.execute(_EXISTING_DIGESTS, {"cl": [t.client for t in others],
                                                   "ids": [t.custom_id for t in others]})
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


async def queued_by_client(conn: AsyncConnection) -> dict[str, int]:
    """Queued tasks of each client that has any (BATCHD_CLIENT_MAX_QUEUED, the
    per-client queue gauge)."""
    rows = await conn.execute(text("""
        SELECT client, count(*) FROM tasks WHERE state = 'queued' GROUP BY client"""))
    return {c: int(n) for c, n in rows}


async def get_task(conn: AsyncConnection, client: str, custom_id: str) -> dict[str, Any] | None:
    """A task by its caller's key: another client's custom_id is not found."""
    row = await conn.execute(text("""
        SELECT t.custom_id, t.endpoint, t.model, t.state, t.attempts, t.batch_id,
               t.last_error, t.replay_count, t.metadata, t.created_at, t.updated_at,
               t.submitted_at, t.finished_at, t.not_before, t.client, t.callback_url,
               r.status_code, r.response, round(r.cost_usd, 6) AS cost_usd, r.unpriced,
               t.lane, b.state AS b_state, b.provider_batch_id AS b_pid,
               b.provider_status AS b_status
        FROM tasks t LEFT JOIN results r ON r.task_id = t.id AND t.state = 'succeeded'
        LEFT JOIN batches b ON b.id = t.batch_id AND t.state = 'submitted'
        WHERE t.client = :cl AND t.custom_id = :cid"""), {"cl": client, "cid": custom_id})
    found = row.mappings().first()
    if not found:
        return None
    task = dict(found)
    task["location"] = _location(task.pop("lane"), task.pop("b_state"), task.pop("b_pid"),
                                 task.pop("b_status"), task)
    return task


def _location(lane: str, b_state: str | None, b_pid: str | None, b_status: str | None,
              task: dict[str, Any]) -> dict[str, Any]:
    """Where a task really is: its own state says queued/submitted/finished,
    its batch row says whether a 'submitted' task reached the provider."""
    state = task["state"]
    if state == "queued":
        return {"stage": "queued", "eligible_at": task["not_before"]}
    if state in ("succeeded", "failed"):
        return {"stage": "routed", "outcome": state, "batch_id": task["batch_id"]}
    if b_state is None:  # a sync-lane claim holds no batch row
        return {"stage": "sync_call" if lane == "sync" else "uploading",
                "batch_id": task["batch_id"]}
    if b_state in ("building", "uploading"):
        return {"stage": "uploading", "batch_id": task["batch_id"], "batch_state": b_state}
    if b_state == "submitted":
        return {"stage": "at_provider", "batch_id": task["batch_id"], "batch_state": b_state,
                "provider_batch_id": b_pid, "provider_status": b_status}
    return {"stage": "routing", "batch_id": task["batch_id"], "batch_state": b_state,
            "provider_batch_id": b_pid, "provider_status": b_status}


async def finished_custom_ids(conn: AsyncConnection, client: str,
                              custom_ids: list[str]) -> set[str]:
    """Which of ``client``'s tasks are finished: succeeded, failed, or
    cancelled with their job (one query for all ?wait callers of one client)."""
    rows = await conn.execute(text("""
        SELECT custom_id FROM tasks
        WHERE client = :client AND custom_id = ANY(:ids)
          AND state IN ('succeeded', 'failed', 'cancelled')"""),
        {"ids": custom_ids, "client": client})
    return {r[0] for r in rows}


async def get_tasks(conn: AsyncConnection, client: str, custom_ids: Sequence[str]
                    ) -> dict[str, dict[str, Any]]:
    """Several of one client's tasks (as get_task), by custom_id, in one query."""
    rows = await conn.execute(text("""
        SELECT t.custom_id, t.endpoint, t.model, t.state, t.attempts, t.batch_id,
               t.last_error, t.replay_count, t.metadata, t.created_at, t.updated_at,
               t.submitted_at, t.finished_at, t.not_before, t.client, t.callback_url,
               r.status_code, r.response, round(r.cost_usd, 6) AS cost_usd, r.unpriced
        FROM tasks t LEFT JOIN results r ON r.task_id = t.id AND t.state = 'succeeded'
        WHERE t.client = :cl AND t.custom_id = ANY(CAST(:cids AS text[]))"""),
        {"cl": client, "cids": list(custom_ids)})
    return {r["custom_id"]: dict(r) for r in rows.mappings()}


async def page_results(conn: AsyncConnection, after: int, limit: int,
                       client: str | None = None) -> list[dict[str, Any]]:
    """Results in completion order: one client's, or (None) every client's."""
    rows = await conn.execute(text("""
        SELECT seq, client, custom_id, batch_id, status_code, response,
               round(cost_usd, 6) AS cost_usd, unpriced, created_at
        FROM results WHERE seq > :after
          AND (CAST(:client AS text) IS NULL OR client = :client)
        ORDER BY seq LIMIT :limit"""),
        {"after": after, "limit": limit, "client": client})
    return [dict(r) for r in rows.mappings()]


async def page_failed(
    conn: AsyncConnection, after: int, limit: int, *, reason: str | None = None,
    day: date | None = None, endpoint: str | None = None, client: str | None = None,
) -> list[dict[str, Any]]:
    rows = await conn.execute(text("""
        SELECT id, client, custom_id, endpoint, model, attempts, replay_count, batch_id,
               last_error, created_at, finished_at
        FROM tasks
        WHERE state = 'failed' AND id > :after
          AND (CAST(:client AS text) IS NULL OR client = :client)
          AND (CAST(:reason AS text) IS NULL OR last_error->>'code' = :reason)
          AND (CAST(:day AS date) IS NULL OR (finished_at AT TIME ZONE 'UTC')::date = :day)
          AND (CAST(:endpoint AS text) IS NULL OR endpoint = :endpoint)
        ORDER BY id LIMIT :limit"""),
        {"after": after, "limit": limit, "reason": reason, "day": day, "endpoint": endpoint,
         "client": client})
    return [dict(r) for r in rows.mappings()]


# ------------------------------------------------------------------ scheduler

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
    rows = await conn.execute(text("""
        WITH RECURSIVE keys AS (
            (SELECT provider, endpoint, model FROM tasks WHERE state = 'queued'
             ORDER BY provider, endpoint, model LIMIT 1)
            UNION ALL
            SELECT nxt.provider, nxt.endpoint, nxt.model FROM keys k, LATERAL (
                SELECT provider, endpoint, model FROM tasks
                WHERE state = 'queued'
                  AND (provider, endpoint, model) > (k.provider, k.endpoint, k.model)
                ORDER BY provider, endpoint, model LIMIT 1) nxt
        )
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
        WHERE w.n > 0"""), {"cap": cap})
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
    conn: AsyncConnection, *, batch_id: str, endpoint: str, model: str, limit: int,
    max_bytes: int, reserve: Reserve | None = None, provider: str = "openai",
) -> Claim:
    """Assign up to ``limit`` eligible tasks of a window to ``batch_id``,
    oldest first, stopping before the input file would pass ``max_bytes``
    or their reservations the budget left (``reserve``): the part of a
    window that fits goes, the rest waits. Counts the attempt.

    The update finds each row by the ``ctid`` it was locked at: the row lock
    keeps it there until commit, and a TID fetch costs no primary-key
    descent (a sixth of the statement's buffer reads for 50,000 rows)."""
    reserve = reserve or Reserve(Decimal(1), 0, 0, None)
    row = await conn.execute(text(f"""
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
        {"pv": provider, "ep": endpoint, "mdl": model, "lim": limit, "bid": batch_id,
         "maxb": max_bytes,
         "factor": reserve.factor, "pin": reserve.input_pico, "pout": reserve.output_pico,
         "left": reserve.left_pico, "cap_names": list((reserve.client_left or {}).keys()),
         "cap_left": list((reserve.client_left or {}).values())})
    picked, count, nbytes, est_in, est_out, reserved, cut, by_client = row.one()
    shares = by_client if isinstance(by_client, list) else orjson.loads(by_client)
    return Claim(int(picked), int(count), int(nbytes), int(est_in), int(est_out),
                 int(reserved), bool(cut), {c: int(Decimal(str(s))) for c, s in shares})


async def insert_batch(
    conn: AsyncConnection, *, batch_id: str, provider: str, endpoint: str, model: str,
    reason: str, claim: Claim, spend_day: date, reserved_usd: Decimal, owner: str,
    lease_seconds: float,
) -> None:
    await conn.execute(text("""
        INSERT INTO batches (id, provider, endpoint, model, state, flush_reason, item_count,
                             input_bytes, est_input_tokens, spend_day, reserved_usd,
                             lease_owner, lease_until, own_line_ids)
        VALUES (:id, :pv, :ep, :mdl, 'building', :reason, :n, :nb, :ei, :day, :res, :owner,
                now() + make_interval(secs => :lease), true)"""),
        {"id": batch_id, "pv": provider, "ep": endpoint, "mdl": model, "reason": reason,
         "n": claim.count, "ei": claim.est_input_tokens,
         "nb": claim.input_bytes, "day": spend_day, "res": reserved_usd, "owner": owner,
         "lease": lease_seconds})


# Settled cost, else the open reservation, of the day's batches and
# synchronous calls; the budget check and the budget gauge both read this.
DAY_SPEND_SQL = """
    (SELECT coalesce(sum(coalesce(cost_usd, reserved_usd)), 0) FROM batches
     WHERE spend_day = :day)
  + (SELECT coalesce(sum(coalesce(cost_usd, reserved_usd)), 0) FROM sync_spend
     WHERE spend_day = :day)"""


async def day_spend(conn: AsyncConnection, day: date) -> Decimal:
    """Spent plus reserved on ``day``, batches and synchronous calls alike."""
    row = await conn.execute(text(f"SELECT {DAY_SPEND_SQL}"), {"day": day})
    return Decimal(row.scalar_one())


async def client_day_spend(conn: AsyncConnection, day: date) -> dict[str, Decimal]:
    """Each client's spend and open reservations on ``day`` (client caps)."""
    rows = await conn.execute(text("""
        SELECT client, sum(reserved_usd + cost_usd) FROM client_spend
        WHERE spend_day = :day GROUP BY client"""), {"day": day})
    return {client: Decimal(total) for client, total in rows}


async def reserve_client_spend(conn: AsyncConnection, day: date, batch_id: str,
                               shares: dict[str, Decimal]) -> None:
    """A batch's or sync claim's reservation, per client."""
    if not shares:
        return
    await conn.execute(text("""
        INSERT INTO client_spend (spend_day, client, batch_id, reserved_usd)
        SELECT :day, c, :bid, r FROM unnest(CAST(:c AS text[]), CAST(:r AS numeric[])) AS u(c, r)
        """), {"day": day, "bid": batch_id, "c": list(shares), "r": list(shares.values())})


async def settle_client_spend(conn: AsyncConnection, batch_id: str,
                              costs: dict[str, Decimal]) -> None:
    """A routed batch: each client's reservation becomes its results' cost."""
    await conn.execute(text("""
        UPDATE client_spend s SET reserved_usd = 0, cost_usd = coalesce((
            SELECT u.cost FROM unnest(CAST(:c AS text[]), CAST(:v AS numeric[]))
                 AS u(client, cost) WHERE u.client = s.client), 0)
        WHERE s.batch_id = :bid"""),
        {"bid": batch_id, "c": list(costs), "v": list(costs.values())})


async def settle_client_call(conn: AsyncConnection, claim_id: str, client: str,
                             reserved: Decimal, paid: Decimal) -> None:
    """One sync call of a claim answered: its reservation becomes its cost."""
    await conn.execute(text("""
        UPDATE client_spend SET reserved_usd = greatest(reserved_usd - :res, 0),
               cost_usd = cost_usd + :paid
        WHERE batch_id = :claim AND client = :client"""),
        {"claim": claim_id, "client": client, "res": reserved, "paid": paid})


async def lock_budget(conn: AsyncConnection) -> None:
    """Serialise budget checks across replicas until the transaction ends."""
    await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('batchd.budget'))"))


async def token_held_models(conn: AsyncConnection) -> set[tuple[str, str]]:
    """(provider, model) pairs whose last batch hit the provider's
    enqueued-token cap and that still have a live batch there: their windows
    wait for one to finish."""
    rows = await conn.execute(text("""
        SELECT DISTINCT b.provider, b.model FROM batches b
        WHERE b.token_limited AND b.routed_at > now() - interval '1 day'
          AND NOT EXISTS (SELECT 1 FROM batches o WHERE o.model = b.model
                          AND o.provider = b.provider
                          AND o.finished_at > b.routed_at AND NOT o.token_limited)
          AND EXISTS (SELECT 1 FROM batches l WHERE l.model = b.model
                      AND l.provider = b.provider AND l.state = 'submitted')
    """))
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
    rows = await conn.execute(text("""
        SELECT provider, model, sum(item_count), sum(est_input_tokens) FROM batches
        WHERE state <> 'routed' AND state IN ('building', 'uploading', 'submitted')
        GROUP BY provider, model"""))
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
                    driver.fetch(_BATCH_LINES_PAGE, batch_id, rows[-1][0], chunk))
                await asyncio.sleep(0)  # the query goes out before the caller's work
            yield rows
            rows = await ahead if ahead is not None else []
            ahead = None
    finally:
        if ahead is not None:
            ahead.cancel()
            await asyncio.gather(ahead, return_exceptions=True)


async def renumber_batch_lines(conn: AsyncConnection, task_ids: Sequence[int],
                               lines: Sequence[int]) -> None:
    """Line numbers of a file written after a task left its batch (the file
    closes the gap, so the tasks after it moved up)."""
    await conn.execute(text("""
        UPDATE tasks t SET batch_line = u.line
        FROM unnest(CAST(:ids AS bigint[]), CAST(:lines AS int[])) AS u(id, line)
        WHERE t.id = u.id"""), {"ids": list(task_ids), "lines": list(lines)})


# ---------------------------------------------------------- batch bookkeeping

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
            params[key] = _json(value)
        else:
            assigns.append(f"{key} = :{key}")
            params[key] = value
    sql = f"UPDATE batches SET {', '.join(assigns)}, updated_at = now() WHERE id = :_id"
    await conn.execute(text(sql), params)


async def batch_owns_line_ids(conn: AsyncConnection, batch_id: str) -> bool:
    """Whether the batch's input file carries batchd's line ids (see
    resolve_legacy_lines for one that does not)."""
    row = await conn.execute(text("SELECT own_line_ids FROM batches WHERE id = :id"),
                             {"id": batch_id})
    return bool(row.scalar_one_or_none())


async def renew_claim(conn: AsyncConnection, batch_id: str, owner: str, seconds: float) -> bool:
    """Extend our claim on an unsent batch; False when it is no longer ours
    (our lease lapsed and another replica took it, or it was recorded)."""
    rows = await conn.execute(text("""
        UPDATE batches SET lease_until = now() + make_interval(secs => :s), updated_at = now()
        WHERE id = :id AND lease_owner = :owner AND state IN ('building', 'uploading')
        RETURNING 1"""), {"id": batch_id, "owner": owner, "s": seconds})
    return rows.first() is not None


async def record_submitted(conn: AsyncConnection, batch_id: str, *, provider_batch_id: str,
                           provider_status: str, input_file_id: str) -> str | None:
    """Mark an unsent batch as submitted, once. Returns None when this call
    recorded it, else the provider batch id someone recorded before."""
    rows = await conn.execute(text("""
        UPDATE batches SET state = 'submitted', provider_batch_id = :pid,
               provider_status = :status, input_file_id = :fid, submitted_at = now(),
               next_poll_at = now(), lease_owner = NULL, lease_until = NULL, updated_at = now()
        WHERE id = :id AND state IN ('building', 'uploading')
        RETURNING 1"""), {"id": batch_id, "pid": provider_batch_id, "status": provider_status,
                          "fid": input_file_id})
    if rows.first() is not None:
        return None
    earlier = await conn.execute(text("SELECT provider_batch_id FROM batches WHERE id = :id"),
                                 {"id": batch_id})
    return str(earlier.scalar_one_or_none() or "")


async def release_batch(conn: AsyncConnection, batch_id: str, owner: str, retry_in: float) -> None:
    """Give up our claim; anyone may pick the batch up after ``retry_in``. A
    claim that already lapsed to another replica is left alone."""
    await conn.execute(text("""
        UPDATE batches SET lease_owner = NULL,
               lease_until = now() + make_interval(secs => :s), updated_at = now()
        WHERE id = :id AND lease_owner = :owner"""),
        {"id": batch_id, "owner": owner, "s": retry_in})


async def recorded_provider_batches(conn: AsyncConnection, ids: Sequence[str]) -> set[str]:
    """Which of these provider batch ids a batch row of ours has recorded."""
    rows = await conn.execute(text(
        "SELECT provider_batch_id FROM batches WHERE provider_batch_id = ANY(CAST(:ids AS text[]))"
    ), {"ids": list(ids)})
    return {r[0] for r in rows}


async def creation_owner(conn: AsyncConnection, provider: str, created_at: float
                         ) -> str | None:
    """The batch whose create at ``provider`` was the last to start at or
    before ``created_at`` (a Unix time, as the provider stamps its batches)."""
    row = await conn.execute(text("""
        SELECT id FROM batches
        WHERE provider = :pv AND create_started_at <= to_timestamp(:ts)
        ORDER BY create_started_at DESC LIMIT 1"""), {"pv": provider, "ts": created_at})
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
    rows = await conn.execute(text(f"""
        UPDATE batches SET lease_owner = :owner,
               lease_until = now() + make_interval(secs => :lease), updated_at = now()
        WHERE id IN (SELECT id FROM batches
                     WHERE state IN ('building', 'uploading')
                       AND (lease_until IS NULL OR lease_until < now())
                     ORDER BY created_at LIMIT :lim FOR UPDATE SKIP LOCKED)
        RETURNING {BATCH_COLUMNS}"""), {"owner": owner, "lease": lease_seconds, "lim": limit})
    return [dict(r) for r in rows.mappings()]


async def claim_due_batches(
    conn: AsyncConnection, owner: str, lease_seconds: float, limit: int = 20
) -> list[dict[str, Any]]:
    """Submitted batches due for a status check, leased to ``owner``."""
    rows = await conn.execute(text(f"""
        UPDATE batches SET lease_owner = :owner,
               lease_until = now() + make_interval(secs => :lease), updated_at = now()
        WHERE id IN (SELECT id FROM batches
                     WHERE state = 'submitted' AND next_poll_at <= now()
                       AND (lease_until IS NULL OR lease_until < now())
                     ORDER BY next_poll_at LIMIT :lim FOR UPDATE SKIP LOCKED)
        RETURNING {BATCH_COLUMNS}"""), {"owner": owner, "lease": lease_seconds, "lim": limit})
    return [dict(r) for r in rows.mappings()]


async def release_unsent_tasks(conn: AsyncConnection, batch_id: str, error: dict[str, Any]) -> int:
    """A batch the provider never created: its tasks go back to the queue and
    the attempt that did not happen is taken back."""
    return sum((await requeue_remaining(conn, batch_id, error, count_attempt=False)).values())


# --------------------------------------------------------------------- router

# A success settles its task and stores its result in one statement: the
# task moves only from 'submitted' in this batch, so a line routed twice, a
# duplicate line or a task that left for the sync lane stores nothing. Two
# inputs fill it: parallel arrays (the sync lane, one call at a time) and the
# lines a route staged with COPY (below), with their exact costs.
# A batch success drops the task's body: its input file is archived, and
# only failed tasks are ever replayed from their body (README "Running it
# for a year"); the sync lane archives no input, so its tasks keep theirs.
_DROP_BODY = ", body = NULL"
_SUCCESS_SQL = """
WITH input AS ({input}
), done AS (
    UPDATE tasks t SET state = 'succeeded', finished_at = now(), updated_at = now(),
           last_error = NULL{drop_body}
    FROM input i
    -- One probe of the primary key a line (the line names its task). Matched
    -- on batch_id, the planner may take a fresh batch for one row (stale
    -- statistics) and rescan the whole input for each of the batch's tasks:
    -- 100,000,000 comparisons per chunk of a 50,000-line batch. IS TRUE keeps
    -- the batch index out of reach.
    WHERE t.id = i.tid AND (t.batch_id = :bid) IS TRUE AND t.state = 'submitted'
    RETURNING t.id AS task_id, t.client, t.custom_id, t.attempts, t.replay_count,
              t.callback_url, t.job, extract(epoch FROM now() - t.created_at) AS waited,
              t.est_input_tokens
), kept AS ({kept}
), jd AS (""" + moved_deltas("kept", "'submitted'", "'succeeded'", "cost", "sync") + """
), ev AS (
    INSERT INTO task_events (task_id, batch_id, attempt, outcome)
    SELECT task_id, :bid, attempts, 'succeeded' FROM kept
), cb AS (
    INSERT INTO callbacks (task_id, custom_id, client, url, task_state, task_attempts)
    SELECT task_id, custom_id, client, callback_url, 'succeeded', attempts FROM kept
    WHERE callback_url IS NOT NULL
), res AS (
    -- usage stays NULL: it is the response's own "usage" member, and a second
    -- copy cost ~230 bytes a result (README "Running it for a year").
    INSERT INTO results AS r (task_id, client, custom_id, batch_id, status_code, response,
                              usage, cost_usd, sync_cost_usd, replay_count, unpriced)
    SELECT task_id, client, custom_id, :bid, status, resp::jsonb, NULL, cost, sync,
           replay_count, unpriced
    FROM {rows}
    ON CONFLICT (task_id) DO UPDATE SET
        batch_id = excluded.batch_id, status_code = excluded.status_code,
        response = excluded.response, usage = excluded.usage, cost_usd = excluded.cost_usd,
        sync_cost_usd = excluded.sync_cost_usd, replay_count = excluded.replay_count,
        unpriced = excluded.unpriced, updated_at = now()
)
-- Every settled task gets its result row (DO UPDATE has no WHERE), so kept is
-- what was stored; res runs to completion whether read or not. (Joining to
-- res was a nested loop on the CTEs' one-row estimates: 4,000,000
-- comparisons per 2,000-line chunk.)
{final}
"""

async def _settle(conn: AsyncConnection, statement: TextClause, params: dict[str, Any]
                  ) -> CursorResult[*TupleAny]:
    """Run a settling statement (_SUCCESS_SQL, _FAIL_SQL) with the tasks read
    by primary key, one probe a line. With months of history the statistics
    say next to no task is 'submitted' (ANALYZE sees millions of finished
    ones), so the planner expects one row from a sequential scan of tasks
    and joins the lines to it: a scan of every task ever stored, per chunk
    (a 5,000-line route took 17 s over 200,000 finished tasks in the
    benchmark's history row). The statement reads no big table any other
    way, so sequential scans are off for it alone (a failure aborts the
    transaction, and the setting with it)."""
    await conn.execute(text("SET LOCAL enable_seqscan = off"))
    found = await conn.execute(statement, params)
    await conn.execute(text("SET LOCAL enable_seqscan = on"))
    return found


_UPSERT_SUCCESSES = text(_SUCCESS_SQL.format(input="""
    SELECT DISTINCT ON (tid) * FROM unnest(
        CAST(:tid AS bigint[]), CAST(:status AS int[]), CAST(:resp AS text[]),
        CAST(:usage AS text[]), CAST(:cost AS numeric[]), CAST(:sync AS numeric[]),
        CAST(:unpriced AS bool[]))
        AS t(tid, status, resp, usage, cost, sync, unpriced)""", kept="""
    SELECT i.*, d.* FROM input i JOIN done d ON d.task_id = i.tid""", rows="kept", final="""
SELECT tid, client FROM kept""", drop_body=""))


@dataclass(slots=True)
class SuccessRows:
    task_ids: list[int]
    status: list[int]
    responses: list[str]
    usages: list[str | None]
    costs: list[Decimal]
    sync_costs: list[Decimal]
    unpriced: list[bool]


async def store_successes(conn: AsyncConnection, batch_id: str, rows: SuccessRows
                          ) -> dict[int, str]:
    """Mark tasks succeeded and upsert their results: a line routed twice
    changes nothing the second time (the task is no longer submitted). A task
    with a callback_url gets its outbox row in the same statement.
    Returns the task ids this call settled, with their client."""
    if not rows.task_ids:
        return {}
    stored = await _settle(conn, _UPSERT_SUCCESSES, {
        "bid": batch_id, "tid": rows.task_ids, "status": rows.status,
        "resp": rows.responses, "usage": rows.usages, "cost": rows.costs,
        "sync": rows.sync_costs, "unpriced": rows.unpriced})
    return {int(tid): client for tid, client in stored}


# Backoff in SQL is domain.backoff_seconds (batchd/backoff.py writes both): the
# attempt count lives in the row, the jitter comes from the caller so tests
# can pin it.
_RETRY_DELAY = sql_equal_jitter(sql_exponential("t.attempts - 1"), "i.jitter")
_FAIL_SQL = """
WITH input AS ({input}
), upd AS (
    UPDATE tasks t SET
        state = CASE WHEN i.final OR t.attempts >= :max_attempts THEN 'failed' ELSE 'queued' END,
        batch_id = CASE WHEN i.final OR t.attempts >= :max_attempts THEN t.batch_id END,
        not_before = CASE WHEN i.final OR t.attempts >= :max_attempts THEN t.not_before
            ELSE now() + make_interval(secs => """ + _RETRY_DELAY + """) END,
        finished_at = CASE WHEN i.final OR t.attempts >= :max_attempts THEN now() END,
        last_error = i.err::jsonb, updated_at = now()
    FROM input i
    -- By the task's id, as in _SUCCESS_SQL (IS TRUE: not the batch index).
    WHERE t.id = i.tid AND (t.batch_id = :bid) IS TRUE AND t.state = 'submitted'
    RETURNING t.id, t.client, t.custom_id, t.attempts, t.state, t.callback_url, t.job
), jd AS (""" + moved_deltas("upd", "'submitted'", "state") + """
), ev AS (
    INSERT INTO task_events (task_id, batch_id, attempt, outcome, error)
    SELECT u.id, :bid, u.attempts,
           CASE WHEN u.state = 'failed' THEN 'failed' ELSE 'retried' END, i.err::jsonb
    FROM upd u JOIN input i ON i.tid = u.id
), cb AS (
    INSERT INTO callbacks (task_id, custom_id, client, url, task_state, task_attempts,
                           task_error)
    SELECT u.id, u.custom_id, u.client, u.callback_url, 'failed', u.attempts, i.err::jsonb
    FROM upd u JOIN input i ON i.tid = u.id
    WHERE u.state = 'failed' AND u.callback_url IS NOT NULL
)
SELECT CASE WHEN state = 'failed' THEN 'failed' ELSE 'retried' END, client FROM upd
"""
_FAIL_LINES = text(_FAIL_SQL.format(input="""
    SELECT DISTINCT ON (tid) * FROM unnest(
        CAST(:tid AS bigint[]), CAST(:final AS bool[]), CAST(:err AS text[]),
        CAST(:jitter AS float8[])) AS t(tid, final, err, jitter)"""))


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float
    max_attempts: int
    cap: float = 86_400.0


async def store_failures(
    conn: AsyncConnection, batch_id: str, task_ids: Sequence[int], finals: Sequence[bool],
    errors: Sequence[dict[str, Any]], jitters: Sequence[float], backoff: Backoff,
) -> dict[tuple[str, str], int]:
    """Retry or fail tasks (a failed task with a callback_url gets its outbox
    row in the same statement); returns counts by (outcome, client)."""
    if not task_ids:
        return {}
    rows = await _settle(conn, _FAIL_LINES, {
        "bid": batch_id, "tid": list(task_ids), "final": list(finals),
        "err": [orjson.dumps(e).decode() for e in errors], "jitter": list(jitters),
        **_backoff_params(backoff)})
    return _count_outcomes(rows)


def _backoff_params(backoff: Backoff) -> dict[str, Any]:
    return {"max_attempts": backoff.max_attempts, "base": backoff.base, "cap": backoff.cap}


def _count_outcomes(rows: Iterable[Any]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for outcome, client in rows:
        counts[outcome, client] = counts.get((outcome, client), 0) + 1
    return counts


# ------------------------------------------------------------- staged routes
#
# A route COPYs every line of its files into a temporary table, then settles
# them with one statement for the successes and one for the failures. Binary
# COPY is the cheapest way to hand PostgreSQL 50,000 rows; each line comes
# with its exact cost, stored as it is. The table lives until the route's
# transaction ends.

STAGE_COLUMNS = ("line", "tid", "cid", "ok", "status", "resp", "usage", "tin", "tcached",
                 "tout", "tcw", "cost", "sync", "final", "err", "jitter")


async def stage_lines(conn: AsyncConnection, records: Iterable[tuple[Any, ...]]) -> None:
    """COPY a route's lines (rows of STAGE_COLUMNS, streamed) into route_lines.
    Responses and usage go in as JSON text to jsonb columns: PostgreSQL parses
    them while the COPY streams, alongside the reading, not in the settling
    statement.

    Costs come exact (USD, prices.py: whole 1e-12 USD), at the batch and
    the sync price; a failure line has ok false and its error. The rows
    are produced while earlier ones are on the wire, so reading the files
    overlaps PostgreSQL's share of the work."""
    # Sorting a batch's lines (dedupe, the remainder ranking; narrow rows)
    # in memory, not in temporary files.
    await conn.execute(text("SET LOCAL work_mem = '64MB'"))
    await conn.execute(text("""
        CREATE TEMPORARY TABLE route_lines (
            line int NOT NULL, tid bigint, cid text NOT NULL, ok bool NOT NULL, status int,
            resp jsonb, usage jsonb, tin bigint, tcached bigint, tout bigint, tcw bigint,
            cost numeric, sync numeric, final bool, err text, jitter float8) ON COMMIT DROP"""))
    raw = await conn.get_raw_connection()
    await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
        "route_lines", records=records, columns=STAGE_COLUMNS)
    # The row count and task id statistics, so the settling statements plan
    # for the real size (the wide columns are left out: they cost the most).
    await conn.execute(text("ANALYZE route_lines (tid)"))


async def resolve_legacy_lines(conn: AsyncConnection, batch_id: str) -> None:
    """A batch built before batchd wrote its own line ids (migration 0011)
    carries the callers' custom_ids, unique among its tasks: each staged
    line finds its task by the custom_id within the batch. So a batch in
    flight across the upgrade still routes."""
    await conn.execute(text("""
        UPDATE route_lines l SET tid = t.id FROM tasks t
        WHERE t.custom_id = l.cid AND t.id IN (
            -- The batch's tasks: those not succeeded by tasks_batch_held, the
            -- ones that did by their results (a route resumed after a crash).
            SELECT id FROM tasks WHERE batch_id = :bid AND state <> 'succeeded'
            UNION ALL SELECT task_id FROM results WHERE batch_id = :bid)"""),
        {"bid": batch_id})


@dataclass(slots=True)
class StagedSuccesses:
    """What settling a route's staged success lines stored."""

    by_client: dict[str, int]
    tokens: Tokens  # of the stored lines
    cost: Decimal  # the stored results' exact costs, summed
    cost_by_client: dict[str | None, Decimal]
    sync_cost: Decimal
    waited: list[float]  # seconds from ingest to result, a stored task each
    estimated_input: int = 0  # the stored tasks' ingest estimates (calibration)

    @property
    def stored(self) -> int:
        return sum(self.by_client.values())


# Each result stores its line's exact cost (prices.py). A duplicate line
# keeps its first copy. Everything is sorted on narrow rows; the responses
# join in only where the results are written.
_STAGED_SUCCESSES = text(_SUCCESS_SQL.format(input="""
    SELECT DISTINCT ON (tid) line, tid, status, tin, tcached, tout, tcw, cost, sync
    FROM route_lines WHERE ok AND tid IS NOT NULL ORDER BY tid, line""", kept="""
    SELECT i.line, i.tid, i.status, i.tin, i.tcached, i.tout, i.tcw, d.*,
           CAST(:unpriced AS bool) AS unpriced, i.cost, i.sync
    FROM input i JOIN done d ON d.task_id = i.tid""", rows="""(
        SELECT k.task_id, k.client, k.custom_id, k.status, l.resp, l.usage, k.cost, k.sync,
               k.replay_count, k.unpriced
        FROM kept k JOIN route_lines l ON l.line = k.line) AS stored""", final="""
SELECT client, count(*), sum(tin), sum(tcached), sum(tout), sum(tcw), sum(cost),
       sum(sync),
       array_agg(waited), sum(est_input_tokens)
FROM kept GROUP BY client""", drop_body=_DROP_BODY))

_STAGED_FAILURES = text(_FAIL_SQL.format(input="""
    SELECT DISTINCT ON (tid) tid, final, err, jitter FROM route_lines
    WHERE NOT ok AND tid IS NOT NULL ORDER BY tid, line"""))


async def store_staged_successes(conn: AsyncConnection, batch_id: str, *, unpriced: bool
                                 ) -> StagedSuccesses:
    """Settle the staged success lines (see _SUCCESS_SQL): tasks succeeded,
    results stored with their exact costs, events and callbacks written."""
    rows = await _settle(conn, _STAGED_SUCCESSES, {"bid": batch_id, "unpriced": unpriced})
    out = StagedSuccesses({}, Tokens(), Decimal(0), {}, Decimal(0), [])
    for client, n, tin, tcached, tout, tcw, cost_usd, sync_usd, times, est_in in rows:
        out.estimated_input += int(est_in)
        out.cost_by_client[client] = cost_usd
        out.by_client[client] = int(n)
        out.tokens += Tokens(int(tin), int(tcached), int(tout), int(tcw))
        out.cost += cost_usd
        out.sync_cost += sync_usd
        out.waited.extend(map(float, times))
    return out


async def store_staged_failures(conn: AsyncConnection, batch_id: str, backoff: Backoff
                                ) -> dict[tuple[str, str], int]:
    """Retry or fail the staged failure lines, as store_failures."""
    rows = await _settle(conn, _STAGED_FAILURES, {"bid": batch_id, **_backoff_params(backoff)})
    return _count_outcomes(rows)


async def unsettled_in_batch(conn: AsyncConnection, batch_id: str, limit: int) -> list[int]:
    """Ids of a batch's tasks that no line has settled yet (up to ``limit``)."""
    rows = await conn.execute(text("""
        SELECT id FROM tasks WHERE batch_id = :bid AND state = 'submitted'
        ORDER BY id LIMIT :lim"""), {"bid": batch_id, "lim": limit})
    return [int(r[0]) for r in rows]


async def tasks_at_lines(conn: AsyncConnection, batch_id: str, lines: Sequence[int]
                         ) -> dict[int, int]:
    """Map 1-based input-file line numbers back to the batch's tasks by the
    line each was given when the file was built, so a task that left the
    batch since (a fallback) shifts nobody. A line whose task left maps to
    nothing. Batches built before batch_line existed count rows in id order."""
    rows = await conn.execute(text("""
        SELECT line, id FROM (
            SELECT id,
                   coalesce(batch_line, row_number() OVER (ORDER BY id)) AS line FROM tasks
            WHERE batch_id = :bid AND state = 'submitted') s
        WHERE line = ANY(CAST(:lines AS bigint[]))"""), {"bid": batch_id, "lines": list(lines)})
    return {int(line): int(tid) for line, tid in rows}


async def requeue_remaining(
    conn: AsyncConnection, batch_id: str, error: dict[str, Any], *, count_attempt: bool
) -> dict[str, int]:
    """Put every still-submitted task of a batch back in the queue at once.

    With ``count_attempt=False`` the submission is taken back (the provider
    never ran it through no fault of the task: never created, token cap).
    Returns how many went back, by client."""
    rows = await conn.execute(text(f"""
        WITH upd AS (
            UPDATE tasks SET state = 'queued', batch_id = NULL, not_before = now(),
                   attempts = CASE WHEN :count THEN attempts ELSE greatest(attempts - 1, 0) END,
                   last_error = CAST(:err AS jsonb), updated_at = now()
            WHERE batch_id = :bid AND state = 'submitted'
            RETURNING id, client, custom_id, attempts, job
        ), jd AS ({moved_deltas("upd", "'submitted'", "'queued'")}
        ), ev AS (
            INSERT INTO task_events (task_id, batch_id, attempt, outcome, error)
            SELECT id, :bid, attempts, 'requeued', CAST(:err AS jsonb)
            FROM upd
        )
        SELECT client, count(*) FROM upd GROUP BY client"""),
        {"bid": batch_id, "err": orjson.dumps(error).decode(), "count": count_attempt})
    return {client: int(n) for client, n in rows}


async def lock_unrouted_batch(conn: AsyncConnection, batch_id: str) -> bool:
    """Lock a batch row for routing until the transaction ends; False when it
    is already routed (waiting first for any router that holds it)."""
    state = await conn.scalar(text("SELECT state FROM batches WHERE id = :id FOR UPDATE"),
                              {"id": batch_id})
    return state is not None and state != "routed"


async def settle_batch(conn: AsyncConnection, batch_id: str, **values: Any) -> None:
    """Close a routed batch; the caller passes its cost columns."""
    await set_batch(conn, batch_id, state="routed", routed_at=NOW, lease_owner=None,
                    lease_until=None, **values)


async def schedule_poll(conn: AsyncConnection, batch_id: str, seconds: float) -> None:
    await conn.execute(text("""
        UPDATE batches SET next_poll_at = now() + make_interval(secs => :s) WHERE id = :id"""),
        {"id": batch_id, "s": seconds})


async def release_owner(conn: AsyncConnection, owner: str) -> int:
    rows = await conn.execute(text("""
        UPDATE batches SET lease_owner = NULL, lease_until = NULL, updated_at = now()
        WHERE lease_owner = :owner RETURNING 1"""), {"owner": owner})
    return len(rows.all())


# ----------------------------------------------------------------- sync lane

async def sync_candidates(conn: AsyncConnection, limit: int,
                          providers: Sequence[str] = ("openai",)) -> list[dict[str, Any]]:
    """Due sync-lane tasks at ``providers`` in order, row-locked (SKIP LOCKED)
    until the transaction ends, with what the budget check needs."""
    rows = await conn.execute(text("""
        SELECT id, custom_id, provider, model, est_input_tokens, est_output_tokens, client
        FROM tasks
        WHERE state = 'queued' AND lane = 'sync' AND not_before <= now()
          AND provider = ANY(CAST(:pvs AS text[]))
        ORDER BY not_before, id LIMIT :lim FOR UPDATE SKIP LOCKED"""),
        {"lim": limit, "pvs": list(providers)})
    return [dict(r) for r in rows.mappings()]


async def claim_sync(conn: AsyncConnection, claim_id: str, task_ids: Sequence[int]
                     ) -> list[dict[str, Any]]:
    """Take the chosen sync-lane tasks for one synchronous call each; the
    attempt is counted now, as for a batch."""
    if not task_ids:
        return []
    rows = await conn.execute(text(f"""
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
        {"claim": claim_id, "ids": list(task_ids)})
    return [dict(r) for r in rows.mappings()]


async def reserve_sync_spend(conn: AsyncConnection, claim_id: str, day: date,
                             task_ids: Sequence[int], models: Sequence[str],
                             reserved: Sequence[Decimal]) -> None:
    """One ledger row per claimed call, holding its high-side estimate."""
    if not task_ids:
        return
    await conn.execute(text("""
        INSERT INTO sync_spend (claim_id, task_id, custom_id, model, spend_day, reserved_usd)
        SELECT :claim, u.tid, t.custom_id, u.mdl, :day, u.res
        FROM unnest(CAST(:tid AS bigint[]), CAST(:mdl AS text[]), CAST(:res AS numeric[]))
             AS u(tid, mdl, res) JOIN tasks t ON t.id = u.tid"""),
        {"claim": claim_id, "day": day, "tid": list(task_ids), "mdl": list(models),
         "res": list(reserved)})


async def give_back_sync_call(conn: AsyncConnection, claim_id: str, task_id: int,
                              error: dict[str, Any]) -> None:
    """A sync call the provider refused before running it (our credentials):
    back to the queue with the attempt given back, as a batch never created."""
    await conn.execute(text(f"""
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
        {"tid": task_id, "claim": claim_id, "err": orjson.dumps(error).decode()})


async def settle_sync_spend(conn: AsyncConnection, claim_id: str, task_id: int,
                            cost_usd: Decimal) -> None:
    """A finished call's ledger row takes its real cost in place of the estimate."""
    await conn.execute(text("""
        UPDATE sync_spend SET cost_usd = :cost, settled_at = now()
        WHERE claim_id = :claim AND task_id = :tid AND cost_usd IS NULL"""),
        {"claim": claim_id, "tid": task_id, "cost": cost_usd})


async def stale_sync_calls(conn: AsyncConnection, older_than: float, limit: int = 1000
                           ) -> dict[str, list[int]]:
    """Sync calls whose replica died mid-call (claim id -> task ids),
    row-locked so the caller settles them in the same transaction."""
    rows = await conn.execute(text("""
        SELECT batch_id, id FROM tasks
        WHERE lane = 'sync' AND state = 'submitted' AND batch_id LIKE 'sync\\_%'
          AND submitted_at < now() - make_interval(secs => :s)
        ORDER BY id LIMIT :lim FOR UPDATE SKIP LOCKED"""), {"s": older_than, "lim": limit})
    out: dict[str, list[int]] = {}
    for claim, tid in rows:
        out.setdefault(claim, []).append(int(tid))
    return out


@dataclass(frozen=True, slots=True)
class Moved:
    """Tasks the fallback sweep took out of the batch lane's way."""

    to_sync: list[str]
    resubmitted: list[str]


async def fall_back(conn: AsyncConnection, window_seconds: float, margin: float,
                    limit: int = 1000) -> Moved:
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
    rows = await conn.execute(text(f"""
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
        {"lim": limit, "window": window_seconds, "margin": margin})
    moved = Moved([], [])
    for cid, outcome in rows:
        (moved.to_sync if outcome == "fallback" else moved.resubmitted).append(cid)
    return moved


# ------------------------------------------------------------------ callbacks

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


async def claim_callbacks(conn: AsyncConnection, limit: int, lease_seconds: float
                          ) -> list[dict[str, Any]]:
    """Due deliveries with what their payload needs. The claim counts the
    attempt and pushes the row out by the lease, so no other replica POSTs it
    meanwhile, and a replica that dies mid-POST leaves it due again."""
    rows = await conn.execute(_CLAIM_CALLBACKS, {"lim": limit, "lease": lease_seconds})
    return [dict(r) for r in rows.mappings()]


async def record_callback_attempt(
    conn: AsyncConnection, callback_id: int, attempt: int, *, status: int | None,
    error: str | None, duration: float, delivered: bool, retry_in: float | None,
) -> str | None:
    """Record one POST and what follows from it: delivered, due again after
    ``retry_in``, or (``retry_in`` None) failed for good. Returns the new
    state, or None when another replica re-claimed the row meanwhile (the
    attempt is still recorded: it happened)."""
    row = await conn.execute(text("""
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
        {"id": callback_id, "attempt": attempt, "status": status, "error": error,
         "duration": duration, "ok": delivered, "delay": retry_in})
    return row.scalar_one_or_none()


_CALLBACK_COLUMNS = """id, custom_id, client, url, task_state, state, attempts, last_status,
    last_error, replay_count, created_at, updated_at, delivered_at"""


async def page_failed_callbacks(conn: AsyncConnection, after: int, limit: int,
                                client: str | None = None) -> list[dict[str, Any]]:
    """Deliveries that used up their attempts, oldest first."""
    rows = await conn.execute(text(f"""
        SELECT {_CALLBACK_COLUMNS} FROM callbacks
        WHERE state = 'failed' AND id > :after
          AND (CAST(:client AS text) IS NULL OR client = :client)
        ORDER BY id LIMIT :limit"""), {"after": after, "limit": limit, "client": client})
    return [dict(r) for r in rows.mappings()]


async def callbacks_of_task(conn: AsyncConnection, client: str, custom_id: str
                            ) -> list[dict[str, Any]]:
    """Every delivery of a task with each of its attempts."""
    rows = await conn.execute(text(f"""
        SELECT {", ".join("c." + c.strip() for c in _CALLBACK_COLUMNS.split(","))},
               coalesce((SELECT jsonb_agg(jsonb_build_object(
                            'attempt', a.attempt, 'status_code', a.status_code,
                            'error', a.error, 'duration_seconds', a.duration_seconds,
                            'at', a.created_at) ORDER BY a.id)
                         FROM callback_attempts a WHERE a.callback_id = c.id), '[]'::jsonb)
                 AS attempt_log
        FROM callbacks c JOIN tasks t ON t.id = c.task_id
        WHERE t.client = :cl AND t.custom_id = :cid ORDER BY c.id"""),
        {"cl": client, "cid": custom_id})
    return [dict(r) for r in rows.mappings()]


async def replay_callbacks(conn: AsyncConnection, ids: Sequence[int], custom_ids: Sequence[str],
                           *, everything: bool = False, client: str | None = None,
                           owner: str | None = None) -> list[int]:
    """Failed deliveries (by id or task, or all) due again now, with a fresh
    set of attempts; the attempt log is kept. Only ``client``'s deliveries
    (None: every client's) are touched; ``custom_ids`` name tasks of
    ``owner``."""
    rows = await conn.execute(text("""
        UPDATE callbacks c SET state = 'pending', attempts = 0, next_attempt_at = now(),
               replay_count = c.replay_count + 1, updated_at = now()
        WHERE c.state = 'failed'
          AND (CAST(:client AS text) IS NULL OR c.client = :client)
          AND (:all OR c.id = ANY(CAST(:ids AS bigint[]))
               OR c.task_id IN (SELECT id FROM tasks WHERE client = :owner
                                AND custom_id = ANY(CAST(:cids AS text[]))))
        RETURNING c.id"""), {"ids": list(ids), "cids": list(custom_ids), "all": everything,
                             "client": client, "owner": owner})
    return sorted(r[0] for r in rows)


async def callback_backlog(conn: AsyncConnection) -> dict[str, int]:
    """Deliveries waiting (pending) and given up on (failed), for the gauges."""
    # One count per partial index: delivered rows, the bulk, are never read.
    row = await conn.execute(text("""
        SELECT (SELECT count(*) FROM callbacks WHERE state = 'pending') AS pending,
               (SELECT count(*) FROM callbacks WHERE state = 'failed') AS failed"""))
    return {k: int(v) for k, v in row.mappings().one().items()}
