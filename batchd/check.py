"""``batchd check``: the invariants of a live database (DESIGN 15), each named
with the rows that break it. tests/invariants.py runs the same checks after
every chaos, crash and replica test, adding what only the provider emulator's
record can show.

What holds on a healthy database, whatever crashed or was pruned:

* each submitted task sits in exactly one live batch of ours;
* a routed batch's cost equals its results' costs plus its unattributed lines
  (batches retention has started on are skipped);
* results are exactly the succeeded tasks', each success stored once;
* no event or callback outlives its task;
* the daily counters add up: the rolled-up days run without a gap, and each
  stored day still inside the retention window equals the same day counted
  again from the live tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd.report import LATENCY_BUCKETS_PER_DOUBLING
from batchd.store import checks, rollups

# What a stored day must still show when counted again: the events and the
# money. (finished_ok and the lane columns follow the tasks' states now, which
# later replays change by definition.)
_STABLE = (
    "tasks_in",
    "succeeded",
    "failed",
    "retried",
    "replayed",
    "dismissed",
    "finished",
    "spend_usd",
    "sync_usd",
    "unattributed_usd",
)
# How many recent stored days are counted again (each is a day's range scan).
RECOUNT_DAYS = 7


@dataclass(slots=True)
class Breach:
    code: str
    says: str
    count: int
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        shown = f": {', '.join(self.examples)}" if self.examples else ""
        more = (
            f" (and {self.count - len(self.examples)} more)"
            if self.count > len(self.examples)
            else ""
        )
        return f"{self.code}: {self.count} breach(es) of '{self.says}'{shown}{more}"

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "says": self.says,
            "count": self.count,
            "examples": self.examples,
        }


async def check(
    engine: AsyncEngine, *, retention_days: int, now: datetime | None = None, examples: int = 5
) -> list[Breach]:
    """Every invariant above; an empty list when all hold."""
    async with engine.connect() as conn:
        # One snapshot for every query, so a busy database cannot show a
        # breach that is only two queries seeing different moments.
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            return await check_in(conn, retention_days=retention_days, now=now, examples=examples)


async def check_in(
    conn: AsyncConnection, *, retention_days: int, now: datetime | None = None, examples: int = 5
) -> list[Breach]:
    """``check`` on an open connection (inside its transaction)."""
    found: list[Breach] = []
    for inv in checks.INVARIANTS:
        n, items = await checks.breaking_rows(conn, inv, examples)
        if n:
            found.append(Breach(inv.code, inv.says, n, items))
    now = now or datetime.now(UTC)
    # A day wholly inside the window: nothing of it can have been pruned.
    first = (now - timedelta(days=retention_days)).date() + timedelta(days=1)
    last = await rollups.last_rolled_day(conn)
    if last is not None:
        start = max(first, last - timedelta(days=RECOUNT_DAYS - 1))
        bad: list[str] = []
        day = start
        while day <= last:
            bad += await _recount(conn, day)
            day += timedelta(days=1)
        if bad:
            found.append(
                Breach(
                    "daily_counters",
                    "a stored day equals the same day counted again",
                    len(bad),
                    bad[:examples],
                )
            )
    return found


async def _recount(conn: AsyncConnection, day: date) -> list[str]:
    lo = datetime(day.year, day.month, day.day, tzinfo=UTC)
    again = await rollups.compute_day(
        conn, lo, lo + timedelta(days=1), LATENCY_BUCKETS_PER_DOUBLING
    )
    stored = {
        (r["client"], r["provider"], r["model"], r["lane"]): r
        for r in await rollups.stored_rows(conn, day, day, None)
    }
    bad = []
    for key in sorted(set(again) | set(stored)):
        now_row = again.get(key, {})
        then = stored.get(key, {})
        for name in _STABLE:
            a, b = now_row.get(name, 0), then.get(name, 0)
            if a != b:
                bad.append(f"{day} {'/'.join(key)} {name} stored {b} counted {a}")
    return bad
