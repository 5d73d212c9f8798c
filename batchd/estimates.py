"""How many input tokens to reserve against the budget for a task's estimate.

At ingest each task gets an input estimate: the tokenizer's count where the
model has one (batchd.tokens; counted only when a budget is set), else the
byte rule, two bytes a token, which is above the truth for almost any text.
What the budget reserves is that estimate times a factor:

- a model with a tokenizer: ``1 + MARGIN``. The count is what the provider
  bills to within a few tokens of framing; the margin covers that and
  anything the count cannot see (a tool schema rendered differently);
- a model without one: calibrated from the usage batchd has already seen
  for it. Each routed batch gives the ratio of the input tokens the provider
  billed to the estimates of the same tasks; the factor is the highest ratio
  of the last ``WINDOW`` batches, plus the margin. Before the first batch of
  a model comes back it is 1 (the byte rule alone, high).

The calibration is kept per replica, in memory: after a restart a model is
estimated by the byte rule until one of its batches comes back.
"""

from __future__ import annotations

import math
from collections import deque
from decimal import Decimal

from batchd import tokens

# The stated safety margin on input tokens.
MARGIN = Decimal("0.05")
WINDOW = 20


class Calibration:
    def __init__(self) -> None:
        self._ratios: dict[str, deque[Decimal]] = {}

    def observe(self, model: str, billed_input: int, estimated_input: int) -> None:
        """One routed batch's stored results: input tokens billed, and the
        ingest estimates of the same tasks."""
        if estimated_input <= 0 or billed_input < 0:
            return
        ratio = Decimal(billed_input) / Decimal(estimated_input)
        self._ratios.setdefault(model, deque(maxlen=WINDOW)).append(ratio)

    def factor(self, model: str) -> Decimal:
        """What a task's input estimate is multiplied by for the budget."""
        if tokens.encoding_for(model) is not None:
            return 1 + MARGIN
        seen = self._ratios.get(model)
        if not seen:
            return Decimal(1)
        return max(seen) * (1 + MARGIN)

    def reserved_input(self, model: str, estimate: int) -> int:
        return math.ceil(estimate * self.factor(model))
