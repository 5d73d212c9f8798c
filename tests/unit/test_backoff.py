"""One backoff formula: the Python and its SQL twin agree, and every wait
(task retries, loop ticks, refused sends, the client) is built from it; one
Retry-After reader."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from sqlalchemy import text

from batchd.backoff import (
    equal_jitter,
    exponential,
    retry_after,
    retry_after_headers,
    sql_equal_jitter,
    sql_exponential,
)
from batchd.domain import backoff_seconds, tick_delay
from batchd.store.engine import make_engine

GRID = [
    (step, base, cap, jitter)
    for step in (-1, 0, 1, 2, 5, 30)
    for base in (0.5, 30.0)
    for cap in (60.0, 86_400.0)
    for jitter in (0.0, 0.37, 0.999)
]


async def test_the_sql_backoff_is_the_python_one(db_url: str) -> None:
    engine = make_engine(db_url, pool_size=1)
    expr = sql_equal_jitter(sql_exponential(":step"), ":jitter")
    try:
        async with engine.connect() as conn:
            for step, base, cap, jitter in GRID:
                got = (
                    await conn.execute(
                        text(f"SELECT CAST({expr} AS float8)"),
                        {"step": step, "base": base, "cap": cap, "jitter": jitter},
                    )
                ).scalar_one()
                assert got == pytest.approx(
                    equal_jitter(exponential(step, base, cap), jitter), rel=1e-12
                ), (step, base, cap, jitter)
    finally:
        await engine.dispose()


def test_waits_double_from_the_base_up_to_the_cap_and_jitter_spreads_the_second_half() -> None:
    assert [exponential(s, 1.0, 10.0) for s in (-3, 0, 1, 2, 3, 4)] == [1, 1, 2, 4, 8, 10]
    assert equal_jitter(8.0, 0.0) == 4.0 and equal_jitter(8.0, 0.5) == 6.0
    # A task's first retry waits its base (attempts counts the one made).
    assert backoff_seconds(1, 30.0, 0.0) == 15.0 and backoff_seconds(3, 30.0, 0.999) < 120.0
    assert tick_delay(0, 1.0, 0.5) == 1.0 and tick_delay(4, 1.0, 0.0, cap=10.0) == 4.0


def test_retry_after_reads_seconds_and_http_dates_and_never_goes_negative() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    assert retry_after("7") == 7.0 and retry_after("1.5") == 1.5 and retry_after("-3") == 0.0
    assert (
        retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now.timestamp())
        == 90.0
    )
    assert (
        retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now.timestamp())
        == 0.0
    )
    for unreadable in (None, "", "soon", "Mon, 99 Foo 2026"):
        assert retry_after(unreadable) is None
    assert retry_after_headers({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_headers({"retry-after-ms": "x", "retry-after": "9"}) == 9.0
    assert retry_after_headers({}) is None
