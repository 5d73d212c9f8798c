"""The sync lane counts like the batch lane: the daily budget and the metrics."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from structlog.testing import capture_logs

from batchd import metrics
from batchd.contract import parse_task
from batchd.emulator.openai_lines import usage_for
from batchd.estimates import Calibration
from batchd.prices import PriceTable, cost, tokens_from_usage
from batchd.tokens import count_input_tokens
from tests.harness import FakeClock, Harness, chat_task, running

TABLE = PriceTable.load()
PRICE = TABLE.lookup("gpt-4o-mini")


def _estimate(task: dict[str, object], sync: bool) -> Decimal:
    """What the budget reserves: with a budget set, the input is counted by
    the model's tokenizer and the stated margin added (batchd.estimates)."""
    t = parse_task(task, 0)
    counted = count_input_tokens(t.endpoint, t.model, t.body)
    assert counted is not None
    return TABLE.reservation(
        "gpt-4o-mini",
        Calibration().reserved_input(t.model, counted),
        t.est_output_tokens,
        sync=sync,
    )


def _actual(task: dict[str, object], sync: bool) -> Decimal:
    tokens = tokens_from_usage(usage_for("/v1/chat/completions", task["body"]))  # type: ignore[arg-type]
    # What one call, or a batch of one, is charged: its exact cost.
    return cost(tokens, PRICE.sync if sync else PRICE.batch)


async def _sync_round(h: Harness) -> int:
    started = await h.service.sync_lane.tick()
    await h.service.sync_lane.wait_calls()
    return started


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_sync_calls_count_against_the_daily_budget(db_url: str, tmp_path: Path) -> None:
    s1, s2 = chat_task("s1", lane="sync"), chat_task("s2", lane="sync")
    b1 = chat_task("b1")
    est_sync, paid = _estimate(s1, True), _actual(s1, True)
    est_batch = _estimate(b1, False)
    # One sync estimate fits; two do not; and once the first call is settled
    # at its real cost, what is left is too little for the batch's estimate.
    budget = est_sync + (paid + est_batch - est_sync) / 2
    assert est_sync < budget < 2 * est_sync and paid + est_batch > budget > est_batch
    assert paid + est_sync > budget
    clock = FakeClock()
    async with running(db_url, tmp_path, clock=clock, daily_budget_usd=str(budget)) as h:
        await h.post({"tasks": [s1, s2]})
        with capture_logs() as logs:
            assert await _sync_round(h) == 1
        holds = [e for e in logs if e["event"] == "budget.hold"]
        assert len(holds) == 1 and holds[0]["lane"] == "sync" and holds[0]["held_tasks"] == 1
        states = {
            r["custom_id"]: r["state"] for r in await h.rows("SELECT custom_id, state FROM tasks")
        }
        assert states == {"s1": "succeeded", "s2": "queued"}  # held back, not dropped

        ledger = await h.rows("SELECT custom_id, reserved_usd, cost_usd, spend_day FROM sync_spend")
        assert [(r["custom_id"], r["reserved_usd"], r["cost_usd"]) for r in ledger] == [
            ("s1", est_sync, paid)
        ]
        assert ledger[0]["spend_day"] == clock.now.date()
        assert await h.scalar("SELECT cost_usd FROM results WHERE custom_id = 's1'") == paid
        await h.service.snapshot()
        assert _sample("batchd_budget_spent_dollars") == float(paid)

        # The batch lane sees the sync lane's spend: the window is held.
        await h.post(b1)
        await h.age_queue(901)
        with capture_logs() as logs:
            assert await h.flush() == 0
        assert any(e["event"] == "budget.hold" for e in logs)
        h.service.sync_lane._hold_until = 0.0
        assert await _sync_round(h) == 0  # still no room for s2 today

        clock.now += timedelta(days=1)
        h.service.sync_lane._hold_until = 0.0
        assert await _sync_round(h) == 1
        assert (await h.task("s2"))["state"] == "succeeded"
        assert await h.count("true", "sync_spend") == 2


async def test_a_sync_call_without_an_answer_keeps_its_reservation(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, daily_budget_usd="1") as h:
        h.emulator.inject("sync", "reset_before")
        h.emulator.inject("sync", "http_500")
        task = chat_task("flaky", lane="sync")
        await h.post(task)
        for _ in range(3):
            await h.expire_backoffs()
            await _sync_round(h)
        assert (await h.task("flaky"))["state"] == "succeeded"
        ledger = await h.rows("SELECT reserved_usd, cost_usd FROM sync_spend ORDER BY id")
        est = _estimate(task, True)
        # No answer: may have been billed, stays reserved. An error answer
        # costs nothing. The success costs its usage.
        assert [(r["reserved_usd"], r["cost_usd"]) for r in ledger] == [
            (est, None),
            (est, Decimal(0)),
            (est, _actual(task, True)),
        ]


async def test_both_lanes_feed_the_lane_labelled_metrics(db_url: str, tmp_path: Path) -> None:
    tasks = [
        chat_task("b1"),
        chat_task("b2"),
        chat_task("s1", lane="sync"),
        chat_task("s-bad", lane="sync", emulate="http_400"),
    ]
    labels_b = {"client": "local", "lane": "batch"}
    labels_s = {"client": "local", "lane": "sync"}
    oa = {"provider": "openai", "model": "gpt-4o-mini"}
    names = [
        ("batchd_tasks_received_total", labels_b),
        ("batchd_tasks_received_total", labels_s),
        ("batchd_tasks_completed_total", {**labels_b, "outcome": "succeeded"}),
        ("batchd_tasks_completed_total", {**labels_s, "outcome": "succeeded"}),
        ("batchd_tasks_completed_total", {**labels_s, "outcome": "failed"}),
        ("batchd_spend_dollars_total", {**oa, "lane": "batch"}),
        ("batchd_spend_dollars_total", {**oa, "lane": "sync"}),
        ("batchd_savings_dollars_total", {**oa, "lane": "batch"}),
        ("batchd_savings_dollars_total", {**oa, "lane": "sync"}),
        ("batchd_tokens_total", {**oa, "kind": "output", "lane": "sync"}),
        ("batchd_task_latency_seconds_count", {"lane": "batch"}),
        ("batchd_task_latency_seconds_count", {"lane": "sync"}),
    ]
    async with running(db_url, tmp_path) as h:
        before = [_sample(n, **lab) for n, lab in names]
        await h.post({"tasks": tasks})
        await _sync_round(h)
        await h.run_until_settled()
        delta = [_sample(n, **lab) - b for (n, lab), b in zip(names, before, strict=True)]
    one = tokens_from_usage(usage_for("/v1/chat/completions", tasks[0]["body"]))
    # b1 and b2 share a batch; s1 is a call of its own: exact amounts.
    two_batch = 2 * cost(one, PRICE.batch)
    two_sync_equivalent = 2 * cost(one, PRICE.sync)
    one_sync = _actual(tasks[0], True)
    out_tokens = tokens_from_usage(usage_for("/v1/chat/completions", tasks[2]["body"])).output
    assert delta[:5] == [2, 2, 2, 1, 1]
    assert abs(delta[5] - float(two_batch)) < 1e-12
    assert abs(delta[6] - float(one_sync)) < 1e-12
    assert abs(delta[7] - float(two_sync_equivalent - two_batch)) < 1e-12
    assert delta[8:] == [0, out_tokens, 2, 1]
