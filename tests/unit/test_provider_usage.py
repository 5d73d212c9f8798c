"""Usage of every provider's response read into one token count, and priced
with cache reads and writes at their own rates (Anthropic, Gemini, OpenAI)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from batchd.prices import PriceTable, ScaledRate, Tokens, cost, tokens_from_usage, usage_of


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        (
            {
                "usage": {
                    "prompt_tokens": 10,
                    "completion_tokens": 5,
                    "prompt_tokens_details": {"cached_tokens": 4},
                }
            },
            Tokens(10, 4, 5),
        ),
        ({"usage": {"input_tokens": 10, "output_tokens": 5}}, Tokens(10, 0, 5)),
        # Anthropic: input_tokens excludes what was read from or written to a cache.
        (
            {
                "usage": {
                    "input_tokens": 10,
                    "output_tokens": 5,
                    "cache_creation_input_tokens": 100,
                    "cache_read_input_tokens": 40,
                }
            },
            Tokens(150, 40, 5, 100),
        ),
        # Gemini: the prompt count includes cached tokens; thinking bills as output.
        (
            {
                "usageMetadata": {
                    "promptTokenCount": 50,
                    "cachedContentTokenCount": 20,
                    "candidatesTokenCount": 7,
                    "thoughtsTokenCount": 3,
                }
            },
            Tokens(50, 20, 10),
        ),
        ({"no": "usage"}, Tokens()),
        ("not a dict", Tokens()),
    ],
)
def test_usage_of_every_provider(body: Any, tokens: Tokens) -> None:
    assert tokens_from_usage(usage_of(body)) == tokens


def test_anthropic_cache_writes_and_reads_price_at_their_rates() -> None:
    price = PriceTable.load().lookup("claude-sonnet-4-5-20250929")
    assert price.name == "claude-sonnet-4-5" and price.known
    t = Tokens(input=1_300_000, cached=100_000, output=1_000_000, cache_write=200_000)
    # 1.0M plain at 1.5, 0.1M read at 0.15, 0.2M written at 1.875, 1M out at 7.5.
    assert cost(t, price.batch) == Decimal("9.39")
    scaled = ScaledRate.of(price.batch)
    assert Decimal(scaled.cost(t)) / scaled.scale / 1_000_000 == Decimal("9.39")


def test_a_model_without_a_cache_write_rate_pays_input_for_writes() -> None:
    price = PriceTable.load().lookup("gemini-2.5-flash")
    assert price.batch.cache_write == price.batch.input
    assert cost(Tokens(100, 0, 0, 100), price.batch) == cost(Tokens(100), price.batch)


@pytest.mark.parametrize(
    "model",
    [
        "claude-opus-4-5",
        "claude-haiku-4-5-20251001",
        "gemini-2.5-pro",
        "gemini-2.5-flash-lite",
        "gpt-4o-mini",
    ],
)
def test_current_models_of_each_provider_are_priced_at_half_in_batch(model: str) -> None:
    price = PriceTable.load().lookup(model)
    assert price.known
    assert price.batch.input * 2 == price.sync.input
    assert price.batch.output * 2 == price.sync.output
    assert price.batch.cache_write * 2 == price.sync.cache_write
