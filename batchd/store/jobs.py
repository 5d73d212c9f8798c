"""Jobs (DESIGN section 13): every SQL statement about jobs and their counters.

A job's counters are never counted from its tasks. Every statement that adds
or moves tasks writes, in the same statement, one ``job_deltas`` row per job
it touched (``added_deltas``/``moved_deltas`` below, used by every such
statement in store/tasks.py, windows.py, routing.py and sync.py). Appending
rows means concurrent ingest, routing and cancels of one job never wait on a
shared counter row; ``fold_deltas`` adds them into the ``jobs`` row a bounded
step at a time, and every read adds the deltas not folded yet, so an answer is
exact as of its snapshot and costs the same for a job of 10 tasks or 1,000,000.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

LOCAL = "local"
OPEN_STATES = ("queued", "submitted")
# A dismissed task (an operator took it out of the manual queue) counts as
# failed in its job: dismissing moves no counter.
FINISHED_STATES = ("succeeded", "failed", "dismissed", "cancelled")
_STATES = ("queued", "submitted", "succeeded", "failed", "cancelled")


def added_deltas(source: str) -> str:
    """A CTE body: the deltas of the tasks ``source`` inserted (columns
    client, job; each queued)."""
    return f"""INSERT INTO job_deltas (client, job, tasks, queued)
    SELECT coalesce(client, '{LOCAL}'), job, count(*), count(*) FROM {source}
    WHERE job IS NOT NULL GROUP BY 1, 2"""


def moved_deltas(source: str, old: str, new: str, cost: str = "0", sync: str = "0") -> str:
    """A CTE body: the deltas of the tasks ``source`` moved from state
    ``old`` to ``new`` (SQL expressions over its columns, which include
    client and job), with ``cost``/``sync`` added to the job's money."""
    diffs = ", ".join(f"sum(({new} = '{s}')::int - ({old} = '{s}')::int)" for s in _STATES)
    return f"""INSERT INTO job_deltas (client, job, {", ".join(_STATES)}, spend_usd, sync_usd)
    SELECT coalesce(client, '{LOCAL}'), job, {diffs},
           coalesce(sum({cost}), 0), coalesce(sum({sync}), 0)
    FROM {source} WHERE job IS NOT NULL AND {old} IS DISTINCT FROM {new} GROUP BY 1, 2"""


# --------------------------------------------------------------------- ingest


async def open_jobs(
    conn: AsyncConnection, keys: Sequence[tuple[str, str]], callbacks: Sequence[str | None]
) -> set[tuple[str, str]]:
    """Create the jobs of an ingest that are new (with their callback URL)
    and hold a key-share lock on each until the transaction ends, so a
    cancel either sees this ingest's tasks or this ingest sees the cancel.
    Returns the (client, job) keys that were cancelled: nothing may join them."""
    if not keys:
        return set()
    await conn.execute(
        text("""
        INSERT INTO jobs (client, job, callback_url)
        SELECT * FROM unnest(CAST(:cl AS text[]), CAST(:job AS text[]), CAST(:cb AS text[]))
        ORDER BY 1, 2
        ON CONFLICT (client, job) DO NOTHING"""),
        {"cl": [k[0] for k in keys], "job": [k[1] for k in keys], "cb": list(callbacks)},
    )
    rows = await conn.execute(
        text("""
        SELECT j.client, j.job, j.cancelled_at FROM jobs j
        JOIN unnest(CAST(:cl AS text[]), CAST(:job AS text[])) AS k(client, job)
          ON j.client = k.client AND j.job = k.job
        ORDER BY j.client, j.job
        FOR KEY SHARE OF j"""),
        {"cl": [k[0] for k in keys], "job": [k[1] for k in keys]},
    )
    return {(c, j) for c, j, cancelled in rows if cancelled is not None}


# ---------------------------------------------------------------------- reads

_COUNTS = ("tasks", *_STATES)


def _merged(alias: str = "j") -> str:
    """The job columns with its unfolded deltas added (LATERAL ``d``)."""
    counts = ", ".join(f"{alias}.{c} + d.{c} AS {c}" for c in _COUNTS)
    return f"""{alias}.client, {alias}.job, {counts},
        {alias}.spend_usd + d.spend_usd AS spend_usd,
        {alias}.sync_equivalent_usd + d.sync_usd AS sync_equivalent_usd,
        {alias}.created_at, {alias}.cancelled_at, {alias}.callback_url,
        CASE WHEN {alias}.queued + d.queued + {alias}.submitted + d.submitted > 0 THEN NULL
             WHEN d.n > 0 THEN d.at
             -- No task was ever added (all were duplicates of tasks in other jobs).
             ELSE coalesce({alias}.finished_at, {alias}.created_at) END AS finished_at"""


_PENDING = f"""LATERAL (
    SELECT count(*) AS n, max(created_at) AS at,
           {", ".join(f"coalesce(sum({c}), 0) AS {c}" for c in _COUNTS)},
           coalesce(sum(spend_usd), 0) AS spend_usd, coalesce(sum(sync_usd), 0) AS sync_usd
    FROM job_deltas WHERE client = j.client AND job = j.job) d"""


@dataclass(frozen=True, slots=True)
class JobView:
    client: str
    job: str
    tasks: int
    queued: int
    submitted: int
    succeeded: int
    failed: int
    cancelled: int
    spend_usd: Decimal
    sync_equivalent_usd: Decimal
    created_at: datetime
    finished_at: datetime | None
    cancelled_at: datetime | None
    callback_url: str | None

    @property
    def open(self) -> int:
        return self.queued + self.submitted


def _view(row: Any) -> JobView:
    m = row._mapping
    return JobView(
        client=m["client"],
        job=m["job"],
        **{c: int(m[c]) for c in _COUNTS},
        spend_usd=Decimal(m["spend_usd"]),
        sync_equivalent_usd=Decimal(m["sync_equivalent_usd"]),
        created_at=m["created_at"],
        finished_at=m["finished_at"],
        cancelled_at=m["cancelled_at"],
        callback_url=m["callback_url"],
    )


GET_JOB = text(f"""
SELECT {_merged()} FROM jobs j, {_PENDING}
WHERE j.client = :client AND j.job = :job""")


async def get_job(conn: AsyncConnection, client: str, job: str) -> JobView | None:
    """One job's counts: its row plus its deltas not folded yet."""
    row = (await conn.execute(GET_JOB, {"client": client, "job": job})).first()
    return _view(row) if row is not None else None


LIST_JOBS = text(f"""
SELECT {_merged()} FROM jobs j, {_PENDING}
WHERE j.client = :client
  AND (CAST(:after AS text) IS NULL OR (j.created_at, j.job) < (
       SELECT created_at, job FROM jobs WHERE client = :client AND job = :after))
ORDER BY j.created_at DESC, j.job DESC LIMIT :lim""")


async def list_jobs(
    conn: AsyncConnection, client: str, after: str | None, limit: int
) -> list[JobView]:
    """A client's jobs, newest first, from after the job named ``after``."""
    rows = await conn.execute(LIST_JOBS, {"client": client, "after": after, "lim": limit})
    return [_view(r) for r in rows]


# Every client's jobs newest first, without an index in that order: each
# client's newest ``lim`` (jobs_newest, found by skipping from one client to
# the next) merged, so the page reads at most clients x ``lim`` index rows.
LIST_ALL_JOBS = text(f"""
WITH RECURSIVE clients AS (
    (SELECT client FROM jobs ORDER BY client LIMIT 1)
    UNION ALL
    SELECT nxt.client FROM clients c, LATERAL (
        SELECT client FROM jobs WHERE client > c.client ORDER BY client LIMIT 1) nxt
), cursor AS (
    SELECT created_at, client, job FROM jobs
    WHERE client = CAST(:after_client AS text) AND job = CAST(:after AS text)
), newest AS (
    SELECT top.* FROM clients c, LATERAL (
        SELECT j.* FROM jobs j
        WHERE j.client = c.client
          AND (CAST(:after AS text) IS NULL
               OR (j.created_at, j.client, j.job) < (SELECT * FROM cursor))
        ORDER BY j.created_at DESC, j.job DESC LIMIT :lim) top
    ORDER BY top.created_at DESC, top.client DESC, top.job DESC LIMIT :lim
)
SELECT {_merged()} FROM newest j, {_PENDING}
ORDER BY j.created_at DESC, j.client DESC, j.job DESC""")


async def list_all_jobs(
    conn: AsyncConnection, after: tuple[str, str] | None, limit: int
) -> list[JobView]:
    """Every client's jobs (an admin's view), newest first, from after the
    (client, job) ``after``."""
    rows = await conn.execute(
        LIST_ALL_JOBS,
        {
            "after_client": after[0] if after else None,
            "after": after[1] if after else None,
            "lim": limit,
        },
    )
    return [_view(r) for r in rows]


async def job_exists(conn: AsyncConnection, client: str, job: str) -> bool:
    row = await conn.execute(
        text("SELECT 1 FROM jobs WHERE client = :client AND job = :job"),
        {"client": client, "job": job},
    )
    return row.first() is not None


async def task_id_in_job(
    conn: AsyncConnection, client: str, job: str, custom_id: str
) -> int | None:
    """The id of a job's task (a results cursor), or None."""
    row = await conn.execute(
        text("""
        SELECT id FROM tasks WHERE client = :client AND custom_id = :cid AND job = :job"""),
        {"client": client, "job": job, "cid": custom_id},
    )
    found = row.scalar_one_or_none()
    return int(found) if found is not None else None


def results_page_sql() -> str:
    """Driver-level SQL for one page of a job's finished tasks in task id
    order ($1 client, $2 job, $3 after id, $4 states, $5 limit), response and
    error as JSON text, so the stream copies them without decoding. Run it
    with sorting off (``NO_SORT``): the page must be the next stretch of the
    tasks_job index (the only one in that order), never all of the job's
    tasks sorted for each page, which the planner picks for a job it has no
    statistics for yet."""
    return """
        SELECT t.id, t.custom_id, t.state, t.attempts, t.last_error::text, r.response::text
        FROM (SELECT id, custom_id, state, attempts, last_error FROM tasks
              WHERE client = $1 AND job = $2 AND id > $3 AND state = ANY($4::text[])
              ORDER BY client, job, id LIMIT $5) t
        LEFT JOIN results r ON t.state = 'succeeded' AND r.task_id = t.id
        ORDER BY t.id"""


# Sorting off for one transaction, and JIT with it: the cost a disabled
# sort adds (of the 1,000 rows of a page) would otherwise buy a JIT compile.
NO_SORT = "SELECT set_config('enable_sort', 'off', true), set_config('jit', 'off', true)"


async def results_page(
    conn: AsyncConnection, client: str, job: str, after: int, states: Sequence[str], limit: int
) -> list[Any]:
    """One page of a job's finished tasks after task id ``after`` (rows of
    results_page_sql), read through the driver so the response and error
    stay JSON text for the stream to copy."""
    await conn.execute(text(NO_SORT))
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    return list(await raw.fetch(results_page_sql(), client, job, after, list(states), limit))


# --------------------------------------------------------------------- cancel


async def lock_for_cancel(conn: AsyncConnection, client: str, job: str) -> bool:
    """Mark a job cancelled (once), waiting for ingests in flight into it to
    commit first; False when there is no such job. Nothing joins it after."""
    row = await conn.execute(
        text("""
        SELECT 1 FROM jobs WHERE client = :client AND job = :job FOR UPDATE"""),
        {"client": client, "job": job},
    )
    if row.first() is None:
        return False
    await conn.execute(
        text("""
        UPDATE jobs SET cancelled_at = coalesce(cancelled_at, now()), updated_at = now()
        WHERE client = :client AND job = :job"""),
        {"client": client, "job": job},
    )
    return True


CANCELLED_ERROR = {
    "code": "cancelled",
    "message": "the task's job was cancelled before the task was sent",
}


@dataclass(frozen=True, slots=True)
class CancelStep:
    last_id: int | None  # the highest task id this step looked at; None: none left
    cancelled: int
    by_client: dict[str | None, int]


CANCEL_QUEUED = text(f"""
WITH picked AS (
    SELECT id FROM tasks
    WHERE client = :client AND job = :job AND id > :after AND state = 'queued'
    ORDER BY client, job, id LIMIT :lim FOR UPDATE
), upd AS (
    UPDATE tasks t SET state = 'cancelled', finished_at = now(), updated_at = now(),
           batch_id = NULL, last_error = CAST(:err AS jsonb)
    FROM picked p WHERE t.id = p.id AND t.state = 'queued'
    RETURNING t.id, t.custom_id, t.attempts, t.client, t.callback_url, t.job
), ev AS (
    INSERT INTO task_events (task_id, attempt, outcome, error)
    SELECT id, attempts, 'cancelled', CAST(:err AS jsonb) FROM upd
), cb AS (
    INSERT INTO callbacks (task_id, custom_id, client, url, task_state, task_attempts,
                           task_error)
    SELECT id, custom_id, client, callback_url, 'cancelled', attempts,
           CAST(:err AS jsonb)
    FROM upd WHERE callback_url IS NOT NULL
), jd AS ({moved_deltas("upd", "'queued'", "'cancelled'")})
SELECT (SELECT max(id) FROM picked) AS last_id,
       (SELECT coalesce(jsonb_object_agg(coalesce(client, ''), n), '{{}}')
        FROM (SELECT client, count(*) AS n FROM upd GROUP BY client) c) AS by_client""")


async def cancel_queued(
    conn: AsyncConnection, client: str, job: str, after: int, limit: int
) -> CancelStep:
    """Cancel up to ``limit`` queued tasks of a job with ids above ``after``.

    The rows are locked without SKIP LOCKED: a task a flush is taking is
    waited for and, being submitted by then, left alone; one that is still
    queued once its lock is free is cancelled. The flush's claim skips
    locked rows, so a task the cancel holds never joins a batch."""
    await conn.execute(text(NO_SORT))  # the next stretch of tasks_job (results_page_sql)
    row = (
        await conn.execute(
            CANCEL_QUEUED,
            {
                "client": client,
                "job": job,
                "after": after,
                "lim": limit,
                "err": orjson.dumps(CANCELLED_ERROR).decode(),
            },
        )
    ).one()
    by_client = {(k or None): int(v) for k, v in (row.by_client or {}).items()}
    return CancelStep(row.last_id, sum(by_client.values()), by_client)


async def cancelled_with_queued(conn: AsyncConnection, limit: int = 100) -> list[tuple[str, str]]:
    """Cancelled jobs that hold queued tasks again (a retry or requeue of a
    task that was at the provider when the job was cancelled)."""
    rows = await conn.execute(
        text(f"""
        SELECT j.client, j.job FROM jobs j, {_PENDING}
        WHERE j.cancelled_at IS NOT NULL AND j.finished_at IS NULL
          AND j.queued + d.queued > 0
        ORDER BY j.cancelled_at LIMIT :lim"""),
        {"lim": limit},
    )
    return [(c, j) for c, j in rows]


async def set_callback(conn: AsyncConnection, client: str, job: str, url: str | None) -> bool:
    rows = await conn.execute(
        text("""
        UPDATE jobs SET callback_url = :url, updated_at = now()
        WHERE client = :client AND job = :job RETURNING 1"""),
        {"client": client, "job": job, "url": url},
    )
    return rows.first() is not None


# ---------------------------------------------------------------------- folds

_SUMMARY = """jsonb_build_object(
    'job', job, 'tasks', tasks, 'queued', queued, 'submitted', submitted,
    'succeeded', succeeded, 'failed', failed, 'cancelled', cancelled,
    'spend_usd', round(spend_usd, 6)::text,
    'sync_equivalent_usd', round(sync_equivalent_usd, 6)::text,
    'savings_usd', (round(sync_equivalent_usd, 6) - round(spend_usd, 6))::text,
    'created_at', created_at, 'finished_at', finished_at, 'cancelled_at', cancelled_at)"""


@dataclass(frozen=True, slots=True)
class Fold:
    deltas: int
    jobs: int
    finished: list[tuple[str, str]]


async def fold_deltas(conn: AsyncConnection, limit: int) -> Fold:
    """Fold up to ``limit`` deltas into their jobs' rows, oldest first. A job
    left with no task queued or submitted is finished as of its last delta,
    and gets its callback (if it has a URL) in the same statement. One folder
    at a time (an advisory lock; a second one returns at once)."""
    got = await conn.execute(text("SELECT pg_try_advisory_xact_lock(hashtext('batchd.jobs.fold'))"))
    if not got.scalar_one():
        return Fold(0, 0, [])
    counts = ", ".join(_COUNTS)
    rows = await conn.execute(
        text(f"""
        WITH gone AS (
            DELETE FROM job_deltas WHERE id IN (
                SELECT id FROM job_deltas ORDER BY id LIMIT :lim)
            RETURNING client, job, {counts}, spend_usd, sync_usd, created_at
        ), sums AS (
            SELECT client, job, {", ".join(f"sum({c}) AS {c}" for c in _COUNTS)},
                   sum(spend_usd) AS spend_usd, sum(sync_usd) AS sync_usd,
                   max(created_at) AS at, count(*) AS n
            FROM gone GROUP BY client, job
        ), folded AS (
            INSERT INTO jobs AS j (client, job, {counts}, spend_usd, sync_equivalent_usd,
                                   created_at, finished_at)
            SELECT client, job, {counts}, spend_usd, sync_usd, at,
                   CASE WHEN queued + submitted > 0 THEN NULL ELSE at END
            FROM sums ORDER BY client, job
            ON CONFLICT (client, job) DO UPDATE SET
                {", ".join(f"{c} = j.{c} + excluded.{c}" for c in _COUNTS)},
                spend_usd = j.spend_usd + excluded.spend_usd,
                sync_equivalent_usd = j.sync_equivalent_usd + excluded.sync_equivalent_usd,
                finished_at = CASE
                    WHEN j.queued + excluded.queued + j.submitted + excluded.submitted > 0
                    THEN NULL ELSE excluded.created_at END,
                updated_at = now()
            RETURNING j.*
        ), cb AS (
            INSERT INTO callbacks (client, url, job, job_summary, task_state, task_attempts,
                                   finished_at)
            SELECT client, callback_url, job,
                   {_SUMMARY}, 'finished', 0, finished_at
            FROM folded WHERE finished_at IS NOT NULL AND callback_url IS NOT NULL
        )
        SELECT client, job, finished_at IS NOT NULL AS finished,
               (SELECT count(*) FROM gone) AS deltas
        FROM folded
        """),
        {"lim": limit},
    )
    folded = rows.all()
    return Fold(
        int(folded[0].deltas) if folded else 0,
        len(folded),
        [(r.client, r.job) for r in folded if r.finished],
    )


async def open_job_count(conn: AsyncConnection) -> int:
    """Jobs with a task queued or submitted, as of the last fold (a gauge)."""
    row = await conn.execute(
        text("""
        SELECT count(*) FROM jobs WHERE finished_at IS NULL AND queued + submitted > 0""")
    )
    return int(row.scalar_one())


async def pending_delta_count(conn: AsyncConnection) -> int:
    row = await conn.execute(text("SELECT count(*) FROM job_deltas"))
    return int(row.scalar_one())
