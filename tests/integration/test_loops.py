"""The background loops that live beside the pipeline (daily report, spool
sweep, gauges), each on loops.run_ticks: they act when due, and stop at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from structlog.testing import capture_logs

from batchd.archive import Archive
from batchd.daily import DailyReport
from batchd.report import Reporter
from batchd.spool_sweep import SpoolSweep
from batchd.store.engine import make_engine


async def test_the_daily_loop_logs_each_closed_day_once_after_its_midnight(
    db_url: str, tmp_path: Path
) -> None:
    now = [datetime(2026, 12, 6, 23, 59, 50, tzinfo=UTC)]
    engine = make_engine(db_url, pool_size=1)
    try:
        daily = DailyReport(
            Reporter(engine, 0.03, lambda: now[0]),
            Archive(tmp_path / "archive", tmp_path / "spool"),
            None,
            lambda: now[0],
        )
        with capture_logs() as logs:
            assert await daily.tick() == 0  # the start's own day is not over
            assert daily._until_after_midnight() == 15.0  # 10 s to midnight, then 5
            now[0] += timedelta(seconds=20)
            assert await daily.tick() == 1
            assert await daily.tick() == 0  # once a day
        reports = [e for e in logs if e["event"] == "report.daily"]
        assert [r["date"] for r in reports] == ["2026-12-06"]
    finally:
        await engine.dispose()


async def test_the_loops_stop_as_soon_as_asked(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url, pool_size=1)
    archive = Archive(tmp_path / "archive", tmp_path / "spool")
    try:
        stop = asyncio.Event()
        loops = [
            asyncio.create_task(loop.run(stop))
            for loop in (
                SpoolSweep(engine, archive),
                DailyReport(Reporter(engine, 0.03), archive, None, lambda: datetime.now(UTC)),
            )
        ]
        await asyncio.sleep(0.05)
        assert not any(t.done() for t in loops)  # each waits for its next turn
        stop.set()
        await asyncio.wait_for(asyncio.gather(*loops), 2)
    finally:
        await engine.dispose()
