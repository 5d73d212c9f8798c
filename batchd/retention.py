"""Retention (DESIGN 15): a background pass that rolls up each closed UTC day
and then deletes finished history older than BATCHD_RETENTION_DAYS, in
bounded steps (store/retention.py), so the database holds a window of days,
not everything ever seen.

Rolling up comes first and bounds the cutoff: no row is deleted from a day
whose report is not stored yet. A step deletes at most
BATCHD_RETENTION_BATCH_ROWS tasks (with their rows), batches and ledger rows,
each in its own short transaction with SKIP LOCKED, and the pass yields
between steps, so ingest never waits behind it. Several replicas may run it at
once: they take different rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.loops import run_ticks, wait_first
from batchd.report import Reporter
from batchd.store import retention as store
from batchd.store import rollups

log = logs.get("batchd.retention")

# Between two steps of a pass: at least enough for ingest's writers to get
# in, and (DUTY - 1) times as long as the step took, so a pass deletes for at
# most 1/DUTY of the time. Flat out, a pass of 5,000,000 rows wrote WAL (each
# deleted page's full image after a checkpoint) faster than the disk synced
# it, and ingest's commits waited for those syncs: p99 1.1 s. A day's rows
# (3,000,000 at 1,000,000 tasks a day) still go in minutes a day.
_STEP_PAUSE_SECONDS = 0.02
DUTY = 4


@dataclass(frozen=True, slots=True)
class Plan:
    cutoff: datetime | None  # None: nothing may be deleted yet
    due: dict[str, int]


class Retention:
    def __init__(
        self,
        engine: AsyncEngine,
        reporter: Reporter,
        *,
        days: int,
        batch_rows: int,
        interval: float,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.engine = engine
        self.reporter = reporter
        self.days = days
        self.batch_rows = batch_rows
        self.interval = interval
        self.clock = clock or reporter.clock
        self.rest_seconds = _STEP_PAUSE_SECONDS  # the pause the last step earned
        metrics.CONFIG_RETENTION_DAYS.set(days)

    async def run(self, stop: asyncio.Event) -> None:
        # The first pass waits an interval: a restart (a deploy, a crash
        # loop) does not start a roll-up and a prune each time.
        await wait_first(stop, None, self.interval)
        await run_ticks(
            stop,
            self.tick,
            logger=log,
            event="retention.tick_failed",
            interval=lambda done: self.rest_seconds if done else self.interval,
        )

    async def cutoff(self, *, rolled_through: datetime | None = None) -> datetime | None:
        """Rows finished before this go: BATCHD_RETENTION_DAYS ago, but never
        inside a day whose report is not stored yet."""
        if rolled_through is None:
            async with self.engine.connect() as conn:
                last = await rollups.last_rolled_day(conn)
            if last is None:
                return None
            rolled_through = datetime(last.year, last.month, last.day, tzinfo=UTC) + timedelta(
                days=1
            )
        return min(self.clock() - timedelta(days=self.days), rolled_through)

    async def tick(self) -> int:
        """Roll up closed days, then one bounded step per table: rows deleted."""
        await self.reporter.roll_up()
        cutoff = await self.cutoff()
        pruned = store.Pruned()
        if cutoff is not None:
            pruned = await self.step(cutoff)
        await self.observe()
        return pruned.total

    async def step(self, cutoff: datetime) -> store.Pruned:
        started = time.monotonic()
        try:
            return await self._step(cutoff)
        finally:
            self.rest_seconds = max(_STEP_PAUSE_SECONDS, (time.monotonic() - started) * (DUTY - 1))

    async def _step(self, cutoff: datetime) -> store.Pruned:
        async with self.engine.begin() as conn:
            pruned = await store.prune_tasks(conn, cutoff, self.batch_rows)
        async with self.engine.begin() as conn:
            pruned.add("batches", await store.prune_batches(conn, cutoff, self.batch_rows))
        async with self.engine.begin() as conn:
            pruned.add(
                "sync_spend", await store.prune_sync_spend(conn, cutoff.date(), self.batch_rows)
            )
        async with self.engine.begin() as conn:
            pruned.add(
                "client_spend", await store.prune_client_spend(conn, cutoff.date(), self.batch_rows)
            )
        for table, n in pruned.rows.items():
            if n:
                metrics.ROWS_PRUNED.labels(table=table).inc(n)
        if pruned.total:
            log.info("retention.pruned", cutoff=cutoff.isoformat(), **pruned.rows)
        return pruned

    async def observe(self) -> None:
        async with self.engine.connect() as conn:
            metrics.DATABASE_BYTES.set(await store.database_bytes(conn))
            oldest = await store.oldest_prunable(conn)
        metrics.RETENTION_OLDEST.set(oldest.timestamp() if oldest else 0)

    async def prune(self) -> store.Pruned:
        """One whole pass (``batchd prune``): roll up, then steps until none is left."""
        await self.reporter.roll_up()
        total = store.Pruned()
        cutoff = await self.cutoff()
        while cutoff is not None:
            pruned = await self.step(cutoff)
            for table, n in pruned.rows.items():
                total.add(table, n)
            if not pruned.total:
                break
            await asyncio.sleep(self.rest_seconds)
        await self.observe()
        return total

    async def plan(self) -> Plan:
        """What ``prune`` would delete now, writing nothing (``--dry-run``):
        days not rolled up yet count as rolled up through the last closed one."""
        closed = self.reporter.last_closed_day()
        through = datetime(closed.year, closed.month, closed.day, tzinfo=UTC) + timedelta(days=1)
        async with self.engine.connect() as conn:
            first_seen = await rollups.first_activity(conn)
            if first_seen is None:
                return Plan(None, {})
            cutoff = await self.cutoff(rolled_through=through)
            assert cutoff is not None
            return Plan(cutoff, await store.count_due(conn, cutoff))
