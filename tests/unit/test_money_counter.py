"""The exact dollar counters behind batchd_spend_dollars_total and
batchd_savings_dollars_total."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import CollectorRegistry, generate_latest

from batchd.metrics import MoneyCounter
from batchd.prices import round_usd


def _shown(registry: CollectorRegistry, **labels: str) -> float | None:
    return registry.get_sample_value("x_dollars_total", labels)


def test_the_total_is_exact_and_rounded_once_when_shown() -> None:
    registry = CollectorRegistry()
    money = MoneyCounter("x_dollars", "test", ["model"], registry)
    # 10,000 amounts of 0.0000004 USD: each rounds to 0, summed exactly they
    # are 0.004; adding floats instead would drift in the last places.
    for _ in range(10_000):
        money.add(Decimal("0.0000004"), model="m")
    assert money.exact(model="m") == Decimal("0.0040000")
    shown = _shown(registry, model="m")
    assert shown is not None and round_usd(Decimal(repr(shown))) == Decimal("0.004000")
    assert b'x_dollars_total{model="m"} 0.004' in generate_latest(registry)


def test_a_total_that_dips_holds_its_highest_value() -> None:
    registry = CollectorRegistry()
    savings = MoneyCounter("x_dollars", "test", ["model"], registry)
    savings.add(Decimal("0.5"), model="m")
    assert _shown(registry, model="m") == 0.5
    savings.add(Decimal("-0.2"), model="m")  # billed lines no task kept
    assert savings.exact(model="m") == Decimal("0.3")
    assert _shown(registry, model="m") == 0.5  # a counter never goes down
    savings.add(Decimal("0.4"), model="m")
    assert _shown(registry, model="m") == 0.7


def test_a_series_can_start_at_zero() -> None:
    registry = CollectorRegistry()
    money = MoneyCounter("x_dollars", "test", ["model", "lane"], registry)
    assert _shown(registry, model="m", lane="batch") is None
    money.add(Decimal(0), model="m", lane="batch")
    assert _shown(registry, model="m", lane="batch") == 0.0
