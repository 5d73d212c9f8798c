"""A budget that gets used: real token counts, partial windows, calibration."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from batchd import metrics
from batchd.contract import parse_task
from batchd.emulator.openai_lines import tokens_for, usage_for
from batchd.errors import ConfigError
from batchd.prices import PriceTable, cost, tokens_from_usage
from batchd.tokens import count_input_tokens
from tests.harness import FakeClock, Harness, chat_task, running

CHAT = "/v1/chat/completions"
_WORDS = (
    "the printer is on fire again and the ticket says so clearly while billing "
    "asks whether invoices from last quarter match the ledger entries we exported"
).split()


def _prompt(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(_WORDS))
    return " ".join(words)[:chars]


def _tasks(
    prefix: str, n: int, model: str = "gpt-4o-mini", chars: int = 4000, seed: int = 1
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        t = chat_task(f"{prefix}{i:03d}", model, content=_prompt(rng, chars))
        t["body"]["max_tokens"] = 200
        tasks.append(t)
    return tasks


def _true_cost(tasks: list[dict[str, Any]], table: PriceTable | None = None) -> Decimal:
    table = table or PriceTable.load()
    return sum(
        (
            cost(
                tokens_from_usage(usage_for(CHAT, t["body"])),
                table.lookup(t["body"]["model"]).batch,
            )
            for t in tasks
        ),
        Decimal(0),
    )


async def _spent(h: Harness) -> Decimal:
    return Decimal(
        await h.scalar("SELECT coalesce(sum(coalesce(cost_usd, reserved_usd)), 0) FROM batches")
    )


async def _run_until_held(h: Harness, cap: Decimal) -> None:
    """Flush and route until a flush sends nothing, checking the cap at every step."""
    for _ in range(30):
        await h.service.scheduler.tick()
        await h.service.scheduler.wait_sends()
        assert await _spent(h) <= cap  # reserved + settled, never past the cap
        await h.make_polls_due()
        await h.service.poller.tick()
        h.service.scheduler._held.clear()  # look again at once, not in a minute
        if await h.live_batches() == 0 and await h.service.scheduler.tick() == 0:
            return
        await h.service.scheduler.wait_sends()
    raise AssertionError("the budget never settled into a hold")


async def test_a_budget_is_used_to_at_least_90_percent_and_never_passed(
    db_url: str, tmp_path: Path
) -> None:
    windows = [_tasks(f"w{k}-", 20, seed=k) for k in range(3)]
    one_batch = _true_cost(windows[0])
    cap = (one_batch * Decimal("1.75")).quantize(Decimal("0.000001"))
    # What the old byte rule (two bytes a token) reserved for the same window:
    # more than the whole cap, so no batch would ever have gone.
    old = PriceTable.load().reservation(
        "gpt-4o-mini",
        sum(parse_task(t, 0).est_input_tokens for t in windows[0]),
        sum(parse_task(t, 0).est_output_tokens for t in windows[0]),
        sync=False,
    )
    assert old > cap
    clock = FakeClock()
    async with running(
        db_url, tmp_path, clock=clock, daily_budget_usd=str(cap), max_batch_items=20
    ) as h:
        for tasks in windows:
            assert (await h.post({"tasks": tasks}))[0] == 202
        await h.age_queue(3600)
        with capture_logs() as logs:
            await _run_until_held(h, cap)
        batches = await h.rows(
            "SELECT item_count, reserved_usd, cost_usd FROM batches ORDER BY created_at"
        )
        spent = sum((b["cost_usd"] for b in batches), Decimal(0))
        print(
            f"budget: cap {cap} USD, spent {spent} USD ({spent / cap:.1%}) in batches of "
            f"{[b['item_count'] for b in batches]} tasks before holding"
        )
        assert spent <= cap
        assert spent >= cap * Decimal("0.9"), (spent, cap, batches)
        # Sent oldest first: a whole window, then the part of the next that fit.
        assert batches[0]["item_count"] == 20
        assert any(b["item_count"] < 20 for b in batches[1:]), batches
        assert [e for e in logs if e["event"] == "budget.partial"]
        held = await h.queued()
        assert held > 0 and held + sum(b["item_count"] for b in batches) == 60
        # Each reservation stood above what the batch then cost, by the margin.
        for b in batches:
            assert b["cost_usd"] <= b["reserved_usd"] <= b["cost_usd"] * Decimal("1.06"), b
        # The next UTC day the held tasks go, oldest first.
        clock.now += timedelta(days=1)
        await h.run_until_settled()
        assert await h.count("state = 'succeeded'") == 60


async def test_a_model_without_a_tokenizer_is_estimated_from_usage_seen(
    db_url: str, tmp_path: Path
) -> None:
    prices = {
        "as_of": "2026-12-01",
        "models": {
            "gpt-4o-mini": {
                "sync": {"input": 0.15, "cached_input": 0.075, "output": 0.6},
                "batch": {"input": 0.075, "cached_input": 0.0375, "output": 0.3},
            },
            "house-model": {
                "sync": {"input": 1.1, "cached_input": 0.55, "output": 4.4},
                "batch": {"input": 0.55, "cached_input": 0.275, "output": 2.2},
            },
        },
    }
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(prices))
    model = "house-model"
    assert count_input_tokens(CHAT, model, {"model": model, "messages": []}) is None
    rng = random.Random(7)
    lengths = [rng.randint(200, 6000) for _ in range(60)]

    def batch(prefix: str, sizes: list[int]) -> list[dict[str, Any]]:
        return [
            chat_task(f"{prefix}{i:03d}", model, content=_prompt(rng, n))
            for i, n in enumerate(sizes)
        ]

    def error(tasks: list[dict[str, Any]], reserved: dict[str, int]) -> float:
        billed = sum(tokens_for(CHAT, t["body"])[0] for t in tasks)
        return (sum(reserved[t["custom_id"]] for t in tasks) - billed) / billed

    async with running(
        db_url, tmp_path, prices_file=path, daily_budget_usd="100", max_batch_items=20
    ) as h:
        calibration = h.service.calibration
        fresh = batch("fresh", lengths[40:])
        before = {
            t["custom_id"]: calibration.reserved_input(model, parse_task(t, 0).est_input_tokens)
            for t in fresh
        }
        for k in range(2):
            await h.post({"tasks": batch(f"seen{k}-", lengths[20 * k : 20 * (k + 1)])})
            await h.age_queue(3600)
            await h.cycle()
        factor = calibration.factor(model)
        after = {
            t["custom_id"]: calibration.reserved_input(model, parse_task(t, 0).est_input_tokens)
            for t in fresh
        }
        before_error, after_error = error(fresh, before), error(fresh, after)
        print(
            f"calibration: factor {factor:.4f}; reserved input against billed for 20 "
            f"unseen tasks: byte rule {before_error:+.1%}, calibrated {after_error:+.1%}"
        )
        # The byte rule alone reserves about twice what is billed; calibrated,
        # the reservation stays above the bill by about the margin.
        assert before_error > 0.8
        assert 0 <= after_error <= 0.12, after_error


async def test_a_client_past_its_own_cap_waits_while_others_go_on(
    db_url: str, tmp_path: Path
) -> None:
    billing = _tasks("bill-", 6, seed=3)
    search = _tasks("srch-", 6, seed=4)
    one = _true_cost(billing[:1])
    # billing may spend about two of its tasks today; search has no cap of its
    # own; the global budget leaves room for everything.
    cap = (one * Decimal("2.5")).quantize(Decimal("0.000001"))
    clock = FakeClock()
    async with running(
        db_url,
        tmp_path,
        clock=clock,
        daily_budget_usd="10",
        client_budgets=f"billing={cap}",
        ingest_tokens="billing=tok-b,search=tok-s",
    ) as h:
        for tasks, token in ((billing, "tok-b"), (search, "tok-s")):
            status, _ = await h.post({"tasks": tasks}, headers={"Authorization": f"Bearer {token}"})
            assert status == 202
        sync_b = chat_task("bill-sync", lane="sync")
        assert (await h.post(sync_b, headers={"Authorization": "Bearer tok-b"}))[0] == 202
        await h.age_queue(3600)
        await h.service.sync_lane.tick()
        await h.service.sync_lane.wait_calls()
        await h.cycle()
        states = {
            r["custom_id"]: r["state"] for r in await h.rows("SELECT custom_id, state FROM tasks")
        }
        assert all(states[t["custom_id"]] == "succeeded" for t in search)  # others go on
        done = [t for t in billing if states[t["custom_id"]] == "succeeded"]
        assert 1 <= len(done) <= 2 and states[billing[-1]["custom_id"]] == "queued"
        spent = Decimal(
            await h.scalar(
                "SELECT sum(reserved_usd + cost_usd) FROM client_spend WHERE client = 'billing'"
            )
        )
        assert spent <= cap
        # The ledger's cost is the billing results' exact cost.
        paid = Decimal(
            await h.scalar(
                "SELECT sum(r.cost_usd) FROM results r JOIN tasks t ON t.custom_id = r.custom_id "
                "WHERE t.client = 'billing'"
            )
        )
        assert spent == paid
        await h.service.snapshot()

        assert metrics.REGISTRY.get_sample_value(
            "batchd_client_budget_limit_dollars", {"client": "billing"}
        ) == float(cap)
        assert metrics.REGISTRY.get_sample_value(
            "batchd_client_budget_spent_dollars", {"client": "billing"}
        ) == float(spent)
        # The next UTC day billing's held tasks go.
        clock.now += timedelta(days=1)
        for _ in range(5):
            await h.age_queue(3600)
            await h.service.sync_lane.tick()
            await h.service.sync_lane.wait_calls()
            await h.cycle()
        assert await h.count("client = 'billing' AND state = 'succeeded'") >= len(done) + 1


async def test_a_client_budget_for_no_configured_client_stops_the_start(
    db_url: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="BATCHD_CLIENT_BUDGETS: 'ghost' is no client"):
        async with running(
            db_url, tmp_path, client_budgets="ghost=1", ingest_tokens="billing=tok-b"
        ):
            pass
