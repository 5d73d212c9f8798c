"""Benchmark rows of a year of operation (DESIGN 15), run by run.py:

* ``storage``: bytes of PostgreSQL per settled task at steady state, against
  the body bytes of the same run;
* ``prune``: single-POST p99 while ``batchd prune`` deletes --prune-rows rows,
  against the p99 of the same daemon with no prune running;
* ``history``: --history finished tasks of history seeded into the database,
  then the bulk-ingest, flush, route and report figures again, each against
  the same figure on an empty database in the same run; and EXPLAIN of the
  hot queries on the seeded database, written beside the table;
* ``migrations``: --migration-tasks finished tasks seeded at the schema
  before this issue, then each of its migrations while inserts go on: the
  longest an insert waited (the longest lock it met) and how long each took.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from batchd.config import Settings
from batchd.contract import parse_task
from tests.bench import run as r

# The tables a task's rows live in (each with its indexes and TOAST).
TASK_TABLES = (
    "tasks",
    "results",
    "task_events",
    "batches",
    "callbacks",
    "callback_attempts",
    "sync_spend",
    "daily_rollups",
    "rollup_days",
)

# A chat completion as the emulator answers one, stored as each result's response.
_RESPONSE = """jsonb_build_object('id', 'chatcmpl-' || i, 'object', 'chat.completion',
    'created', 1764979200, 'model', 'gpt-4o-mini-2024-07-18',
    'choices', jsonb_build_array(jsonb_build_object('index', 0, 'finish_reason', 'stop',
        'message', jsonb_build_object('role', 'assistant',
            'content', 'The answer to request ' || i || ' is short.'))),
    'usage', jsonb_build_object('prompt_tokens', 120, 'completion_tokens', 12,
        'total_tokens', 132))"""


async def table_bytes(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class "
            "WHERE relname = ANY($1::text[]) AND relkind = 'r'",
            list(TASK_TABLES),
        )
        return {k: int(v) for k, v in rows}
    finally:
        await conn.close()


async def vacuum(url: str) -> None:
    """What autovacuum does between loads: dead row versions become free
    space the next rows reuse (no VACUUM FULL: the files do not shrink)."""
    conn = await asyncpg.connect(url)
    try:
        for t in TASK_TABLES:
            await conn.execute(f"VACUUM (ANALYZE) {t}")
    finally:
        await conn.close()


async def wait_results(url: str, n: int, limit: float) -> None:
    """Until n results are stored and no batch is live (polled: another process)."""
    conn = await asyncpg.connect(url)
    try:
        t0 = time.perf_counter()
        while True:
            done = await conn.fetchval("SELECT count(*) FROM results")
            live = await conn.fetchval("SELECT count(*) FROM batches WHERE state <> 'routed'")
            if done >= n and not live:
                return
            if time.perf_counter() - t0 > limit:
                raise RuntimeError(f"{done:,} of {n:,} results after {limit} s")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


# ------------------------------------------------------------------ storage


async def bench_storage(b: r.Bench) -> None:
    a = b.args
    n, rounds = a.storage_tasks, a.storage_rounds
    b.log(f"storage: {n:,} tasks in {rounds} rounds through the daemon, VACUUM between")
    url = await b.new_db("storage", batchd_schema=True)
    daemon, port = await r.start_daemon(
        url,
        b.provider_url,
        b.tmp / "storage",
        window_seconds=1,
        max_batch_items=10_000,
        poll_interval_seconds=0.5,
        scheduler_interval_seconds=0.25,
    )
    per_round = n // rounds
    sizes: list[int] = []
    body_bytes = 0
    try:
        sent = 0
        for k in range(rounds):
            bodies = [r.ndjson(f"st{k}", s, 1000) for s in range(0, per_round, 1000)]
            body_bytes += sum(len(orjson.dumps(r.make_body(i))) for i in range(per_round))
            await r.http_bulk(port, bodies, a.bulk_concurrency)
            sent += per_round
            await wait_results(url, sent, a.e2e_timeout)
            await vacuum(url)
            sizes.append(sum((await table_bytes(url)).values()))
            b.log(f"  round {k}: {sent:,} tasks settled, {sizes[-1] / sent:,.0f} B a task")
        final = await table_bytes(url)
        conn = await asyncpg.connect(url)
        try:
            for t in ("tasks", "results", "task_events"):
                heap = await conn.fetchrow(
                    f"SELECT pg_relation_size('{t}') AS heap, "
                    f"coalesce(pg_total_relation_size(reltoastrelid), 0) AS toast, "
                    f"(SELECT avg(pg_column_size(x.*)) FROM {t} x) AS row "
                    f"FROM pg_class WHERE relname = '{t}'"
                )
                idx = await conn.fetch(
                    "SELECT indexrelid::regclass::text AS name, "
                    "pg_relation_size(indexrelid) AS bytes FROM pg_index "
                    f"WHERE indrelid = '{t}'::regclass"
                )
                b.log(
                    f"  {t}: heap {heap['heap'] / sent:,.0f} B a task (rows "
                    f"{float(heap['row']):,.0f} B), toast {heap['toast'] / sent:,.0f}, "
                    + ", ".join(f"{i['name']} {i['bytes'] / sent:,.0f}" for i in idx)
                )
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
            for t in ("tasks", "results"):
                st = await conn.fetchrow(f"SELECT * FROM pgstattuple('{t}')")
                b.log(
                    f"  {t} pgstattuple: live {st['tuple_len'] / sent:,.0f} B a task, dead "
                    f"{st['dead_tuple_len'] / sent:,.0f}, free {st['free_space'] / sent:,.0f}"
                )
            cols = await conn.fetchrow(
                "SELECT avg(pg_column_size(response)) AS response, "
                "avg(pg_column_size(usage)) AS usage FROM results"
            )
            b.log(
                f"  results columns: response {float(cols['response']):,.0f} B, "
                f"usage {float(cols['usage'] or 0):,.0f} B"
            )
        finally:
            await conn.close()
    finally:
        await daemon.stop()
    per_task = sizes[-1] / sent
    body = body_bytes / sent
    marginal = (sizes[-1] - sizes[0]) / (sent - per_round) if rounds > 1 else per_task
    parts = ", ".join(
        f"{t} {v / sent:,.0f}"
        for t, v in sorted(final.items(), key=lambda kv: -kv[1])
        if v / sent >= 1
    )
    b.rows.append(
        r.Row(
            f"storage: PostgreSQL bytes per settled task ({sent:,} tasks, {rounds} rounds)",
            f"the task's body: {body:,.0f} B",
            f"{per_task / body:.1f}x the body",
            f"{per_task:,.0f} B a task ({parts}); {marginal:,.0f} B a task over the rounds "
            "after the first",
            "<= 1,500 B",
            per_task <= 1500,
            "real daemon and emulator; VACUUM (not FULL) after each round, as autovacuum; "
            "every table with its indexes and TOAST",
        )
    )


# -------------------------------------------------------------------- prune


async def seed_history(
    url: str, n: int, *, days_ago: float, spread_days: float, prefix: str = "hist"
) -> float:
    """n finished tasks, each with its result and its events ('accepted' is not
    stored; 'succeeded' and, every tenth, a 'retried' first), in batches of
    50,000, finished over ``spread_days`` ending ``days_ago`` days back, rows
    as batchd writes them (results and events find their task by id). Written
    by INSERT ... SELECT from generate_series on the server (as fast as COPY
    and nothing crosses the wire). Returns seconds taken."""
    conn = await asyncpg.connect(url)
    t0 = time.perf_counter()
    end = datetime.now(UTC) - timedelta(days=days_ago)
    start = end - timedelta(days=spread_days)
    span = (end - start).total_seconds()
    try:
        # Task ids are given (base + i) so results and events name their task
        # without a join; the sequence moves past them at the end.
        base = int(await conn.fetchval("SELECT coalesce(max(id), 0) + 1 FROM tasks"))
        step = 500_000
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            when = f"$1::timestamptz + make_interval(secs => i * {span} / {n})"
            await conn.execute(
                f"""
                INSERT INTO batches (id, endpoint, model, state, flush_reason, item_count,
                    input_bytes, spend_day, cost_usd, sync_cost_usd, created_at, routed_at,
                    submitted_at, finished_at, provider_batch_id)
                SELECT '{prefix}-b' || j, '/v1/chat/completions', 'gpt-4o-mini', 'routed',
                       'cap', 50000, 30000000, w::date, 0, 0, w, w, w, w,
                       'batch_{prefix}_' || j
                FROM generate_series({lo // 50_000}, {(hi - 1) // 50_000}) j,
                     LATERAL (SELECT $1::timestamptz + make_interval(
                         secs => j * 50000 * {span} / {n}) AS w) t""",
                start,
            )
            await conn.execute(
                f"""
                INSERT INTO tasks (id, custom_id, endpoint, model, body, body_digest, line_bytes,
                    est_input_tokens, est_output_tokens, state, attempts, batch_id,
                    created_at, updated_at, submitted_at, finished_at, not_before)
                SELECT {base} + i, '{prefix}-' || i, '/v1/chat/completions', 'gpt-4o-mini', NULL,
                       md5(i::text) || md5((i + 1)::text), 560, 120, 16, 'succeeded', 1,
                       '{prefix}-b' || (i / 50000), w - interval '20 minutes', w,
                       w - interval '10 minutes', w, w - interval '20 minutes'
                FROM generate_series({lo}, {hi - 1}) i, LATERAL (SELECT {when} AS w) t""",
                start,
            )
            await conn.execute(
                f"""
                INSERT INTO results (task_id, client, custom_id, batch_id, status_code,
                    response, cost_usd, sync_cost_usd, created_at, updated_at)
                SELECT {base} + i, 'local', '{prefix}-' || i, '{prefix}-b' || (i / 50000), 200,
                       {_RESPONSE},
                       0.000014, 0.000028, w, w
                FROM generate_series({lo}, {hi - 1}) i, LATERAL (SELECT {when} AS w) t""",
                start,
            )
            await conn.execute(
                f"""
                INSERT INTO task_events (task_id, batch_id, attempt, outcome, created_at)
                SELECT {base} + i, '{prefix}-b' || (i / 50000), 1, o, w
                FROM generate_series({lo}, {hi - 1}) i, LATERAL (SELECT {when} AS w) t,
                     unnest(CASE WHEN i % 10 = 0 THEN ARRAY['retried', 'succeeded']
                                 ELSE ARRAY['succeeded'] END) o""",
                start,
            )
        await conn.execute(
            "SELECT setval(pg_get_serial_sequence('tasks', 'id'), max(id)) FROM tasks"
        )
        await conn.execute(
            "UPDATE batches b SET cost_usd = s.c, sync_cost_usd = s.y "
            "FROM (SELECT batch_id, sum(cost_usd) c, sum(sync_cost_usd) y "
            f"FROM results WHERE batch_id LIKE '{prefix}-b%' "
            "GROUP BY batch_id) s WHERE s.batch_id = b.id"
        )
        for t in ("tasks", "results", "task_events", "batches"):
            await conn.execute(f"VACUUM (ANALYZE) {t}")
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def row_count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT (SELECT count(*) FROM tasks) + (SELECT count(*) FROM results) "
                "+ (SELECT count(*) FROM task_events) + (SELECT count(*) FROM batches)"
            )
        )
    finally:
        await conn.close()


async def p99_ms(port: int, tag: str, rate: float, seconds: float) -> list[float]:
    n = int(rate * seconds)
    return await r.open_loop(port, [r.task_json(tag, i) for i in range(n)], rate)


def _p99(lat: list[float]) -> float:
    lat = sorted(lat)
    return lat[max(0, int(len(lat) * 0.99) - 1)] * 1000


async def bench_prune(b: r.Bench) -> None:
    a = b.args
    tasks = a.prune_rows // 3  # a task, its result and its event (a tenth have two)
    b.log(f"prune: seeding {tasks:,} finished tasks 40 days old")
    url = await b.new_db("prune", batchd_schema=True)
    took = await seed_history(url, tasks, days_ago=40, spread_days=1)
    rows = await row_count(url)
    b.log(f"  seeded {rows:,} rows in {took:.0f} s")
    daemon, port = await r.start_daemon(
        url,
        b.provider_url,
        b.tmp / "prune",
        window_seconds=86400,
        max_batch_items=50_000,
        retention_interval_seconds=86400,
    )
    try:
        await r.http_single(port, [r.task_json("warm", i) for i in range(2000)], 16)
        quiet = await p99_ms(port, "quiet", a.p99_rate, a.p99_seconds)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
        env.update({"BATCHD_DATABASE_URL": url, "BATCHD_LOG_LEVEL": "warning"})
        step_tasks = a.prune_batch_rows or Settings.model_fields["retention_batch_rows"].default
        env["BATCHD_RETENTION_BATCH_ROWS"] = str(step_tasks)
        t0 = time.perf_counter()
        # Its output goes to a file: a pipe nobody reads until the end fills
        # up (a log line a step) and stops the prune mid-way.
        out_path = b.tmp / "prune.out"
        with out_path.open("wb") as out_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "batchd",
                "prune",
                env=env,
                stdout=out_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        during: list[float] = []
        k = 0
        while proc.returncode is None:
            during += await p99_ms(port, f"busy{k}", a.p99_rate, 5)
            k += 1
            try:
                await asyncio.wait_for(proc.wait(), 0.01)
            except TimeoutError:
                pass
        await proc.wait()
        prune_s = time.perf_counter() - t0
        out = out_path.read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"batchd prune failed:\n{out}")
    finally:
        await daemon.stop()
    found = re.search(r"^pruned (\d+) row", out, re.M)
    if found is None:
        raise RuntimeError(f"batchd prune printed no count:\n{out}")
    pruned = int(found.group(1))
    q, d = _p99(quiet), _p99(during)
    b.log(f"  pruned {pruned:,} rows in {prune_s:.0f} s; p99 {q:.1f} ms quiet, {d:.1f} ms during")
    b.rows.append(
        r.Row(
            f"single-POST p99 at {a.p99_rate:,.0f}/s while `batchd prune` deletes {rows:,} rows",
            f"the same daemon, no prune: p99 {q:.1f} ms",
            f"{d / q:.2f}x",
            f"p99 {d:.1f} ms over {len(during):,} requests; prune took {prune_s:.0f} s "
            f"({pruned / prune_s:,.0f} rows/s, its roll-up of the day included)",
            "<= 20 ms (the single-POST p99 target)",
            d <= 20,
            f"steps of {step_tasks} tasks with their rows, SKIP LOCKED, one short transaction "
            "each, a rest three times as long after each",
        )
    )


# ------------------------------------------------------------------ history

HOT_QUERIES: dict[str, str] = {
    "ingest insert (ON CONFLICT probe)": "EXPLAIN INSERT INTO tasks "
    "(custom_id, endpoint, model, body, body_digest, line_bytes) "
    "VALUES ('explain-1', '/v1/chat/completions', 'm', '{}', 'd', 1) "
    "ON CONFLICT (client, custom_id) DO NOTHING",
    "queued windows": "EXPLAIN SELECT provider, endpoint, model, count(*), min(not_before) "
    "FROM tasks WHERE state = 'queued' AND lane = 'batch' "
    "GROUP BY provider, endpoint, model",
    "route: settle a task": "EXPLAIN UPDATE tasks SET state = 'succeeded' "
    "WHERE id = 1 AND state = 'submitted'",
    "batch's tasks": "EXPLAIN SELECT id FROM tasks WHERE batch_id = 'x' AND id > 0 "
    "AND state = 'submitted' ORDER BY batch_id, id LIMIT 2000",
    "a client's results page": "EXPLAIN SELECT seq FROM results WHERE client = 'local' "
    "AND seq > 0 ORDER BY seq LIMIT 1000",
    "retention: a batch still held": "EXPLAIN SELECT 1 FROM tasks WHERE batch_id = 'x' "
    "AND state <> 'succeeded'",
    "report today: tasks in": "EXPLAIN SELECT count(*) FROM tasks "
    "WHERE created_at >= current_date AND created_at < current_date + 1",
    "report today: events": "EXPLAIN SELECT outcome, count(*) FROM task_events "
    "WHERE created_at >= current_date AND created_at < current_date + 1 "
    "GROUP BY outcome",
    "report today: money": "EXPLAIN SELECT sum(cost_usd) FROM results "
    "WHERE created_at >= current_date AND created_at < current_date + 1",
    "report today: routed batches": "EXPLAIN SELECT sum(unattributed_cost_usd) FROM batches "
    "WHERE state = 'routed' AND routed_at >= current_date",
    "report today: finished tasks": "EXPLAIN SELECT count(*) FROM tasks WHERE finished_at >= "
    "current_date AND state IN ('succeeded', 'failed')",
    "report: 366 stored days": "EXPLAIN SELECT * FROM daily_rollups "
    "WHERE day BETWEEN current_date - 366 AND current_date",
    "prune step": "EXPLAIN SELECT id FROM tasks WHERE state IN ('succeeded', 'dismissed', "
    "'cancelled') AND finished_at < now() - interval '30 days' "
    "ORDER BY finished_at LIMIT 2000",
    "snapshot: queued": "EXPLAIN SELECT count(*) FROM tasks WHERE state = 'queued'",
    "snapshot: submitted": "EXPLAIN SELECT count(*) FROM tasks WHERE state = 'submitted' "
    "AND batch_id IS NOT NULL",
    "snapshot: queued by client": "EXPLAIN SELECT client, count(*) FROM tasks "
    "WHERE state = 'queued' GROUP BY client",
    "manual queue page": "EXPLAIN SELECT id FROM tasks WHERE state = 'failed' AND id > 0 "
    "ORDER BY id LIMIT 100",
}


async def explain_all(url: str) -> tuple[str, list[str]]:
    """Every hot query's plan on the seeded database; the names of those
    that scan a big table whole."""
    conn = await asyncpg.connect(url)
    out, scans = [], []
    try:
        for name, sql in HOT_QUERIES.items():
            tx = conn.transaction()
            await tx.start()
            plan = "\n".join(row[0] for row in await conn.fetch(sql))
            await tx.rollback()
            out.append(f"-- {name}\n{sql}\n{plan}\n")
            if any(f"Seq Scan on {t}" in plan for t in ("tasks", "results", "task_events")):
                scans.append(name)
    finally:
        await conn.close()
    return "\n".join(out), scans


async def report_seconds(url: str, days: int) -> float:
    from batchd.report import Reporter
    from batchd.store.engine import async_url, make_engine

    engine = make_engine(async_url(url))
    try:
        reporter = Reporter(engine, 0.03)
        await reporter.roll_up()  # the retention loop's work, not the report's
        t0 = time.perf_counter()
        found = await reporter.daily(None, days)
        took = time.perf_counter() - t0
        assert len(found) == days
        return took
    finally:
        await engine.dispose()


async def bulk_rate(b: r.Bench, url: str, tag: str) -> float:
    daemon, port = await r.start_daemon(
        url,
        b.provider_url,
        b.tmp / f"bulk-{tag}",
        window_seconds=86400,
        max_batch_items=50_000,
        retention_interval_seconds=86400,
    )
    try:
        await r.http_bulk(port, [r.ndjson(f"warm{tag}", s, 1000) for s in range(0, 5000, 1000)], 2)
        rates = []
        for run in range(b.args.runs):
            n = b.args.bulk_tasks
            took = await r.http_bulk(
                port,
                [r.ndjson(f"bulk{tag}{run}", s, 1000) for s in range(0, n, 1000)],
                b.args.bulk_concurrency,
            )
            rates.append(n / took)
        return r.median(rates)
    finally:
        await daemon.stop()


async def _seed_queue(url: str, tag: str, n: int) -> None:
    """n queued tasks, due, written straight in (setup, not measured); only
    they are touched, whatever history the table holds."""
    tasks = [parse_task(orjson.loads(r.task_json(tag, i)), i) for i in range(n)]
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table(
            "tasks",
            records=r.raw_rows(tasks),
            columns=[c.strip() for c in r._RAW_INSERT_COLS.split(",")],
        )
        await conn.execute(
            "UPDATE tasks SET not_before = now() - interval '1 hour' WHERE state = 'queued'"
        )
    finally:
        await conn.close()


async def _reset_recent(url: str) -> None:
    """Delete what the window rows wrote (today's rows); the history stays."""
    conn = await asyncpg.connect(url)
    try:
        for t in ("task_events", "results", "tasks", "batches"):
            await conn.execute(f"DELETE FROM {t} WHERE created_at > now() - interval '1 day'")
        for t in ("tasks", "results", "task_events", "batches"):
            await conn.execute(f"VACUUM (ANALYZE) {t}")
    finally:
        await conn.close()


async def _window(b: r.Bench, url: str, n: int, tag: str) -> tuple[float, float]:
    """Flush one window of n queued tasks and route its output: the seconds
    of each, measured as the windows row measures them."""
    await _reset_recent(url)
    await _seed_queue(url, tag, n)
    saved, b.db_url = b.db_url, url
    try:
        async with r.parts(b, b.tmp / f"hist-{tag}") as p:
            started = await p.scheduler.tick(drain=True)
            await p.scheduler.wait_sends()
            assert started == 1, started
            async with p.engine.connect() as conn:
                row = (
                    await conn.exec_driver_sql(
                        "SELECT id, provider_batch_id, "
                        "extract(epoch FROM submitted_at - created_at) AS took FROM batches "
                        "WHERE state = 'submitted'"
                    )
                ).one()
            for _ in range(400):
                remote = await p.provider.get_batch(row.provider_batch_id)
                if remote.terminal:
                    break
                await asyncio.sleep(0.05)
            path = b.tmp / f"hist-{tag}.jsonl"
            await p.provider.download_file(remote.output_file_id, path)
            t0 = time.perf_counter()
            summary = await p.router.route(row.id, r.MODEL, remote, [path])
            route_s = time.perf_counter() - t0
            assert summary.succeeded == n, summary
            path.unlink()
            return float(row.took), route_s
    finally:
        b.db_url = saved


async def windows_rates(b: r.Bench, url: str, tag: str) -> tuple[float, float]:
    """Median flush and route rates of --runs windows of --window-lines on ``url``."""
    n = b.args.window_lines
    runs = [await _window(b, url, n, f"{tag}{k}") for k in range(b.args.runs)]
    return r.median([n / f for f, _ in runs]), r.median([n / x for _, x in runs])


async def bench_history(b: r.Bench) -> None:
    a = b.args
    empty = await b.new_db("empty", batchd_schema=True)
    full = await b.new_db("history", batchd_schema=True)
    b.log(f"history: seeding {a.history:,} finished tasks over the last 30 days")
    took = await seed_history(full, a.history, days_ago=1, spread_days=29)
    size = sum((await table_bytes(full)).values())
    b.log(f"  seeded in {took:.0f} s, {size / 2**30:.1f} GiB")
    # The seed's gigabytes are still being written out when it returns; the
    # empty database, measured first, would pay for that write-back.
    t0 = time.perf_counter()
    await r.admin(b.admin_url, "CHECKPOINT")
    b.log(f"  CHECKPOINT after the seed: {time.perf_counter() - t0:.0f} s")
    figures: dict[str, tuple[float, float, float, float]] = {}
    for name, url in (("empty", empty), ("history", full)):
        bulk = await bulk_rate(b, url, name)
        flush, route = await windows_rates(b, url, name)
        report = r.median([await report_seconds(url, 366) for _ in range(a.runs)])
        figures[name] = (bulk, flush, route, report)
        b.log(
            f"  {name}: bulk {bulk:,.0f}/s, flush {flush:,.0f}/s, route {route:,.0f}/s, "
            f"report --days 366 {report * 1000:.0f} ms"
        )
    plans, scans = await explain_all(full)
    if b.args.out:
        await asyncio.to_thread(Path(str(b.args.out) + ".explain.txt").write_text, plans)
    e, h = figures["empty"], figures["history"]
    for i, (what, unit) in enumerate(
        (("bulk ingest", "tasks/s"), ("flush", "lines/s"), ("route", "lines/s"))
    ):
        ratio = h[i] / e[i]
        b.rows.append(
            r.Row(
                f"{what} with {a.history:,} finished tasks of history",
                f"the same row on an empty database: {r.fmt_rate(e[i], unit)}",
                f"{ratio:.0%}",
                r.fmt_rate(h[i], unit),
                ">= 85% of empty",
                ratio >= 0.85,
                f"history seeded in {took:.0f} s ({size / 2**30:.1f} GiB)",
            )
        )
    ratio = e[3] / h[3]
    b.rows.append(
        r.Row(
            f"report --days 366 with {a.history:,} finished tasks of history",
            f"on an empty database: {e[3] * 1000:.0f} ms",
            f"{h[3] / e[3]:.2f}x the time",
            f"{h[3] * 1000:.0f} ms",
            "within 15% of empty",
            ratio >= 0.85 or h[3] - e[3] < 0.005,
            "closed days from daily_rollups, today live",
        )
    )
    b.rows.append(
        r.Row(
            f"hot queries on the seeded database ({len(HOT_QUERIES)} EXPLAINed)",
            "-",
            "-",
            "all on an index" if not scans else "sequential scans: " + ", ".join(scans),
            "no sequential scan of tasks, results or task_events",
            not scans,
            "plans written beside the table (--out FILE: FILE.explain.txt)",
        )
    )


# --------------------------------------------------------------- migrations

# This migrations, then the providers one (0013, issue 18) that came
# after them, each run on the seeded table in turn.
MIGRATIONS = ("0010_retention", "0011_client_task_key", "0012_lean_rows", "0013_providers")
_BEFORE = "0009_jobs"


async def seed_before(url: str, n: int) -> float:
    """n finished tasks as the schema before this issue held them (0009):
    anonymous (no client), bodies kept (a few bytes each: no migration reads
    them), a result and an event each keyed by custom_id. Returns seconds."""
    conn = await asyncpg.connect(url)
    t0 = time.perf_counter()
    try:
        step = 500_000
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            series = f"generate_series({lo}, {hi - 1}) i"
            await conn.execute(f"""
                INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes,
                    est_input_tokens, est_output_tokens, state, attempts, batch_id,
                    created_at, updated_at, submitted_at, finished_at, not_before)
                SELECT 'old-' || i, '/v1/chat/completions', 'gpt-4o-mini',
                       '{{"model": "gpt-4o-mini"}}', md5(i::text), 560, 120, 16, 'succeeded',
                       1, 'old-b' || (i / 50000), now(), now(), now(), now(), now()
                FROM {series}""")
            await conn.execute(f"""
                INSERT INTO results (custom_id, batch_id, status_code, response, cost_usd,
                    sync_cost_usd)
                SELECT 'old-' || i, 'old-b' || (i / 50000), 200, {_RESPONSE}, 0.000014, 0.000028
                FROM {series}""")
            await conn.execute(f"""
                INSERT INTO task_events (custom_id, batch_id, attempt, outcome)
                SELECT 'old-' || i, 'old-b' || (i / 50000), 1, 'succeeded' FROM {series}""")
        for t in ("tasks", "results", "task_events"):
            await conn.execute(f"VACUUM (ANALYZE) {t}")
    finally:
        await conn.close()
    return time.perf_counter() - t0


async def _insert_until(url: str, done: asyncio.Event, sql: str, tag: str) -> list[float]:
    """One insert after another (5 ms apart) until ``done``: each one's seconds."""
    conn = await asyncpg.connect(url)
    waits: list[float] = []
    try:
        i = 0
        while not done.is_set():
            t0 = time.perf_counter()
            await conn.execute(sql, f"{tag}-{i}")
            waits.append(time.perf_counter() - t0)
            i += 1
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    return waits


_INGEST = (
    "INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes) "
    "VALUES ($1, '/v1/chat/completions', 'gpt-4o-mini', '{}', 'd', 10)"
)
# An event as routing writes one, valid before and after 0012 (it gives the
# copies 0012 makes optional).
_EVENT = (
    "INSERT INTO task_events (task_id, client, custom_id, batch_id, attempt, outcome) "
    "VALUES (1, 'local', $1, 'b', 1, 'retried')"
)


def _upgrade(url: str, target: str) -> None:
    from alembic import command

    from batchd.service import alembic_config
    from batchd.store.engine import async_url

    command.upgrade(alembic_config(async_url(url)), target)


async def bench_migrations(b: r.Bench) -> None:
    a = b.args
    n = a.migration_tasks
    url = await b.new_db("migrations", batchd_schema=False)
    await asyncio.to_thread(_upgrade, url, _BEFORE)
    b.log(
        f"migrations: seeding {n:,} finished tasks (with a result and an event each) at {_BEFORE}"
    )
    took = await seed_before(url, n)
    b.log(f"  seeded in {took:.0f} s, {sum((await table_bytes(url)).values()) / 2**30:.1f} GiB")
    for target in MIGRATIONS:
        done = asyncio.Event()
        writers = [asyncio.create_task(_insert_until(url, done, _INGEST, f"in-{target}"))]
        if target >= "0012":
            writers.append(asyncio.create_task(_insert_until(url, done, _EVENT, f"ev-{target}")))
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(_upgrade, url, target)
        finally:
            done.set()
            waits = [await w for w in writers]
        spent = time.perf_counter() - t0
        worst = max(max(w) for w in waits)
        ingest = sorted(waits[0])
        what = "single-task inserts" + (" and event inserts" if len(waits) > 1 else "")
        b.log(
            f"  {target}: {spent:.0f} s; longest insert {worst * 1000:.0f} ms over "
            f"{sum(map(len, waits)):,} inserts"
        )
        b.rows.append(
            r.Row(
                f"migration {target} on {n:,} finished tasks while {what} go on",
                f"an insert's median during it: {r.median(ingest) * 1000:.1f} ms",
                f"{worst / r.median(ingest):,.0f}x",
                f"longest insert {worst * 1000:,.0f} ms "
                f"(p99 {_p99(ingest):,.1f} ms over {sum(map(len, waits)):,} inserts); the "
                f"migration took {spent:,.0f} s",
                "no insert waits 0.5 s (no long lock)",
                worst < 0.5,
                f"seeded at {_BEFORE} in {took:.0f} s, then each migration in turn",
            )
        )


def add_arguments(p: Any) -> None:
    p.add_argument("--storage-tasks", type=int, default=200_000)
    p.add_argument("--storage-rounds", type=int, default=4)
    p.add_argument("--prune-rows", type=int, default=5_000_000)
    p.add_argument(
        "--prune-batch-rows",
        type=int,
        help="BATCHD_RETENTION_BATCH_ROWS of the prune row's `batchd prune` (default: batchd's)",
    )
    p.add_argument(
        "--history",
        type=int,
        default=10_000_000,
        help="finished tasks of history for the history rows",
    )
    p.add_argument(
        "--migration-tasks",
        type=int,
        default=10_000_000,
        help="finished tasks on which the migrations row runs this issue's migrations",
    )
