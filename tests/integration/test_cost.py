"""Cost you can trust: the daily budget, the report's numbers, the archive, replay."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from batchd import metrics
from batchd.domain import line_id
from batchd.emulator.openai_lines import SUCCESS_OUTCOMES, usage_for
from batchd.errors import ConfigError
from batchd.prices import PriceTable, Tokens, cost, round_usd, tokens_from_usage
from batchd.report import FIELDS
from batchd.scheduler import SchedulerConfig
from batchd.store.engine import make_engine
from batchd.store.routing import stage_lines, store_staged_successes
from batchd.store.spend import day_spend
from tests.harness import FakeClock, chat_task, running

ROOT = Path(__file__).resolve().parents[2]


async def test_budget_holds_a_window_until_the_next_day(db_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    # One task's high-side estimate (4096 output tokens at gpt-4o batch price) is
    # about $0.02; a $0.03 cap admits one batch of one task, not two.
    async with running(
        db_url, tmp_path, clock=clock, daily_budget_usd="0.03", max_batch_items=1
    ) as h:
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
        days = await h.rows(
            "SELECT spend_day, count(*) AS n FROM batches GROUP BY spend_day ORDER BY spend_day"
        )
        assert [d["n"] for d in days] == [1, 1]
        assert days[1]["spend_day"] == clock.now.date()


async def test_raising_the_budget_releases_held_work(db_url: str, tmp_path: Path) -> None:
    clock = FakeClock()
    async with running(db_url, tmp_path, clock=clock, daily_budget_usd="0.000001") as h:
        await h.post(chat_task("held"))
        await h.age_queue(901)
        assert await h.flush() == 0
        assert await h.queued() == 1
        h.service.scheduler.config = SchedulerConfig.from_settings(
            h.settings.model_copy(update={"daily_budget_usd": Decimal("10")})
        )
        clock.now += timedelta(seconds=61)  # the hold is looked at again each minute
        assert await h.flush() == 1


def _exact(task: dict[str, Any], kind: str = "batch") -> Decimal:
    """What one 200 answer to ``task`` costs, unrounded (the emulator's usage rule)."""
    tokens = tokens_from_usage(usage_for("/v1/chat/completions", task["body"]))
    price = PriceTable.load().lookup(task["body"]["model"])
    return cost(tokens, price.batch if kind == "batch" else price.sync)


def _batch(
    results: Sequence[dict[str, Any]], extra: Sequence[dict[str, Any]] = ()
) -> dict[str, Decimal]:
    """A batch's known money, exact: its results, plus billed lines no result carries."""
    attributed = sum((_exact(t) for t in results), Decimal(0))
    total = sum((_exact(t) for t in [*results, *extra]), Decimal(0))
    sync = sum((_exact(t, "sync") for t in results), Decimal(0))
    return {"spend": total, "sync": sync, "unattributed": total - attributed}


def _sync_call(task: dict[str, Any]) -> dict[str, Decimal]:
    """A synchronous call's money: paid and equivalent at the sync price."""
    paid = _exact(task, "sync")
    return {"spend": paid, "sync": paid, "unattributed": Decimal(0)}


def _day_money(*batches: dict[str, Decimal]) -> dict[str, str]:
    """The report's money for a day: the exact sums, each rounded once."""
    spend = sum((b["spend"] for b in batches), Decimal(0))
    sync = sum((b["sync"] for b in batches), Decimal(0))
    return {
        "spend_usd": str(round_usd(spend)),
        "sync_equivalent_usd": str(round_usd(sync)),
        "savings_usd": str(round_usd(sync - spend)),
        "unattributed_usd": str(round_usd(sum((b["unattributed"] for b in batches), Decimal(0)))),
    }


async def _shift_a_day_back(h: Any) -> None:
    """Move everything recorded so far to yesterday (UTC), as if it had run then."""
    for table, column in (
        ("tasks", "created_at"),
        ("tasks", "finished_at"),
        ("task_events", "created_at"),
        ("results", "created_at"),
        ("batches", "routed_at"),
        ("sync_spend", "settled_at"),
    ):
        await h.execute(f"UPDATE {table} SET {column} = {column} - interval '1 day'")


def _billed_by_emulator(h: Any) -> Decimal:
    """What the emulator billed so far, line by line: every line it answered
    200 in a finished batch (a duplicate line twice, an unreadable one too)
    at the batch price, every synchronous answer at the sync price."""
    table = PriceTable.load()
    total = Decimal(0)
    for b in h.emulator.batches.values():
        if b.usage is None:
            continue
        for plan in b.lines:
            if plan.outcome in SUCCESS_OUTCOMES:
                copies = 2 if plan.outcome == "duplicate" else 1
                total += copies * cost(Tokens(*plan.tokens), table.lookup(plan.model).batch)
    return total + sum(
        (
            cost(Tokens(*tokens), table.lookup(model).sync)
            for model, tokens in h.emulator.billed_sync
        ),
        Decimal(0),
    )


def _money_counters() -> dict[tuple[str, str], Decimal]:
    return {
        (m, lane): metrics.SPEND.exact(provider="openai", model=m, lane=lane)
        for m in ("gpt-4o-mini", "gpt-4.1-nano")
        for lane in ("batch", "sync")
    }


async def test_report_matches_a_scripted_two_day_run_to_the_micro_dollar(
    db_url: str, tmp_path: Path
) -> None:
    # Costs are fractions of a micro-dollar per line, so any rounding before
    # the day's total shows: the report, the API and the metrics must equal
    # the exact sum of what the emulator billed, rounded once.
    mini = [chat_task(f"ok{i}", content="word " * (i + 1)) for i in range(20)]
    for i, t in enumerate(mini):
        t["body"]["max_tokens"] = 7 + i
        if i % 4 == 0:
            t["body"]["metadata"] = {"cached_tokens": str(i + 2)}
    nano = [chat_task(f"nano{i}", "gpt-4.1-nano", content="x" * (10 * i + 1)) for i in range(5)]
    dup = chat_task("dup", "gpt-4.1-nano", emulate="duplicate")  # its line comes twice
    flaky = chat_task("flaky", emulate="http_500*1")  # retried once
    garbled = chat_task("garbled", emulate="malformed*1")  # billed, unreadable, retried
    bad = chat_task("bad", emulate="http_400")  # final: stays in the manual queue
    # Fails final (404 on its first submission), replayed the next day, succeeds.
    phoenix = chat_task("phoenix", emulate="http_404*1")
    rush1 = chat_task("rush1", content="now " * 13, lane="sync")  # the sync lane, day 1
    rush2 = chat_task("rush2", content="again " * 7, lane="sync")  # and day 2
    counters_before = _money_counters()
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [*mini, *nano, dup, flaky, garbled, bad, phoenix, rush1]})
        with capture_logs() as logs:
            await h.drain_sync()
            await h.run_until_settled()
        billed_day1 = _billed_by_emulator(h)
        # The emulator's batch usage counts the duplicate once, its lines twice:
        # billed as the larger count, and said so. The garbled line is an
        # expected gap (the batch reports more than its readable lines).
        mismatches = [e for e in logs if e["event"] == "batch.usage_mismatch"]
        assert len(mismatches) == 1
        assert mismatches[0]["lines"]["input"] > mismatches[0]["reported"]["input"]
        await _shift_a_day_back(h)
        async with h.http.post(
            f"{h.base_url}/v1/failed/replay", json={"custom_ids": ["phoenix"]}
        ) as r:
            assert (await r.json())["replayed"] == 1
        await h.post(rush2)
        await h.drain_sync()
        await h.run_until_settled()
        billed_day2 = _billed_by_emulator(h) - billed_day1

        # The batches: mini and nano windows, the retry window, the replay.
        first_mini = _batch(mini, extra=[garbled])  # the unreadable line is billed
        first_nano = _batch([*nano, dup], extra=[dup])  # so is the duplicate
        retry = _batch([flaky, garbled])
        replay = _batch([phoenix])
        costs = sorted(
            [
                (Decimal(b["cost_usd"]), Decimal(b["unattributed_cost_usd"]))
                for b in await h.rows("SELECT cost_usd, unattributed_cost_usd FROM batches")
            ]
        )
        assert costs == sorted(
            (b["spend"], b["unattributed"]) for b in (first_mini, first_nano, retry, replay)
        )

        today = datetime.now(UTC).date()
        yesterday = today - timedelta(days=1)
        status, days = await h.get("/v1/report/daily", date=today.isoformat(), days="2")
        assert status == 200
        past, now = days
        assert past == {
            **past,
            "date": yesterday.isoformat(),
            "tasks_in": 31,
            "succeeded": 29,
            "failed": 2,
            "cancelled": 0,
            "retried": 2,
            "replayed": 0,
            "failure_ratio": round(2 / 31, 6),
            "manual_queue": 2,  # bad and phoenix, as the day ended
            # All 31 finished that day; 30 have succeeded since (phoenix by replay).
            "post_replay_success_ratio": round(30 / 31, 6),
            **_day_money(first_mini, first_nano, retry, _sync_call(rush1)),
            "unpriced_models": [],
            "alert": True,
        }
        assert now == {
            **now,
            "date": today.isoformat(),
            "tasks_in": 1,
            "succeeded": 2,
            "failed": 0,
            "retried": 0,
            "replayed": 1,
            "failure_ratio": 0.0,
            "manual_queue": 1,
            "post_replay_success_ratio": 1.0,
            **_day_money(replay, _sync_call(rush2)),
            "alert": False,
        }
        assert Decimal(past["unattributed_usd"]) > 0
        # Against what the emulator itself billed (its batches' usage, which
        # counts the duplicate and the unreadable lines, and its sync answers),
        # to the micro-dollar, day by day.
        for day, billed in ((past, billed_day1), (now, billed_day2)):
            assert day["spend_usd"] == str(round_usd(billed))

        # Per result: its exact cost, shown rounded; the exact costs add up
        # with the unattributed part to their batch's cost exactly.
        exact = {t["custom_id"]: _exact(t) for t in [*mini, *nano, dup, flaky, garbled, phoenix]}
        exact |= {t["custom_id"]: _exact(t, "sync") for t in (rush1, rush2)}
        results: list[dict[str, Any]] = []
        after = "0"
        while True:
            _, page = await h.get("/v1/results", after=after, limit="7")
            results += page["results"]
            after = page["next"]
            if not page["has_more"]:
                break
        assert len(results) == 31
        for row in results:
            assert row["cost_usd"] == str(round_usd(exact[row["custom_id"]]))
        stored = await h.rows("SELECT custom_id, cost_usd FROM results")
        assert {r["custom_id"]: r["cost_usd"] for r in stored} == exact
        ledger = await h.rows("""
            SELECT b.cost_usd, b.unattributed_cost_usd, sum(r.cost_usd) AS results
            FROM batches b JOIN results r ON r.batch_id = b.id GROUP BY b.id""")
        for b in ledger:
            assert b["results"] + b["unattributed_cost_usd"] == b["cost_usd"]
        paid = Decimal(await h.scalar("SELECT sum(cost_usd) FROM results")) + Decimal(
            await h.scalar("SELECT sum(unattributed_cost_usd) FROM batches")
        )
        every_line = sum(
            (_exact(t) for t in [*mini, *nano, dup, dup, flaky, garbled, garbled, phoenix]),
            Decimal(0),
        )
        assert paid == every_line + _exact(rush1, "sync") + _exact(rush2, "sync")
        assert paid == billed_day1 + billed_day2

        # The spend counters grew by the same exact amounts, and what a
        # scrape shows is that total, rounded once.
        counters_after = _money_counters()
        grown = {k: counters_after[k] - counters_before[k] for k in counters_after}
        assert grown[("gpt-4o-mini", "batch")] == sum(
            (_exact(t) for t in [*mini, flaky, garbled, garbled, phoenix]), Decimal(0)
        )
        assert grown[("gpt-4.1-nano", "batch")] == sum(
            (_exact(t) for t in [*nano, dup, dup]), Decimal(0)
        )
        assert grown[("gpt-4o-mini", "sync")] == _exact(rush1, "sync") + _exact(rush2, "sync")
        for (model, lane), total in counters_after.items():
            shown = metrics.REGISTRY.get_sample_value(
                "batchd_spend_dollars_total", {"provider": "openai", "model": model, "lane": lane}
            )
            assert shown is not None and round_usd(Decimal(repr(shown))) == round_usd(total)

    # The command line says the same as the API, in each format.
    as_json = json.loads(_cli(db_url, "report", "--days", "2", "--format", "json").stdout)
    assert as_json == days
    csv_rows = list(
        csv.DictReader(io.StringIO(_cli(db_url, "report", "--days", "2", "--format", "csv").stdout))
    )
    for row, day in zip(csv_rows, days, strict=True):
        assert row == {
            k: (";".join(v) if isinstance(v, list) else str(v)) for k, v in day.items() if k in row
        }
        assert set(row) == set(FIELDS)
    table = _cli(db_url, "report", "--days", "2").stdout.splitlines()
    for line, day in zip(table[2:4], days, strict=True):
        cells = line.split()
        assert cells == [
            day["date"],
            *(
                str(day[k])
                for k in ("tasks_in", "succeeded", "failed", "cancelled", "retried", "replayed")
            ),
            f"{day['failure_ratio'] * 100:.2f}",
            f"{day['post_replay_success_ratio'] * 100:.2f}",
            str(day["manual_queue"]),
            day["spend_usd"],
            day["sync_equivalent_usd"],
            day["savings_usd"],
            *(["ALERT"] if day["alert"] else []),
        ]


@pytest.mark.parametrize(
    "exact",
    [
        ["0.0000004", "0.0000007", "0.0000001"],
        ["0.0000005", "0.0000005", "0.0000005"],
        ["0.123456789012", "0.000000499999", "0.000000000001"],
        [],
    ],
)
async def test_result_costs_are_stored_exact_and_add_up(db_url: str, exact: list[str]) -> None:
    """Through the router's own staging and settling statements: each result
    keeps its line's exact cost (whole 1e-12 USD), so results add up to the
    exact total, and routing again stores nothing."""
    engine = make_engine(db_url, pool_size=1)
    ids: dict[str, int] = {}
    try:
        async with engine.begin() as conn:
            for cid, batch in [
                *((f"r{n}", "bd_t") for n in range(len(exact))),
                ("other", "bd_other"),
            ]:
                ids[cid] = (
                    await conn.execute(
                        text(
                            "INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, "
                            "line_bytes, state, batch_id) VALUES (:cid, '/v1/chat/completions', "
                            "'gpt-4o-mini', '{}', 'd', 2, 'submitted', :bid) RETURNING id"
                        ),
                        {"cid": cid, "bid": batch},
                    )
                ).scalar_one()
        rows = [
            (
                n + 1,
                ids[f"r{n}"],
                line_id(ids[f"r{n}"], 0, 1),
                True,
                200,
                "{}",
                None,
                0,
                0,
                0,
                0,
                Decimal(usd),
                Decimal(usd) * 2,
                None,
                None,
                None,
            )
            for n, usd in enumerate(exact)
        ]
        # Its task is not in this batch: stores nothing.
        rows.append(
            (
                len(rows) + 1,
                ids["other"],
                line_id(ids["other"], 0, 1),
                True,
                200,
                "{}",
                None,
                0,
                0,
                0,
                0,
                Decimal("0.4"),
                Decimal("0.8"),
                None,
                None,
                None,
            )
        )
        total = sum((Decimal(x) for x in exact), Decimal(0))
        for attempt in range(2):  # routed again, it changes nothing
            async with engine.begin() as conn:
                await stage_lines(conn, rows)
                stored = await store_staged_successes(conn, "bd_t", unpriced=False)
                got = (
                    await conn.execute(
                        text(
                            "SELECT cost_usd, sync_cost_usd FROM results WHERE batch_id = 'bd_t' "
                            "ORDER BY custom_id"
                        )
                    )
                ).all()
            assert [r[0] for r in got] == [Decimal(x) for x in exact]
            assert [r[1] for r in got] == [Decimal(x) * 2 for x in exact]
            if attempt == 0:
                assert stored.stored == len(exact)
                assert (stored.cost, stored.sync_cost) == (total, total * 2)
            else:
                assert stored.stored == 0
        async with engine.connect() as conn:
            assert (
                await conn.scalar(text("SELECT count(*) FROM results WHERE custom_id = 'other'"))
                == 0
            )
    finally:
        await engine.dispose()


def test_a_price_finer_than_the_ledger_keeps_is_refused(tmp_path: Path) -> None:
    """A price per 1M tokens with more than 6 decimal places (a file written
    from floats, say) would make costs the ledger cannot hold exactly."""
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "as_of": "2026-12-01",
                "models": {
                    "m": {
                        "sync": {
                            "input": 0.15000000000000002,
                            "cached_input": 0.075,
                            "output": 0.6,
                        },
                        "batch": {"input": 0.075, "cached_input": 0.0375, "output": 0.3},
                    }
                },
            }
        )
    )
    with pytest.raises(
        ConfigError,
        match=r"BATCHD_PRICES_FILE.*0\.15000000000000002 has "
        r"more than 6 decimal places.*e\.g\. 0\.15",
    ):
        PriceTable.load(path)
    path.write_text(
        json.dumps(
            {
                "as_of": "2026-12-01",
                "models": {
                    "m": {
                        "sync": {"input": 0.000001, "cached_input": 0.075, "output": 0.6},
                        "batch": {"input": 0.075, "cached_input": 0.0375, "output": 0.3},
                    }
                },
            }
        )
    )
    assert PriceTable.load(path).lookup("m").sync.input == Decimal("0.000001")


async def test_a_line_billed_after_its_task_left_for_the_sync_lane_is_spend(
    db_url: str, tmp_path: Path
) -> None:
    tight = chat_task("tight", content="urgent " * 30, metadata={"latency_profile": "1h"})
    relaxed = chat_task("relaxed", content="later " * 20)
    async with running(db_url, tmp_path, daily_budget_usd="5") as h:
        await h.post({"tasks": [tight, relaxed]})
        await h.age_queue(301)
        assert await h.flush() == 1
        await h.execute("UPDATE tasks SET fallback_at = now() WHERE custom_id = 'tight'")
        h.service.sync_lane._last_sweep = 0.0
        for _ in range(50):
            await h.service.sync_lane.tick()
            await h.service.sync_lane.wait_calls()
            if (await h.task("tight"))["state"] == "succeeded":
                break
        with capture_logs() as logs:
            await h.cycle()  # the batch comes back with both lines; tight's has no taker
        batch = (
            await h.rows(
                "SELECT cost_usd, unattributed_cost_usd, unattributed_lines, spend_day FROM batches"
            )
        )[0]
        expected = _batch([relaxed], extra=[tight])
        # The batch cost more than its one result would have synchronously: a
        # savings counter cannot go down, and the route still finishes.
        assert expected["sync"] < expected["spend"]
        assert [e for e in logs if e["event"] == "batch.routed"]
        assert not [e for e in logs if e.get("log_level") in ("error", "critical")]
        assert (batch["cost_usd"], batch["unattributed_cost_usd"]) == (
            expected["spend"],
            expected["unattributed"],
        )
        assert batch["unattributed_lines"] == 1 and expected["unattributed"] > 0
        sync_paid = _exact(tight, "sync")
        assert (await h.task("tight"))["cost_usd"] == str(round_usd(sync_paid))
        _, report = await h.get("/v1/report/daily")
        assert report["spend_usd"] == str(round_usd(expected["spend"] + sync_paid))
        assert report["unattributed_usd"] == str(round_usd(expected["unattributed"]))
        async with h.engine.connect() as conn:  # the budget counts both payments
            assert await day_spend(conn, batch["spend_day"]) == expected["spend"] + sync_paid


async def test_a_sync_call_answered_after_its_task_moved_on_is_spend(
    db_url: str, tmp_path: Path
) -> None:
    slow = chat_task("slow", lane="sync")
    async with running(db_url, tmp_path) as h:
        # The first call takes seconds; meanwhile its task is presumed lost with
        # its replica and goes back to the queue (the sweep's 15-minute rule,
        # met by back-dating the claim).
        h.emulator.inject("sync", "slow", seconds=4)
        await h.post(slow)
        lane = h.service.sync_lane
        lane._last_sweep = asyncio.get_running_loop().time()
        assert await lane.tick() == 1
        await h.execute("UPDATE tasks SET submitted_at = now() - interval '1 hour'")
        await lane.sweep()
        assert (await h.task("slow"))["state"] == "queued"
        await lane.wait_calls()  # answered and paid, but its task is no longer waiting
        assert await h.count("true", "results") == 0
        await h.expire_backoffs()
        assert await lane.tick() == 1
        await lane.wait_calls()
        assert (await h.task("slow"))["state"] == "succeeded"
        paid = _exact(slow, "sync")
        _, report = await h.get("/v1/report/daily")
        assert (report["spend_usd"], report["unattributed_usd"]) == (
            str(round_usd(2 * paid)),
            str(round_usd(paid)),
        )
        assert report["sync_equivalent_usd"] == str(round_usd(paid))
        assert report["savings_usd"] == str(round_usd(-paid))


async def test_an_unknown_model_is_priced_high_and_flagged_everywhere(
    db_url: str, tmp_path: Path
) -> None:
    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        sample("batchd_unpriced_results_total", lane="batch"),
        sample("batchd_unpriced_results_total", lane="sync"),
        sample("batchd_unpriced_estimates_total"),
    )
    # An operator lets models the prices file does not know yet have windows.
    async with running(
        db_url, tmp_path, daily_budget_usd="5", allowed_models="brand-new-*,other-new-*"
    ) as h:
        await h.post(
            {
                "tasks": [
                    chat_task("mystery", "brand-new-model"),
                    chat_task("rushed", "other-new-model", lane="sync"),
                    chat_task("known"),
                ]
            }
        )
        for _ in range(50):
            await h.service.sync_lane.tick()
            await h.service.sync_lane.wait_calls()
            if (await h.task("rushed"))["state"] == "succeeded":
                break
        await h.run_until_settled()
        table = PriceTable.load()
        fallback = table.lookup("brand-new-model")
        mystery = await h.task("mystery")
        assert mystery["unpriced"] is True and (await h.task("known"))["unpriced"] is False
        tokens = tokens_from_usage(
            usage_for("/v1/chat/completions", chat_task("m", "brand-new-model")["body"])
        )
        assert Decimal(mystery["cost_usd"]) == round_usd(cost(tokens, fallback.batch))
        assert cost(tokens, fallback.batch) > 0
        assert (await h.task("rushed"))["unpriced"] is True
        _, page = await h.get("/v1/results")
        assert {r["custom_id"]: r["unpriced"] for r in page["results"]} == {
            "mystery": True,
            "rushed": True,
            "known": False,
        }
        _, report = await h.get("/v1/report/daily")
        assert report["unpriced_models"] == ["brand-new-model", "other-new-model"]
        assert (
            await h.scalar("SELECT bool_and(unpriced) FROM batches WHERE model = 'brand-new-model'")
            is True
        )
    assert sample("batchd_unpriced_results_total", lane="batch") == before[0] + 1
    assert sample("batchd_unpriced_results_total", lane="sync") == before[1] + 1
    assert sample("batchd_unpriced_estimates_total") >= before[2] + 1
    csv_out = _cli(db_url, "report", "--format", "csv").stdout
    assert "brand-new-model;other-new-model" in csv_out
    table_out = _cli(db_url, "report").stdout
    assert "unpriced models" in table_out and "brand-new-model" in table_out


def _archived(h: Any, b: dict[str, Any], kind: str) -> bytes:
    folder = h.service.archive.batch_dir(b["spend_day"], b["id"])
    return gzip.decompress((folder / f"{kind}.jsonl.gz").read_bytes())


async def test_archive_holds_exactly_what_the_provider_received_and_served(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(
            {
                "tasks": [
                    chat_task(f"a{i}", emulate="http_500*1" if i == 0 else None) for i in range(5)
                ]
            }
        )
        await h.run_until_settled()
        batches = await h.rows(
            "SELECT id, input_file_id, output_file_id, error_file_id, "
            "spend_day FROM batches ORDER BY created_at"
        )
        assert len(batches) == 2 and batches[0]["error_file_id"] is not None
        for b in batches:
            assert _archived(h, b, "input") == bytes(h.emulator.received_files[b["input_file_id"]])
            for kind in ("output", "error"):
                folder = h.service.archive.batch_dir(b["spend_day"], b["id"])
                if b[f"{kind}_file_id"] is None:
                    assert not (folder / f"{kind}.jsonl.gz").exists()
                    continue
                served = h.emulator.files[b[f"{kind}_file_id"]].data
                assert served and _archived(h, b, kind) == served
            manifest = json.loads((folder / "manifest.json").read_text())
            assert manifest["files"]["input"]["provider_file_id"] == b["input_file_id"]
        assert list((h.settings.spool_path).glob("*.jsonl")) == []


@pytest.mark.parametrize("spool_lost", [False, True])
async def test_an_adopted_batch_keeps_its_input_in_the_archive(
    db_url: str, tmp_path: Path, spool_lost: bool
) -> None:
    async with running(db_url, tmp_path) as h:
        # The create call reaches the provider, the answer never comes back.
        h.emulator.inject("create", "reset_after")
        await h.post({"tasks": [chat_task(f"ad{i}") for i in range(3)]})
        await h.age_queue(901)
        await h.flush()
        assert await h.count("state = 'uploading'", "batches") == 1
        await h.execute("UPDATE batches SET lease_until = now() - interval '1 second'")
        if spool_lost:  # the pod that wrote it is gone: the lines are written again
            for left in h.settings.spool_path.glob("*.jsonl"):
                left.unlink()
        await h.flush()  # the retry finds the batch at the provider and adopts it
        b = (await h.rows("SELECT id, input_file_id, spend_day, state FROM batches"))[0]
        assert b["state"] == "submitted" and len(h.emulator.batches) == 1
        assert _archived(h, b, "input") == bytes(h.emulator.received_files[b["input_file_id"]])
        folder = h.service.archive.batch_dir(b["spend_day"], b["id"])
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["files"]["input"]["adopted"] is True
        assert manifest["files"]["input"]["rebuilt"] is spool_lost
        assert list((h.settings.spool_path).glob("*.jsonl")) == []


async def test_the_spool_sweep_archives_what_a_failed_write_left_behind(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("s1"))
        await h.run_until_settled()
        b = (await h.rows("SELECT id, spend_day FROM batches"))[0]
        folder = h.service.archive.batch_dir(b["spend_day"], b["id"])
        output = _archived(h, b, "output")
        (folder / "output.jsonl.gz").unlink()  # as if the archive write had failed
        left = h.service.archive.spool_path(b["id"], "output")
        left.write_bytes(output)
        assert await h.service.sweep_spool(60) == 0  # too fresh: its flow may be on it
        os.utime(left, (left.stat().st_atime - 120, left.stat().st_mtime - 120))
        assert await h.service.sweep_spool(60) == 1
        assert _archived(h, b, "output") == output and not left.exists()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["files"]["output"]["recovered"] is True


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATCHD_DATABASE_URL": db_url}
    return subprocess.run(
        [sys.executable, "-m", "batchd", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_failed_task_goes_back_to_success_with_the_cli_alone(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("phoenix", emulate="http_404*1"))
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
            "phoenix",
            "POST",
            "/v1/chat/completions",
        )

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
        await h.post(
            {
                "tasks": [
                    chat_task("x1", emulate="http_404"),
                    chat_task("x2", emulate="http_404"),
                    chat_task("fine"),
                ]
            }
        )
        await h.run_until_settled()
        status, page = await h.get("/v1/failed", reason="model_not_found")
        assert status == 200 and {r["custom_id"] for r in page["failed"]} == {"x1", "x2"}
        status, page = await h.get("/v1/failed", reason="other")
        assert page["failed"] == []
        async with h.http.post(
            f"{h.base_url}/v1/failed/replay", json={"custom_ids": ["x1", "fine", "nobody"]}
        ) as r:
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
