"""Retention under load and kill -9: `batchd prune` deletes old history while
tasks are being ingested, is killed mid-pass, and nothing is lost or half
deleted; a second pass finishes the job."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from batchd.check import check
from batchd.report import Reporter
from batchd.store.engine import make_engine
from tests.harness import Harness, chat_task, running

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parents[2]
OLD = 6000


async def _seed_old(h: Harness) -> None:
    """OLD finished tasks 40 days back, each with its result and event, in
    batches of 500, and their days rolled up (as the retention pass would)."""
    await h.execute(f"""
        INSERT INTO batches (id, endpoint, model, state, flush_reason, item_count, input_bytes,
                             spend_day, cost_usd, routed_at)
        SELECT 'old-b' || j, '/v1/chat/completions', 'gpt-4o-mini', 'routed', 'cap', 500, 1,
               current_date - 40, 0, now() - interval '40 days'
        FROM generate_series(0, {OLD // 500 - 1}) j""")
    await h.execute(f"""
        INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes, state,
                           attempts, batch_id, created_at, finished_at)
        SELECT 'old-' || i, '/v1/chat/completions', 'gpt-4o-mini', NULL, 'd', 1, 'succeeded',
               1, 'old-b' || (i / 500), now() - interval '40 days', now() - interval '40 days'
        FROM generate_series(0, {OLD - 1}) i""")
    await h.execute("""
        INSERT INTO results (task_id, client, custom_id, batch_id, status_code, response,
                             created_at)
        SELECT id, client, custom_id, batch_id, 200, '{}', now() - interval '40 days'
        FROM tasks WHERE custom_id LIKE 'old-%'""")
    await h.execute("""
        INSERT INTO task_events (task_id, client, custom_id, batch_id, attempt, outcome,
                                 created_at)
        SELECT id, client, custom_id, batch_id, 1, 'succeeded', now() - interval '40 days'
        FROM tasks WHERE custom_id LIKE 'old-%'""")


async def test_prune_killed_under_ingest_loses_nothing_and_leaves_nothing_half_done(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await _seed_old(h)
        await Reporter(h.engine, 0.03).roll_up()
        old_day = await h.get(
            "/v1/report/daily",
            date=str(
                h.service.clock().date().fromordinal(h.service.clock().date().toordinal() - 40)
            ),
        )
        accepted: list[str] = []
        stop = asyncio.Event()

        async def ingest() -> None:
            n = 0
            while not stop.is_set():
                batch = [chat_task(f"new-{n + k}") for k in range(50)]
                status, _ = await h.post({"tasks": batch})
                assert status == 202
                accepted.extend(t["custom_id"] for t in batch)
                n += 50

        feeder = asyncio.create_task(ingest())
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
        env.update(
            {
                "BATCHD_DATABASE_URL": db_url,
                "BATCHD_RETENTION_BATCH_ROWS": "100",
                "BATCHD_LOG_LEVEL": "warning",
            }
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "batchd",
            "prune",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        # Kill it once it is well into the pass, mid-step as likely as not.
        for _ in range(600):
            left = await h.count("custom_id LIKE 'old-%'")
            if left < OLD * 2 // 3:
                break
            await asyncio.sleep(0.05)
        proc.kill()
        await proc.wait()
        stop.set()
        await feeder
        assert 0 < left < OLD, left

        # Nothing accepted is lost; every old task is wholly there or wholly gone.
        stored = {
            r["custom_id"]
            for r in await h.rows("SELECT custom_id FROM tasks WHERE custom_id LIKE 'new-%'")
        }
        assert stored == set(accepted)
        half = await h.rows("""
            SELECT x.custom_id FROM (SELECT custom_id FROM results UNION ALL
                                     SELECT custom_id FROM task_events) x
            WHERE x.custom_id LIKE 'old-%'
              AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.custom_id = x.custom_id)""")
        assert half == []
        engine = make_engine(db_url, pool_size=1)
        try:
            assert [b.line() for b in await check(engine, retention_days=30)] == []
        finally:
            await engine.dispose()

        # The next pass (here the daemon's own) finishes; the report of the day holds.
        await h.service.retention.prune()
        assert await h.count("custom_id LIKE 'old-%'") == 0
        assert await h.count("custom_id LIKE 'old-%'", "results") == 0
        assert await h.count("id LIKE 'old-b%'", "batches") == 0
        assert await h.count("custom_id LIKE 'new-%'") == len(accepted)
        assert await h.get("/v1/report/daily", date=old_day[1]["date"]) == old_day
