"""Per-model prices and what a call costs (protocol section 8).

Money is Decimal end to end; nothing is rounded until it is shown, so the
costs of a batch's results add up exactly to the batch's cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from batchd.errors import ConfigError

MILLION = Decimal(1_000_000)
USD_QUANTUM = Decimal("0.000001")


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per 1M tokens."""

    input: Decimal
    cached_input: Decimal
    output: Decimal


@dataclass(frozen=True, slots=True)
class ModelPrice:
    name: str  # the table entry used; "unknown" marks the fallback
    sync: Rate
    batch: Rate
    known: bool = True


@dataclass(frozen=True, slots=True)
class Tokens:
    input: int = 0
    cached: int = 0
    output: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(self.input + other.input, self.cached + other.cached,
                      self.output + other.output)


def tokens_from_usage(usage: Any) -> Tokens:
    """Read chat, responses, embeddings or batch-level usage alike."""
    if not isinstance(usage, dict):
        return Tokens()
    if "input_tokens" in usage:  # responses API and batch-level usage
        details = usage.get("input_tokens_details") or {}
        return Tokens(int(usage.get("input_tokens") or 0), int(details.get("cached_tokens") or 0),
                      int(usage.get("output_tokens") or 0))
    details = usage.get("prompt_tokens_details") or {}
    return Tokens(int(usage.get("prompt_tokens") or 0), int(details.get("cached_tokens") or 0),
                  int(usage.get("completion_tokens") or 0))


def cost(tokens: Tokens, rate: Rate) -> Decimal:
    uncached = max(0, tokens.input - tokens.cached)
    return (uncached * rate.input + tokens.cached * rate.cached_input
            + tokens.output * rate.output) / MILLION


def round_usd(value: Decimal) -> Decimal:
    return value.quantize(USD_QUANTUM)


class PriceTable:
    """Prices by model; a snapshot takes its longest matching prefix.

    A model not in the table is priced as the table's most expensive model,
    so budgets stay on the safe side, and flagged ``known=False``.
    """

    def __init__(self, as_of: str, models: dict[str, ModelPrice]) -> None:
        if not models:
            raise ConfigError("BATCHD_PRICES_FILE: the price table lists no models")
        self.as_of = as_of
        self.models = models
        worst = max(models.values(), key=lambda p: p.sync.input + p.sync.output)
        self._fallback = ModelPrice("unknown", worst.sync, worst.batch, known=False)
        self._by_length = sorted(models, key=len, reverse=True)

    def lookup(self, model: str) -> ModelPrice:
        for name in self._by_length:
            if model == name or model.startswith(name + "-") or model.startswith(name + ":"):
                return self.models[name]
        return self._fallback

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        where = str(path) if path else "bundled prices.json"
        try:
            if path is None:
                raw = resources.files("batchd").joinpath("prices.json").read_text()
            else:
                raw = path.read_text()
            data = json.loads(raw, parse_float=Decimal)
            models = {
                name: ModelPrice(name, _rate(entry["sync"]), _rate(entry["batch"]))
                for name, entry in data["models"].items()
            }
            return cls(str(data.get("as_of", "unknown")), models)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"BATCHD_PRICES_FILE: cannot read {where}: {exc}") from None


def _rate(entry: dict[str, Any]) -> Rate:
    values = [Decimal(str(entry[k])) for k in ("input", "cached_input", "output")]
    if any(v < 0 for v in values):
        raise ValueError("prices must not be negative")
    return Rate(*values)
