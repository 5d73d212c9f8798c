"""Prices, cost and rounding, table-driven."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from batchd.errors import ConfigError
from batchd.prices import (
    PriceTable,
    Rate,
    ScaledRate,
    Tokens,
    cost,
    round_usd,
    show_usd,
    tokens_from_usage,
)


def test_protocol_example_cost() -> None:
    rate = Rate(Decimal("1.25"), Decimal("0.625"), Decimal("5.00"))
    assert cost(Tokens(1000, 200, 300), rate) == Decimal("0.002625")


@pytest.mark.parametrize(
    "tokens",
    [
        Tokens(),
        Tokens(1000, 200, 300),
        Tokens(7, 9, 1),
        Tokens(123_457, 0, 98_765),
    ],
)
def test_scaled_rate_is_the_exact_cost_in_whole_numbers(tokens: Tokens) -> None:
    rates = [
        Rate(Decimal("1.25"), Decimal("0.625"), Decimal("5.00")),
        Rate(Decimal("0.0375"), Decimal("1E+1"), Decimal("0")),
        # a price file written from floats
        Rate(Decimal("0.15000000000000002"), Decimal("0.0012500000000000002"), Decimal("0.6")),
    ]
    for price in PriceTable.load().models.values():
        rates += [price.sync, price.batch]
    for rate in rates:
        scaled = ScaledRate.of(rate)
        assert Decimal(scaled.cost(tokens)) / scaled.scale / 1_000_000 == cost(tokens, rate)


@pytest.mark.parametrize(
    ("model", "entry", "known"),
    [
        ("gpt-4o-mini", "gpt-4o-mini", True),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini", True),
        ("gpt-4o-2024-08-06", "gpt-4o", True),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini", True),
        ("gpt-4omega", "unknown", False),
        ("brand-new-model", "unknown", False),
    ],
)
def test_snapshot_takes_longest_prefix(model: str, entry: str, known: bool) -> None:
    price = PriceTable.load().lookup(model)
    assert (price.name, price.known) == (entry, known)


def test_unknown_model_is_priced_high_not_zero() -> None:
    table = PriceTable.load()
    unknown = table.lookup("brand-new-model")
    assert unknown.batch.input >= max(p.batch.input for p in table.models.values()) > 0


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        (
            {
                "prompt_tokens": 20,
                "completion_tokens": 9,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
            Tokens(20, 4, 9),
        ),
        (
            {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 1}},
            Tokens(7, 1, 3),
        ),
        ({"prompt_tokens": 11, "total_tokens": 11}, Tokens(11, 0, 0)),
        (None, Tokens()),
    ],
)
def test_tokens_from_usage(usage: object, tokens: Tokens) -> None:
    assert tokens_from_usage(usage) == tokens


def test_batch_is_half_of_sync_in_the_bundled_table() -> None:
    for price in PriceTable.load().models.values():
        assert price.batch.input * 2 == price.sync.input
        assert price.batch.output * 2 == price.sync.output


@pytest.mark.parametrize(
    ("exact", "shown"),
    [
        ("0.0000005", "0.000001"),  # half up, as PostgreSQL's round(); half-even would give 0
        ("0.0000025", "0.000003"),
        ("0.00000049999", "0.000000"),
        ("0.0000015", "0.000002"),
        ("1.2345675", "1.234568"),
        ("0", "0.000000"),
    ],
)
def test_usd_rounds_half_up_to_the_micro_dollar(exact: str, shown: str) -> None:
    assert str(round_usd(Decimal(exact))) == shown
    assert show_usd(Decimal(exact)) == shown


def test_a_cost_is_linear_in_tokens_so_a_batch_total_is_the_sum_of_its_lines() -> None:
    rate = PriceTable.load().lookup("gpt-4o-mini").batch
    lines = [Tokens(37 + i, i % 5, 11 + i) for i in range(1000)]
    total = Tokens()
    for t in lines:
        total += t
    assert sum(cost(t, rate) for t in lines) == cost(total, rate)
    # ...but rounding each line on its own does not add up: hence the allocation.
    assert sum(round_usd(cost(t, rate)) for t in lines) != round_usd(cost(total, rate))


@pytest.mark.parametrize(
    ("a", "b", "high"),
    [
        (Tokens(10, 2, 5), Tokens(8, 3, 5), Tokens(10, 3, 5)),
        (Tokens(), Tokens(1, 0, 1), Tokens(1, 0, 1)),
    ],
)
def test_billed_tokens_take_the_larger_count_of_each_kind(
    a: Tokens, b: Tokens, high: Tokens
) -> None:
    assert a.at_least(b) == b.at_least(a) == high


def test_prices_file_override_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "p.json"
    good.write_text(
        json.dumps(
            {
                "as_of": "2026-01-01",
                "models": {
                    "m": {
                        "sync": {"input": 2, "cached_input": 1, "output": 4},
                        "batch": {"input": 1, "cached_input": 0.5, "output": 2},
                    }
                },
            }
        )
    )
    assert PriceTable.load(good).lookup("m-2026").batch.output == Decimal(2)
    bad = tmp_path / "bad.json"
    bad.write_text('{"models": {"m": {"sync": {}}}}')
    with pytest.raises(ConfigError, match="BATCHD_PRICES_FILE"):
        PriceTable.load(bad)


@pytest.mark.parametrize(("sync", "tokens_in", "tokens_out"), [(False, 7, 3), (True, 1, 2)])
def test_a_reservation_rounds_up_at_its_lane_price(
    sync: bool, tokens_in: int, tokens_out: int
) -> None:
    table = PriceTable.load()
    price = table.lookup("gpt-4o-mini")
    exact = cost(Tokens(tokens_in, 0, tokens_out), price.sync if sync else price.batch)
    reserved = table.reservation("gpt-4o-mini", tokens_in, tokens_out, sync=sync)
    assert reserved >= exact and reserved - exact < Decimal("0.000001")
    assert reserved == reserved.quantize(Decimal("0.000001"))
    assert round_usd(exact) < exact, "the case must be one where rounding to nearest goes down"


def test_a_reservation_for_an_unknown_model_is_never_below_any_known_one() -> None:
    table = PriceTable.load()
    unknown = table.reservation("no-such-model", 1000, 1000, sync=True)
    assert all(unknown >= table.reservation(name, 1000, 1000, sync=True) for name in table.models)
