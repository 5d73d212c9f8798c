"""The daily loop: after each UTC midnight, log the day before as one
``report.daily`` event and prune the archive past its retention."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from batchd import logs
from batchd.archive import Archive
from batchd.loops import run_ticks
from batchd.report import Reporter

log = logs.get("batchd.daily")


class DailyReport:
    def __init__(
        self,
        reporter: Reporter,
        archive: Archive,
        archive_retention_days: int | None,
        clock: Callable[[], datetime],
    ) -> None:
        self.reporter = reporter
        self.archive = archive
        self.archive_retention_days = archive_retention_days
        self.clock = clock
        # The day already covered: a start logs nothing, the first midnight after it does.
        self._logged_through: date = clock().date()

    async def run(self, stop: asyncio.Event) -> None:
        await run_ticks(
            stop,
            self.tick,
            logger=log,
            event="report.daily_failed",
            interval=lambda _: self._until_after_midnight(),
        )

    def _until_after_midnight(self) -> float:
        now = self.clock()
        tomorrow = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
        return max(1.0, (tomorrow - now).total_seconds() + 5)

    async def tick(self) -> int:
        today = self.clock().date()
        if today <= self._logged_through:
            return 0
        report = await self.reporter.day(today - timedelta(days=1))
        log.info("report.daily", **report)
        self._logged_through = today
        if self.archive_retention_days:
            removed = await asyncio.to_thread(
                self.archive.prune, self.archive_retention_days, today
            )
            log.info("archive.pruned", days_removed=len(removed))
        return 1
