"""Per-model prices and what a call costs (DESIGN section 8).

Money is exact end to end and rounded only where it is shown. A price is
USD per 1M tokens with at most 6 decimal places, so a token costs a whole
number of micro-micro-dollars (1e-12 USD) and every cost is a whole number
of them: stored as it is (numeric(24, 12)), summed as it is. A result
carries the exact cost of its line, a batch the exact cost of the tokens it
was billed for (the batch's own ``usage`` when the provider reports it),
and what no result carries (billed lines no task kept) is the batch's
unattributed cost, so results + unattributed = the batch exactly. A day's
spend, a job's, a report row's or a budget's is the exact sum, rounded once
to 1e-6 USD, half up, when it is shown (``round_usd``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from batchd import logs, metrics
from batchd.errors import ConfigError

log = logs.get("batchd.prices")

MILLION = Decimal(1_000_000)
USD_QUANTUM = Decimal("0.000001")
# USD per 1M tokens to this many places: a token's price is then a whole
# number of 1e-12 USD, what the ledger's numeric(24, 12) columns hold exactly.
PRICE_PLACES = 6


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per 1M tokens. ``cache_write_input`` is what writing a prompt cache
    costs (Anthropic: 1.25 times input); a model without one pays input."""

    input: Decimal
    cached_input: Decimal
    output: Decimal
    cache_write_input: Decimal | None = None

    @property
    def cache_write(self) -> Decimal:
        return self.input if self.cache_write_input is None else self.cache_write_input


@dataclass(frozen=True, slots=True)
class ModelPrice:
    name: str  # the table entry used; "unknown" marks the fallback
    sync: Rate
    batch: Rate
    known: bool = True


@dataclass(frozen=True, slots=True)
class Tokens:
    """``input`` counts every prompt token; ``cached`` (read from a cache) and
    ``cache_write`` (written to one) are parts of it priced at their own rates."""

    input: int = 0
    cached: int = 0
    output: int = 0
    cache_write: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(
            self.input + other.input,
            self.cached + other.cached,
            self.output + other.output,
            self.cache_write + other.cache_write,
        )

    def __sub__(self, other: Tokens) -> Tokens:
        return Tokens(
            self.input - other.input,
            self.cached - other.cached,
            self.output - other.output,
            self.cache_write - other.cache_write,
        )

    def at_least(self, other: Tokens) -> Tokens:
        """Kind by kind, the larger of the two (the high side of two counts)."""
        return Tokens(
            max(self.input, other.input),
            max(self.cached, other.cached),
            max(self.output, other.output),
            max(self.cache_write, other.cache_write),
        )


def usage_of(body: Any) -> Any:
    """The usage object of a response body of any provider: ``usage`` (OpenAI,
    Anthropic) or ``usageMetadata`` (Gemini)."""
    if not isinstance(body, dict):
        return None
    usage = body.get("usage")
    return usage if usage is not None else body.get("usageMetadata")


def tokens_from_usage(usage: Any) -> Tokens:
    """Read chat, responses, embeddings, batch-level, Anthropic and Gemini
    usage alike."""
    if not isinstance(usage, dict):
        return Tokens()
    if "promptTokenCount" in usage or "candidatesTokenCount" in usage:
        # Gemini: the prompt count includes cached tokens; thinking is billed
        # as output.
        return Tokens(
            int(usage.get("promptTokenCount") or 0),
            int(usage.get("cachedContentTokenCount") or 0),
            int(usage.get("candidatesTokenCount") or 0) + int(usage.get("thoughtsTokenCount") or 0),
        )
    if "cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage:
        # Anthropic: input_tokens is only what neither read nor wrote a cache.
        write = int(usage.get("cache_creation_input_tokens") or 0)
        read = int(usage.get("cache_read_input_tokens") or 0)
        return Tokens(
            int(usage.get("input_tokens") or 0) + write + read,
            read,
            int(usage.get("output_tokens") or 0),
            write,
        )
    if "input_tokens" in usage:  # responses API, batch-level usage, Anthropic without caching
        details = usage.get("input_tokens_details") or {}
        return Tokens(
            int(usage.get("input_tokens") or 0),
            int(details.get("cached_tokens") or 0),
            int(usage.get("output_tokens") or 0),
        )
    details = usage.get("prompt_tokens_details") or {}
    return Tokens(
        int(usage.get("prompt_tokens") or 0),
        int(details.get("cached_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
    )


def cost(tokens: Tokens, rate: Rate) -> Decimal:
    uncached = max(0, tokens.input - tokens.cached - tokens.cache_write)
    return (
        uncached * rate.input
        + tokens.cached * rate.cached_input
        + tokens.cache_write * rate.cache_write
        + tokens.output * rate.output
    ) / MILLION


@dataclass(frozen=True, slots=True)
class ScaledRate:
    """A rate as whole numbers, for costing many lines fast and exactly.

    A price per 1M tokens in USD is a price per token in micro-dollars, so a
    line's cost in units of 1e-6 / ``scale`` USD is a sum of integer products;
    ``cost(tokens, rate)`` is that figure divided by 1e6 * ``scale``.
    """

    input: int
    cached_input: int
    output: int
    scale: int
    cache_write: int = 0

    @classmethod
    def of(cls, rate: Rate) -> ScaledRate:
        places = max(
            max(0, -int(v.as_tuple().exponent))
            for v in (rate.input, rate.cached_input, rate.output, rate.cache_write)
        )
        scale = 10**places
        return cls(
            int(rate.input * scale),
            int(rate.cached_input * scale),
            int(rate.output * scale),
            scale,
            int(rate.cache_write * scale),
        )

    def cost(self, tokens: Tokens) -> int:
        uncached = max(0, tokens.input - tokens.cached - tokens.cache_write)
        return (
            uncached * self.input
            + tokens.cached * self.cached_input
            + tokens.cache_write * self.cache_write
            + tokens.output * self.output
        )

    def usd(self, units: int) -> Decimal:
        """``units`` of this rate (``cost``'s figure) as exact USD."""
        return Decimal(units).scaleb(-6 - (len(str(self.scale)) - 1))


def round_usd(value: Decimal) -> Decimal:
    """To 1e-6 USD, half up: the same rule PostgreSQL's round() applies."""
    return value.quantize(USD_QUANTUM, rounding=ROUND_HALF_UP)


def show_usd(value: Decimal | None) -> str | None:
    """Money as the API shows it: a decimal string with six places."""
    return None if value is None else str(round_usd(Decimal(value)))


# A dated snapshot's suffix (gpt-4o-mini-2024-07-18).
_SNAPSHOT = re.compile(r"-[0-9]{4}-[0-9]{2}-[0-9]{2}")


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
        self._fallback_source = worst.name
        self._fallback = ModelPrice("unknown", worst.sync, worst.batch, known=False)
        self._by_length = sorted(models, key=len, reverse=True)
        self._warned: set[tuple[str, str]] = set()

    def lookup(self, model: str) -> ModelPrice:
        for name in self._by_length:
            if model == name or model.startswith(name + "-") or model.startswith(name + ":"):
                return self.models[name]
        return self._fallback

    def entry(self, model: str) -> str | None:
        """The table entry that prices ``model`` as itself or as one of its
        dated snapshots (``gpt-4o-mini-2024-07-18``); None for anything else,
        so an invented ``gpt-4o-mini-x1``, ``-x2``... is no entry's. This is
        the rule for a window of its own and a ``model`` metric label."""
        price = self.lookup(model)
        if not price.known:
            return None
        rest = model[len(price.name) :]
        return price.name if not rest or _SNAPSHOT.fullmatch(rest) else None

    def metric_label(self, model: str) -> str:
        """The ``model`` label: a table entry, else ``other`` (bounded by the table)."""
        return self.entry(model) or "other"

    def warn_unpriced(self, model: str, where: str) -> None:
        """Log, once per model and place per process, that a model is priced
        by the fallback rule. Results, the report and metrics carry the flag
        every time; the log is only the first alarm."""
        if (model, where) in self._warned:
            return
        self._warned.add((model, where))
        log.warning(
            "prices.unknown_model",
            model=model,
            where=where,
            rule="priced as the table's most expensive model",
            priced_as=self._fallback_source,
            prices_as_of=self.as_of,
        )

    def reservation(self, model: str, est_input: int, est_output: int, *, sync: bool) -> Decimal:
        """High-side cost reserved against the daily budget before a batch or
        a sync call goes out: an unknown model at the table's most expensive
        price, rounded up so it never falls below what it stands for."""
        price = self.lookup(model)
        if not price.known:
            self.warn_unpriced(model, "budget")
            metrics.UNPRICED_ESTIMATES.inc()
        rate = price.sync if sync else price.batch
        return cost(Tokens(est_input, 0, est_output), rate).quantize(
            USD_QUANTUM, rounding=ROUND_CEILING
        )

    def pico_rates(self, model: str, *, sync: bool) -> tuple[int, int]:
        """(input, output) price of one token in 1e-12 USD, whole numbers (a
        price has at most PRICE_PLACES places), for reserving in SQL; an
        unknown model at the table's most expensive price, as ``reservation``."""
        price = self.lookup(model)
        if not price.known:
            self.warn_unpriced(model, "budget")
            metrics.UNPRICED_ESTIMATES.inc()
        rate = price.sync if sync else price.batch
        return int(rate.input * MILLION), int(rate.output * MILLION)

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
    write = entry.get("cache_write_input")
    cache_write = Decimal(str(write)) if write is not None else None
    if any(v < 0 for v in values) or (cache_write is not None and cache_write < 0):
        raise ValueError("prices must not be negative")
    for v in values:
        if -int(v.normalize().as_tuple().exponent) > PRICE_PLACES:
            raise ValueError(
                f"price {v} has more than {PRICE_PLACES} decimal places (USD per 1M tokens, "
                "so 1e-12 USD a token, is as fine as batchd keeps money exact); write it "
                f"rounded, e.g. {v.quantize(Decimal(1).scaleb(-PRICE_PLACES)).normalize()}"
            )
    return Rate(values[0], values[1], values[2], cache_write_input=cache_write)
