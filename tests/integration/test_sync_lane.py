"""One front door for urgent and offline work: the synchronous lane."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from batchd.emulator.openai import Emulator
from batchd.emulator.openai_lines import usage_for
from batchd.prices import PriceTable, cost, round_usd, tokens_from_usage
from tests.harness import API_KEY, chat_task, running


async def test_sync_task_with_wait_returns_its_result(db_url: str, tmp_path: Path) -> None:
    emulator = Emulator(api_key=API_KEY, sync_latency_seconds=0.05)
    async with running(db_url, tmp_path, emulator=emulator) as h:
        stop = asyncio.Event()
        lane = asyncio.create_task(h.service.sync_lane.run(stop))
        try:
            async with h.http.post(
                f"{h.base_url}/v1/tasks",
                params={"wait": "10s"},
                json=chat_task("urgent", lane="sync"),
            ) as r:
                status, body = r.status, await r.json()
        finally:
            stop.set()
            await lane
        assert status == 200
        (task,) = body["tasks"]
        assert task["state"] == "succeeded" and task["attempts"] == 1
        assert task["response"]["object"] == "chat.completion"
        assert h.emulator.calls["sync"] == 1 and h.emulator.calls.get("create", 0) == 0
        assert await h.count("true", "batches") == 0


async def test_wait_that_runs_out_answers_202(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        async with h.http.post(
            f"{h.base_url}/v1/tasks", params={"wait": "200ms"}, json=chat_task("later")
        ) as r:
            assert r.status == 202
            assert (await r.json())["tasks"] == [{"custom_id": "later", "state": "queued"}]
        async with h.http.post(
            f"{h.base_url}/v1/tasks", params={"wait": "forever"}, json=chat_task("x")
        ) as r:
            assert r.status == 400


async def test_deadline_a_batch_cannot_meet_goes_sync(db_url: str, tmp_path: Path) -> None:
    soon = (datetime.now(UTC) + timedelta(hours=3)).isoformat()
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    async with running(db_url, tmp_path) as h:
        await h.post(
            {"tasks": [chat_task("soon", deadline=soon), chat_task("later", deadline=later)]}
        )
        lanes = {
            r["custom_id"]: r["lane"] for r in await h.rows("SELECT custom_id, lane FROM tasks")
        }
        assert lanes == {"soon": "sync", "later": "batch"}
        await h.drain_sync()
        assert (await h.task("soon"))["state"] == "succeeded"
        assert (await h.task("later"))["state"] == "queued"  # waits for its window


async def test_sync_failures_follow_the_batch_rules(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(
            {
                "tasks": [
                    chat_task("flaky", lane="sync", emulate="http_503*1"),
                    chat_task("broken", lane="sync", emulate="http_400"),
                    chat_task("doomed", lane="sync", emulate="http_500"),
                ]
            }
        )
        await h.drain_sync()
        states = {
            r["custom_id"]: (r["state"], r["attempts"])
            for r in await h.rows("SELECT custom_id, state, attempts FROM tasks")
        }
        assert states == {
            "flaky": ("succeeded", 2),
            "broken": ("failed", 1),
            "doomed": ("failed", 3),
        }
        assert h.emulator.submissions[await h.key("doomed")] == 3


async def test_profile_falls_back_to_sync_when_the_batch_is_late(
    db_url: str, tmp_path: Path
) -> None:
    emulator = Emulator(api_key=API_KEY, in_progress_seconds=3600)
    async with running(db_url, tmp_path, emulator=emulator) as h:
        task = chat_task("tight", metadata={"latency_profile": "1h"})
        await h.post({"tasks": [task, chat_task("relaxed")]})
        fallback = await h.scalar("SELECT fallback_at FROM tasks WHERE custom_id = 'tight'")
        assert fallback is not None
        # The 1 h profile's 5-minute window makes the window due after 5
        # minutes instead of 15; the window flushes whole, both tasks in it.
        await h.age_queue(290)
        assert await h.flush() == 0
        await h.age_queue(10)
        assert await h.flush() == 1
        assert await h.count("state = 'submitted'") == 2
        await h.execute("UPDATE tasks SET fallback_at = now() WHERE custom_id = 'tight'")
        h.service.sync_lane._last_sweep = 0.0
        await h.drain_sync()
        tight = await h.task("tight")
        # The unanswered batch attempt was given back; the sync call counted.
        assert (tight["state"], tight["attempts"]) == ("succeeded", 1)
        events = [
            r["outcome"]
            for r in await h.rows(
                "SELECT outcome FROM task_events "
                "WHERE task_id = (SELECT id FROM tasks WHERE custom_id = 'tight') "
                "ORDER BY id"
            )
        ]
        assert events == ["fallback", "succeeded"]
        assert await h.scalar("SELECT state FROM tasks WHERE custom_id = 'relaxed'") == "submitted"
        assert await h.count("true", "results") == 1


async def test_canary_share_splits_ten_thousand_tasks(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, batch_share=70) as h:
        for start in range(0, 10_000, 2000):
            status, _ = await h.post(
                {"tasks": [chat_task(f"c{i}") for i in range(start, start + 2000)]}
            )
            assert status == 202
        in_batch = await h.count("lane = 'batch'")
        assert abs(in_batch - 7000) <= 200  # 4 standard deviations of binomial(10000, 0.7)


async def test_report_compares_the_lanes(db_url: str, tmp_path: Path) -> None:
    tasks = (
        [chat_task(f"b{i}") for i in range(6)]
        + [chat_task(f"s{i}", lane="sync") for i in range(4)]
        + [chat_task("s-bad", lane="sync", emulate="http_400")]
    )
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": tasks})
        await h.drain_sync()
        await h.run_until_settled()
        status, report = await h.get("/v1/report/daily")
        assert status == 200
        lanes = report["lanes"]
        price = PriceTable.load().lookup("gpt-4o-mini")
        one = tokens_from_usage(usage_for("/v1/chat/completions", tasks[0]["body"]))
        assert lanes["batch"]["finished"] == 6 and lanes["batch"]["failed"] == 0
        assert lanes["sync"]["finished"] == 5 and lanes["sync"]["failed"] == 1
        assert lanes["sync"]["failure_ratio"] == 0.2
        assert Decimal(lanes["batch"]["cost_per_task_usd"]) == round_usd(cost(one, price.batch))
        # Exact amounts, each total rounded once where it is shown.
        assert Decimal(lanes["sync"]["spend_usd"]) == round_usd(4 * cost(one, price.sync))
        assert lanes["batch"]["latency_p95_seconds"] >= lanes["batch"]["latency_p50_seconds"]
        assert Decimal(report["savings_usd"]) == round_usd(
            6 * cost(one, price.sync) - 6 * cost(one, price.batch)
        )
