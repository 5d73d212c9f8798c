"""Cost you can trust: the daily budget, the report's numbers, the archive, replay."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from batchd.prices import PriceTable, cost, round_usd, tokens_from_usage
from batchd.provider.emulator_lines import usage_for
from tests.harness import FakeClock, chat_task, running

ROOT = Path(__file__).resolve().parents[2]


def _expected_costs(tasks: list[dict[str, Any]]) -> tuple[Decimal, Decimal]:
    table = PriceTable.load()
    spend = sync = Decimal(0)
    for t in tasks:
        tokens = tokens_from_usage(usage_for("/v1/chat/completions", t["body"]))
        price = table.lookup(t["body"]["model"])
        spend += cost(tokens, price.batch)
        sync += cost(tokens, price.sync)
    return spend, sync


async def test_budget_holds_a_window_until_the_next_day(db_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    # One task's high-side estimate (4096 output tokens at gpt-4o batch price) is
    # about $0.02; a $0.03 cap admits one batch of one task, not two.
    async with running(db_url, tmp_path, clock=clock, daily_budget_usd="0.03",
                       max_batch_items=1) as h:
        tasks = [chat_task(f"b{i}", "gpt-4o") for i in range(3)]
        for t in tasks:
            t["body"]["max_tokens"] = 4096
        await h.post({"tasks": tasks})
        await h.age_queue(901)
        await h.cycle()
        assert await h.count("true", "batches") == 1
        assert await h.queued() == 2  # held back, not dropped
        spent = await h.scalar("SELECT sum(coalesce(cost_usd, reserved_usd)) FROM batches")
        assert Decimal(spent) <= Decimal("0.03")
        reserved = await h.scalar("SELECT reserved_usd FROM batches")
        actual = await h.scalar("SELECT cost_usd FROM batches")
        assert Decimal(actual) <= Decimal(reserved)  # the estimate is on the high side

        clock.now += timedelta(days=1)
        await h.cycle()
        assert await h.count("true", "batches") == 2
        days = await h.rows("SELECT spend_day, count(*) AS n FROM batches GROUP BY spend_day "
                            "ORDER BY spend_day")
        assert [d["n"] for d in days] == [1, 1]
        assert days[1]["spend_day"] == clock.now.date()


async def test_raising_the_budget_releases_held_work(db_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with running(db_url, tmp_path, clock=clock, daily_budget_usd="0.000001") as h:
        await h.post(chat_task("held"))
        await h.age_queue(901)
        assert await h.flush() == 0
        assert await h.queued() == 1
        h.service.scheduler.settings = h.settings.model_copy(
            update={"daily_budget_usd": Decimal("10")})
        clock.now += timedelta(seconds=61)  # the hold is looked at again each minute
        assert await h.flush() == 1


async def test_report_matches_a_scripted_run_to_the_micro_dollar(
        db_url: str, tmp_path: Path) -> None:
    ok = [chat_task(f"ok{i}", content="word " * (i + 1)) for i in range(20)]
    ok += [chat_task(f"mini{i}", "gpt-4.1-nano") for i in range(5)]
    for i, t in enumerate(ok):
        t["body"]["max_tokens"] = 7 + i
    retried = [chat_task("flaky", emulate="http_500*1")]
    failed = [chat_task("bad", emulate="http_400")]
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": ok + retried + failed})
        await h.run_until_settled()
        status, report = await h.get("/v1/report/daily")
        assert status == 200
        spend, sync = _expected_costs(ok + retried)
        assert report["tasks_in"] == 27
        assert (report["succeeded"], report["failed"], report["retried"]) == (26, 1, 1)
        assert report["manual_queue"] == 1 and report["replayed"] == 0
        assert report["failure_ratio"] == round(1 / 27, 6)
        assert report["alert"] is True  # 3.7% > 3%
        assert Decimal(report["spend_usd"]) == round_usd(spend)
        assert Decimal(report["sync_equivalent_usd"]) == round_usd(sync)
        assert Decimal(report["savings_usd"]) == round_usd(sync - spend)
        batch_total = await h.scalar("SELECT sum(cost_usd) FROM batches")
        result_total = await h.scalar("SELECT sum(cost_usd) FROM results")
        assert Decimal(batch_total) == Decimal(result_total) == spend


async def test_archive_holds_exactly_what_the_provider_received(
        db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task(f"a{i}", emulate="http_500*1" if i == 0 else None)
                                for i in range(5)]})
        await h.run_until_settled()
        batches = await h.rows("SELECT id, input_file_id, output_file_id, error_file_id, "
                               "spend_day FROM batches ORDER BY created_at")
        assert len(batches) == 2
        for b in batches:
            folder = h.service.archive.batch_dir(b["spend_day"], b["id"])
            sent = gzip.decompress((folder / "input.jsonl.gz").read_bytes())
            assert sent == bytes(h.emulator.received_files[b["input_file_id"]])
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["files"]["input"]["provider_file_id"] == b["input_file_id"]
            assert (folder / "output.jsonl.gz").exists() == bool(b["output_file_id"])
            assert (folder / "error.jsonl.gz").exists() == bool(b["error_file_id"])
        assert list((h.settings.spool_path).glob("*.jsonl")) == []


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATCHD_DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-m", "batchd", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


async def test_failed_task_goes_back_to_success_with_the_cli_alone(
        db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        h.emulator.script_line("phoenix", "http_404", "ok")
        await h.post(chat_task("phoenix"))
        await h.run_until_settled()
        assert (await h.task("phoenix"))["state"] == "failed"

        export = tmp_path / "failed.jsonl"
        done = _cli(db_url, "failed", "export", "--out", str(export))
        assert done.returncode == 0, done.stderr
        row = json.loads(export.read_text())
        assert row["custom_id"] == "phoenix" and row["last_error"]["status"] == 404
        assert row["body"]["model"] == "gpt-4o-mini"

        new_input = tmp_path / "replay.jsonl"
        done = _cli(db_url, "replay", "--failed", str(export), "--out", str(new_input))
        assert done.returncode == 0, done.stderr
        line = json.loads(new_input.read_text())
        assert (line["custom_id"], line["method"], line["url"]) == (
            "phoenix", "POST", "/v1/chat/completions")

        done = _cli(db_url, "replay", "--failed", str(export), "--submit")
        assert done.returncode == 0 and "re-queued 1" in done.stdout, done.stderr
        again = _cli(db_url, "replay", "--failed", str(export), "--submit")
        assert "re-queued 0" in again.stdout and "already queued" in again.stdout

        await h.run_until_settled()
        task = await h.task("phoenix")
        assert (task["state"], task["replay_count"], task["attempts"]) == ("succeeded", 1, 1)
        result = await h.rows("SELECT replay_count FROM results WHERE custom_id = 'phoenix'")
        assert result == [{"replay_count": 1}]
        after = _cli(db_url, "replay", "--failed", str(export), "--submit")
        assert "already succeeded" in after.stdout

        report = _cli(db_url, "report", "--format", "json")
        day = json.loads(report.stdout)
        assert day["replayed"] == 1 and day["manual_queue"] == 0
        assert day["post_replay_success_ratio"] == 1.0


async def test_replay_api_filters_and_explains(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task("x1", emulate="http_404"),
                                chat_task("x2", emulate="http_404"), chat_task("fine")]})
        await h.run_until_settled()
        status, page = await h.get("/v1/failed", reason="model_not_found")
        assert status == 200 and {r["custom_id"] for r in page["failed"]} == {"x1", "x2"}
        status, page = await h.get("/v1/failed", reason="other")
        assert page["failed"] == []
        async with h.http.post(f"{h.base_url}/v1/failed/replay",
                               json={"custom_ids": ["x1", "fine", "nobody"]}) as r:
            body = await r.json()
        assert body["replayed"] == 1 and body["custom_ids"] == ["x1"]
        reasons = {s["custom_id"]: s["reason"] for s in body["skipped"]}
        assert "already succeeded" in reasons["fine"] and reasons["nobody"] == "unknown custom_id"
        async with h.http.post(f"{h.base_url}/v1/failed/replay", json={}) as r:
            assert r.status == 400


async def test_report_cli_renders_table_and_csv(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("r1"))
        await h.run_until_settled()
    table = _cli(db_url, "report", "--days", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith("date") and len(lines) == 4
    csv_out = _cli(db_url, "report", "--format", "csv")
    header, row = csv_out.stdout.splitlines()
    assert header.startswith("date,tasks_in,succeeded,failed")
    assert row.split(",")[1:4] == ["1", "1", "0"]
    bad = _cli(db_url, "report", "--days", "0")
    assert bad.returncode == 2 and "--days" in bad.stderr
