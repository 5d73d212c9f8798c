"""Outcomes to rows: a route's lines settled into results and retries, exactly once."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import CursorResult, TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.util.typing import TupleAny

from batchd.backoff import sql_equal_jitter, sql_exponential
from batchd.prices import Tokens
from batchd.store.batches import NOW, set_batch
from batchd.store.jobs import moved_deltas

# A success settles its task and stores its result in one statement: the
# task moves only from 'submitted' in this batch, so a line routed twice, a
# duplicate line or a task that left for the sync lane stores nothing. Two
# inputs fill it: parallel arrays (the sync lane, one call at a time) and the
# lines a route staged with COPY (below), with their exact costs.
# A batch success drops the task's body: its input file is archived, and
# only failed tasks are ever replayed from their body (README "Running it
# for a year"); the sync lane archives no input, so its tasks keep theirs.
_DROP_BODY = ", body = NULL"
_SUCCESS_SQL = (
    """
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
), jd AS ("""
    + moved_deltas("kept", "'submitted'", "'succeeded'", "cost", "sync")
    + """
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
)


async def _settle(
    conn: AsyncConnection, statement: TextClause, params: dict[str, Any]
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


_UPSERT_SUCCESSES = text(
    _SUCCESS_SQL.format(
        input="""
    SELECT DISTINCT ON (tid) * FROM unnest(
        CAST(:tid AS bigint[]), CAST(:status AS int[]), CAST(:resp AS text[]),
        CAST(:usage AS text[]), CAST(:cost AS numeric[]), CAST(:sync AS numeric[]),
        CAST(:unpriced AS bool[]))
        AS t(tid, status, resp, usage, cost, sync, unpriced)""",
        kept="""
    SELECT i.*, d.* FROM input i JOIN done d ON d.task_id = i.tid""",
        rows="kept",
        final="""
SELECT tid, client FROM kept""",
        drop_body="",
    )
)


@dataclass(slots=True)
class SuccessRows:
    task_ids: list[int]
    status: list[int]
    responses: list[str]
    usages: list[str | None]
    costs: list[Decimal]
    sync_costs: list[Decimal]
    unpriced: list[bool]


async def store_successes(
    conn: AsyncConnection, batch_id: str, rows: SuccessRows
) -> dict[int, str]:
    """Mark tasks succeeded and upsert their results: a line routed twice
    changes nothing the second time (the task is no longer submitted). A task
    with a callback_url gets its outbox row in the same statement.
    Returns the task ids this call settled, with their client."""
    if not rows.task_ids:
        return {}
    stored = await _settle(
        conn,
        _UPSERT_SUCCESSES,
        {
            "bid": batch_id,
            "tid": rows.task_ids,
            "status": rows.status,
            "resp": rows.responses,
            "usage": rows.usages,
            "cost": rows.costs,
            "sync": rows.sync_costs,
            "unpriced": rows.unpriced,
        },
    )
    return {int(tid): client for tid, client in stored}


# Backoff in SQL is domain.backoff_seconds (batchd/backoff.py writes both): the
# attempt count lives in the row, the jitter comes from the caller so tests
# can pin it.
_RETRY_DELAY = sql_equal_jitter(sql_exponential("t.attempts - 1"), "i.jitter")
_FAIL_SQL = (
    """
WITH input AS ({input}
), upd AS (
    UPDATE tasks t SET
        state = CASE WHEN i.final OR t.attempts >= :max_attempts THEN 'failed' ELSE 'queued' END,
        batch_id = CASE WHEN i.final OR t.attempts >= :max_attempts THEN t.batch_id END,
        not_before = CASE WHEN i.final OR t.attempts >= :max_attempts THEN t.not_before
            ELSE now() + make_interval(secs => """
    + _RETRY_DELAY
    + """) END,
        finished_at = CASE WHEN i.final OR t.attempts >= :max_attempts THEN now() END,
        last_error = i.err::jsonb, updated_at = now()
    FROM input i
    -- By the task's id, as in _SUCCESS_SQL (IS TRUE: not the batch index).
    WHERE t.id = i.tid AND (t.batch_id = :bid) IS TRUE AND t.state = 'submitted'
    RETURNING t.id, t.client, t.custom_id, t.attempts, t.state, t.callback_url, t.job
), jd AS ("""
    + moved_deltas("upd", "'submitted'", "state")
    + """
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
)
_FAIL_LINES = text(
    _FAIL_SQL.format(
        input="""
    SELECT DISTINCT ON (tid) * FROM unnest(
        CAST(:tid AS bigint[]), CAST(:final AS bool[]), CAST(:err AS text[]),
        CAST(:jitter AS float8[])) AS t(tid, final, err, jitter)"""
    )
)


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float
    max_attempts: int
    cap: float = 86_400.0


async def store_failures(
    conn: AsyncConnection,
    batch_id: str,
    task_ids: Sequence[int],
    finals: Sequence[bool],
    errors: Sequence[dict[str, Any]],
    jitters: Sequence[float],
    backoff: Backoff,
) -> dict[tuple[str, str], int]:
    """Retry or fail tasks (a failed task with a callback_url gets its outbox
    row in the same statement); returns counts by (outcome, client)."""
    if not task_ids:
        return {}
    rows = await _settle(
        conn,
        _FAIL_LINES,
        {
            "bid": batch_id,
            "tid": list(task_ids),
            "final": list(finals),
            "err": [orjson.dumps(e).decode() for e in errors],
            "jitter": list(jitters),
            **_backoff_params(backoff),
        },
    )
    return _count_outcomes(rows)


def _backoff_params(backoff: Backoff) -> dict[str, Any]:
    return {"max_attempts": backoff.max_attempts, "base": backoff.base, "cap": backoff.cap}


def _count_outcomes(rows: Iterable[Any]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for outcome, client in rows:
        counts[outcome, client] = counts.get((outcome, client), 0) + 1
    return counts


#
# A route COPYs every line of its files into a temporary table, then settles
# them with one statement for the successes and one for the failures. Binary
# COPY is the cheapest way to hand PostgreSQL 50,000 rows; each line comes
# with its exact cost, stored as it is. The table lives until the route's
# transaction ends.

STAGE_COLUMNS = (
    "line",
    "tid",
    "cid",
    "ok",
    "status",
    "resp",
    "usage",
    "tin",
    "tcached",
    "tout",
    "tcw",
    "cost",
    "sync",
    "final",
    "err",
    "jitter",
)


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
    await conn.execute(
        text("""
        CREATE TEMPORARY TABLE route_lines (
            line int NOT NULL, tid bigint, cid text NOT NULL, ok bool NOT NULL, status int,
            resp jsonb, usage jsonb, tin bigint, tcached bigint, tout bigint, tcw bigint,
            cost numeric, sync numeric, final bool, err text, jitter float8) ON COMMIT DROP""")
    )
    raw = await conn.get_raw_connection()
    await raw.driver_connection.copy_records_to_table(  # type: ignore[union-attr]
        "route_lines", records=records, columns=STAGE_COLUMNS
    )
    # The row count and task id statistics, so the settling statements plan
    # for the real size (the wide columns are left out: they cost the most).
    await conn.execute(text("ANALYZE route_lines (tid)"))


async def resolve_legacy_lines(conn: AsyncConnection, batch_id: str) -> None:
    """A batch built before batchd wrote its own line ids (migration 0011)
    carries the callers' custom_ids, unique among its tasks: each staged
    line finds its task by the custom_id within the batch. So a batch in
    flight across the upgrade still routes."""
    await conn.execute(
        text("""
        UPDATE route_lines l SET tid = t.id FROM tasks t
        WHERE t.custom_id = l.cid AND t.id IN (
            -- The batch's tasks: those not succeeded by tasks_batch_held, the
            -- ones that did by their results (a route resumed after a crash).
            SELECT id FROM tasks WHERE batch_id = :bid AND state <> 'succeeded'
            UNION ALL SELECT task_id FROM results WHERE batch_id = :bid)"""),
        {"bid": batch_id},
    )


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
_STAGED_SUCCESSES = text(
    _SUCCESS_SQL.format(
        input="""
    SELECT DISTINCT ON (tid) line, tid, status, tin, tcached, tout, tcw, cost, sync
    FROM route_lines WHERE ok AND tid IS NOT NULL ORDER BY tid, line""",
        kept="""
    SELECT i.line, i.tid, i.status, i.tin, i.tcached, i.tout, i.tcw, d.*,
           CAST(:unpriced AS bool) AS unpriced, i.cost, i.sync
    FROM input i JOIN done d ON d.task_id = i.tid""",
        rows="""(
        SELECT k.task_id, k.client, k.custom_id, k.status, l.resp, l.usage, k.cost, k.sync,
               k.replay_count, k.unpriced
        FROM kept k JOIN route_lines l ON l.line = k.line) AS stored""",
        final="""
SELECT client, count(*), sum(tin), sum(tcached), sum(tout), sum(tcw), sum(cost),
       sum(sync),
       array_agg(waited), sum(est_input_tokens)
FROM kept GROUP BY client""",
        drop_body=_DROP_BODY,
    )
)

_STAGED_FAILURES = text(
    _FAIL_SQL.format(
        input="""
    SELECT DISTINCT ON (tid) tid, final, err, jitter FROM route_lines
    WHERE NOT ok AND tid IS NOT NULL ORDER BY tid, line"""
    )
)


async def store_staged_successes(
    conn: AsyncConnection, batch_id: str, *, unpriced: bool
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


@dataclass(frozen=True, slots=True)
class BatchResults:
    """A batch's stored results: how many, and their exact costs."""

    stored: int
    cost: Decimal
    sync_cost: Decimal
    cost_by_client: dict[str, Decimal]


async def batch_results(conn: AsyncConnection, batch_id: str) -> BatchResults:
    """Every result the batch's routes stored (a route settles its lines in
    several transactions, and one resumed after a crash stores only what
    the crashed one had not), by the results_batch index."""
    rows = (
        await conn.execute(
            text("""
        SELECT client, count(*), sum(cost_usd), sum(sync_cost_usd) FROM results
        WHERE batch_id = :bid GROUP BY client"""),
            {"bid": batch_id},
        )
    ).all()
    return BatchResults(
        sum(int(n) for _, n, _, _ in rows),
        sum((c for _, _, c, _ in rows), Decimal(0)),
        sum((s for _, _, _, s in rows), Decimal(0)),
        {client: c for client, _, c, _ in rows},
    )


async def store_staged_failures(
    conn: AsyncConnection, batch_id: str, backoff: Backoff
) -> dict[tuple[str, str], int]:
    """Retry or fail the staged failure lines, as store_failures."""
    rows = await _settle(conn, _STAGED_FAILURES, {"bid": batch_id, **_backoff_params(backoff)})
    return _count_outcomes(rows)


async def unsettled_in_batch(conn: AsyncConnection, batch_id: str, limit: int) -> list[int]:
    """Ids of a batch's tasks that no line has settled yet (up to ``limit``)."""
    rows = await conn.execute(
        text("""
        SELECT id FROM tasks WHERE batch_id = :bid AND state = 'submitted'
        ORDER BY id LIMIT :lim"""),
        {"bid": batch_id, "lim": limit},
    )
    return [int(r[0]) for r in rows]


async def tasks_at_lines(
    conn: AsyncConnection, batch_id: str, lines: Sequence[int]
) -> dict[int, int]:
    """Map 1-based input-file line numbers back to the batch's tasks by the
    line each was given when the file was built, so a task that left the
    batch since (a fallback) shifts nobody. A line whose task left maps to
    nothing. Batches built before batch_line existed count rows in id order."""
    rows = await conn.execute(
        text("""
        SELECT line, id FROM (
            SELECT id,
                   coalesce(batch_line, row_number() OVER (ORDER BY id)) AS line FROM tasks
            WHERE batch_id = :bid AND state = 'submitted') s
        WHERE line = ANY(CAST(:lines AS bigint[]))"""),
        {"bid": batch_id, "lines": list(lines)},
    )
    return {int(line): int(tid) for line, tid in rows}


async def requeue_remaining(
    conn: AsyncConnection, batch_id: str, error: dict[str, Any], *, count_attempt: bool
) -> dict[str, int]:
    """Put every still-submitted task of a batch back in the queue at once.

    With ``count_attempt=False`` the submission is taken back (the provider
    never ran it through no fault of the task: never created, token cap).
    Returns how many went back, by client."""
    rows = await conn.execute(
        text(f"""
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
        {"bid": batch_id, "err": orjson.dumps(error).decode(), "count": count_attempt},
    )
    return {client: int(n) for client, n in rows}


async def release_unsent_tasks(conn: AsyncConnection, batch_id: str, error: dict[str, Any]) -> int:
    """A batch the provider never created: its tasks go back to the queue and
    the attempt that did not happen is taken back."""
    return sum((await requeue_remaining(conn, batch_id, error, count_attempt=False)).values())


async def lock_unrouted_batch(conn: AsyncConnection, batch_id: str) -> bool:
    """Lock a batch row for routing until the transaction ends; False when it
    is already routed (waiting first for any router that holds it)."""
    state = await conn.scalar(
        text("SELECT state FROM batches WHERE id = :id FOR UPDATE"), {"id": batch_id}
    )
    return state is not None and state != "routed"


async def settle_batch(conn: AsyncConnection, batch_id: str, **values: Any) -> None:
    """Close a routed batch; the caller passes its cost columns."""
    await set_batch(
        conn, batch_id, state="routed", routed_at=NOW, lease_owner=None, lease_until=None, **values
    )


async def schedule_poll(conn: AsyncConnection, batch_id: str, seconds: float) -> None:
    await conn.execute(
        text("""
        UPDATE batches SET next_poll_at = now() + make_interval(secs => :s) WHERE id = :id"""),
        {"id": batch_id, "s": seconds},
    )


async def release_owner(conn: AsyncConnection, owner: str) -> int:
    rows = await conn.execute(
        text("""
        UPDATE batches SET lease_owner = NULL, lease_until = NULL, updated_at = now()
        WHERE lease_owner = :owner RETURNING 1"""),
        {"owner": owner},
    )
    return len(rows.all())
