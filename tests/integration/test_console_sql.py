"""Every statement behind a console page, the daily report's, the
retention pass's and the gauges loop's read through an index, never by scanning tasks (or results,
or task_events): EXPLAINed on a database of 100,000 tasks over 30 days,
three clients, a queue, a manual queue and jobs (the jobs pages ask what the
jobs API asks: batchd/store/jobs.py)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from batchd import report
from batchd.store import console as sql
from batchd.store import gauges, jobs, manual_queue, retention, rollups, tasks
from batchd.store.engine import make_engine

_FILL = [
    """INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes, state,
                          attempts, client, created_at, finished_at, last_error, lane,
                          not_before, batch_id, job)
       SELECT 't' || g, '/v1/chat/completions',
              (ARRAY['gpt-4o-mini', 'gpt-4o', 'gpt-4.1'])[1 + g % 3], '{}'::jsonb, 'd', 100,
              CASE WHEN g % 25 = 0 THEN 'failed' WHEN g % 10 = 1 THEN 'queued'
                   WHEN g % 10 = 3 AND g > 99000 THEN 'submitted' ELSE 'succeeded' END,
              1, (ARRAY['billing', 'search', 'ops'])[1 + g % 3],
              now() - (g % 30) * interval '1 day',
              CASE WHEN g % 10 IN (1, 3) AND (g % 10 = 1 OR g > 99000) AND g % 25 <> 0 THEN NULL
                   ELSE now() - (g % 30) * interval '1 day' + interval '1 minute' END,
              CASE WHEN g % 25 = 0 THEN '{"code": "invalid_request_error"}'::jsonb END,
              CASE WHEN g % 50 = 7 THEN 'sync' ELSE 'batch' END, now(),
              CASE WHEN g % 10 = 3 AND g > 99000 THEN 'live-1' ELSE 'old-' || (g / 500) END,
              CASE WHEN g % 7 = 0 THEN 'nightly-' || (g % 4) END
       FROM generate_series(1, 100000) g""",
    # Each client's jobs: the tasks' own, and 300 older ones of a task each.
    """INSERT INTO jobs (client, job, tasks, queued, created_at)
       SELECT client, job, count(*), count(*) FILTER (WHERE state = 'queued'), min(created_at)
       FROM tasks WHERE job IS NOT NULL GROUP BY client, job
       UNION ALL
       SELECT c, 'old-job-' || g, 1, 0, now() - interval '40 days' + g * interval '1 minute'
       FROM unnest(ARRAY['billing', 'search', 'ops']) c, generate_series(1, 300) g""",
    """INSERT INTO results (task_id, client, custom_id, batch_id, status_code, response,
                            created_at)
       SELECT id, client, custom_id, batch_id, 200, '{}'::jsonb, finished_at FROM tasks
       WHERE state = 'succeeded'""",
    """INSERT INTO task_events (task_id, client, custom_id, batch_id, attempt, outcome,
                                created_at)
       SELECT id, client, custom_id, batch_id, 1,
              CASE state WHEN 'failed' THEN 'failed' ELSE 'succeeded' END,
              finished_at FROM tasks WHERE finished_at IS NOT NULL""",
    """INSERT INTO batches (id, endpoint, model, state, flush_reason, item_count, input_bytes,
                            spend_day)
       SELECT 'old-' || g, '/v1/chat/completions', 'gpt-4o', 'routed', 'cap', 500, 1000,
              current_date FROM generate_series(0, 200) g
       UNION ALL SELECT 'live-1', '/v1/chat/completions', 'gpt-4o', 'submitted', 'cap', 100,
              1000, current_date""",
    "ANALYZE",
]
_WATCHED = {"tasks", "results", "task_events"}


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _seq_scanned(plan: dict[str, Any]) -> list[str]:
    """The tables of ``_WATCHED`` a plan reads by a sequential scan."""
    return [
        n["Relation Name"]
        for n in _nodes(plan)
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in _WATCHED
    ]


async def _scans(conn: AsyncConnection, stmt: TextClause, params: dict[str, Any]) -> list[str]:
    row = await conn.execute(text("EXPLAIN (FORMAT JSON) " + stmt.text), params)
    doc = row.scalar_one()
    return _seq_scanned((orjson.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"])


async def test_no_console_statement_scans_the_tasks_table(db_url: str) -> None:
    engine = make_engine(db_url)
    today = datetime.now(UTC).date()
    start = datetime(today.year, today.month, today.day, tzinfo=UTC)
    day_lo, day_hi = start - timedelta(days=3), start - timedelta(days=2)
    async with engine.begin() as conn:
        for statement in _FILL:
            await conn.execute(text(statement))
    manual = {"model": None, "code": None, "lo": None, "hi": None}
    checks: list[tuple[str, TextClause, dict[str, Any]]] = []
    for client in (None, "billing"):
        checks += [
            ("queue_windows", sql.QUEUE_WINDOWS, {"client": client, "cap": 100_000}),
            ("sync_queue", sql.SYNC_QUEUE, {"client": client, "cap": 100_000}),
            ("live_batches", sql.LIVE_BATCHES, {"client": client, "lim": 100}),
            (
                "spend_by_client",
                sql.SPEND_BY_CLIENT,
                {"client": client, "lo": start, "hi": start + timedelta(days=1)},
            ),
            (
                "manual_page",
                sql.MANUAL_PAGE,
                {**manual, "client": client, "before": 2**62, "lim": 51},
            ),
            (
                "manual_page by day",
                sql.MANUAL_PAGE,
                {
                    **manual,
                    "client": client,
                    "lo": day_lo,
                    "hi": day_hi,
                    "before": 2**62,
                    "lim": 51,
                },
            ),
            (
                "manual_page by code",
                sql.MANUAL_PAGE,
                {
                    **manual,
                    "client": client,
                    "code": "invalid_request_error",
                    "model": "gpt-4o",
                    "before": 2**62,
                    "lim": 51,
                },
            ),
            ("manual_count", sql.MANUAL_COUNT, {**manual, "client": client, "cap": 10_000}),
            ("manual_ids", sql.MANUAL_IDS, {**manual, "client": client, "lim": 1000}),
            ("chosen_failed", sql.CHOSEN_FAILED, {"client": client, "ids": [25, 50, 75]}),
            ("export_rows", sql.EXPORT_ROWS, {"client": client, "ids": [25, 50, 75]}),
            (
                "dismiss",
                manual_queue._DISMISS,
                {"client": client, "cls": ["billing", "local"], "cids": ["t25", "t50"]},
            ),
            (
                "replay",
                manual_queue._REPLAY,
                {"client": client, "cls": ["billing"], "cids": ["t25"]},
            ),
            ("recent_actions", sql.RECENT_ACTIONS, {"client": client, "lim": 10}),
            ("task", sql.TASKS_BY_CUSTOM_ID, {"client": client, "cid": "t4242"}),
            ("batch_detail", sql.BATCH_DETAIL, {"client": client, "bid": "live-1"}),
        ]
    checks += [
        ("events", sql.EVENTS, {"tid": 4242, "lim": 200}),
        ("batches", sql.BATCHES_BY_ID, {"ids": ["old-8", "live-1"]}),
        ("result", sql.RESULT, {"tid": 4242}),
    ]
    for day in (today, today - timedelta(days=12)):
        lo = datetime(day.year, day.month, day.day, tzinfo=UTC)
        bounds = {"lo": lo, "hi": lo + timedelta(days=1)}
        checks += [
            (f"report {name} {day}", stmt, bounds)
            for name, stmt in (
                ("tasks in", rollups._TASKS_IN),
                ("events", rollups._EVENTS),
                ("money", rollups._MONEY),
                ("unattributed", rollups._UNATTRIBUTED),
                ("sync unkept", rollups._SYNC_UNKEPT),
            )
        ]
        checks += [
            (
                f"report lanes {day}",
                rollups._LANES,
                {**bounds, "per_doubling": report.LATENCY_BUCKETS_PER_DOUBLING},
            )
        ]
    cutoff = start - timedelta(days=20)
    checks += [
        ("prune tasks", retention._PRUNE_TASKS, {"cutoff": cutoff, "limit": 2000}),
        ("prune batches", retention._PRUNE_BATCHES, {"cutoff": cutoff, "limit": 2000}),
        ("prune due", retention._COUNT_DUE, {"cutoff": cutoff, "cutoff_day": cutoff.date()}),
    ]
    # The gauges loop's counts, every 5 s on every replica.
    checks += [
        ("gauges queue_and_spend", gauges._QUEUE, {"day": today}),
        ("gauges queued_by_client", tasks._QUEUED_BY_CLIENT, {}),
    ]
    checks += [
        ("get_job", jobs.GET_JOB, {"client": "billing", "job": "nightly-1"}),
        ("list_jobs", jobs.LIST_JOBS, {"client": "billing", "after": None, "lim": 51}),
        (
            "list_jobs after",
            jobs.LIST_JOBS,
            {"client": "billing", "after": "old-job-200", "lim": 51},
        ),
        ("list_all_jobs", jobs.LIST_ALL_JOBS, {"after_client": None, "after": None, "lim": 51}),
        (
            "list_all_jobs after",
            jobs.LIST_ALL_JOBS,
            {"after_client": "search", "after": "old-job-200", "lim": 51},
        ),
    ]
    # Run as batchd runs them, with sorting off (store/jobs.py NO_SORT).
    unsorted = [
        (
            "cancel_queued",
            jobs.CANCEL_QUEUED,
            {
                "client": "billing",
                "job": "nightly-1",
                "after": 0,
                "lim": 5000,
                "err": orjson.dumps(jobs.CANCELLED_ERROR).decode(),
            },
        )
    ]
    try:
        async with engine.connect() as conn:
            found = {name: await _scans(conn, stmt, params) for name, stmt, params in checks}
            await conn.rollback()
            await conn.execute(text(jobs.NO_SORT))
            found |= {name: await _scans(conn, stmt, params) for name, stmt, params in unsorted}
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            for state in (["succeeded"], list(jobs.FINISHED_STATES)):
                doc = await raw.fetchval(
                    "EXPLAIN (FORMAT JSON) " + jobs.results_page_sql(),
                    "billing",
                    "nightly-1",
                    0,
                    state,
                    1000,
                )
                plan = (orjson.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
                found[f"job results {state}"] = _seq_scanned(plan)
            await conn.rollback()
    finally:
        await engine.dispose()
    assert {name: tables for name, tables in found.items() if tables} == {}
