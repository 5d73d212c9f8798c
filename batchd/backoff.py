"""Every wait batchd computes before trying again, in one place: exponential
backoff with equal jitter, its SQL twin, and the Retry-After header.

A leaf module (the standard library only): the client library uses it too,
and must import without the daemon's dependencies.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Protocol


def exponential(step: int, base: float, cap: float) -> float:
    """``base`` doubled ``step`` times (step 0: ``base``), at most ``cap``."""
    return min(cap, base * 2.0 ** max(0, step))


def equal_jitter(full: float, jitter: float) -> float:
    """Half of ``full`` fixed, half spread by ``jitter`` in [0, 1): retries of
    one failure spread out, and none comes sooner than half the backoff."""
    return full / 2 + full / 2 * jitter


def sql_exponential(step: str, base: str = ":base", cap: str = ":cap") -> str:
    """``exponential`` as a PostgreSQL expression over the SQL ``step``, so a
    statement computes the same delay for each row it updates
    (tests/unit/test_backoff.py compares the two)."""
    return f"least({cap}, {base} * power(2, greatest({step}, 0)))"


def sql_equal_jitter(full: str, jitter: str) -> str:
    """``equal_jitter`` as a PostgreSQL expression."""
    return f"({full}) * (0.5 + 0.5 * {jitter})"


class _Headers(Protocol):
    def get(self, key: str, /) -> str | None: ...


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value: delta-seconds or an HTTP
    date (RFC 9110 10.2.3); None when absent or unreadable, never negative."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_headers(headers: _Headers, now: float | None = None) -> float | None:
    """``retry-after-ms`` (OpenAI's and Azure's, milliseconds) when present
    and readable, else ``retry-after``."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    return retry_after(headers.get("retry-after"), now)
