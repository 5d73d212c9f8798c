"""The spool sweep: archive spool files whose batch is past the step that
wrote them, at start and now and then after, so an archive write that failed
(disk full, a crash of the flow that owned it) is retried."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs
from batchd.archive import Archive
from batchd.loops import run_ticks
from batchd.store import gauges

log = logs.get("batchd.spool_sweep")

# How often, and how long a file must sit untouched first so the sweep does
# not race the flow that is about to archive it.
SWEEP_SECONDS = 60.0
SWEEP_MIN_AGE_SECONDS = 60.0


class SpoolSweep:
    def __init__(self, engine: AsyncEngine, archive: Archive) -> None:
        self.engine = engine
        self.archive = archive

    async def run(self, stop: asyncio.Event) -> None:
        # The start-up sweep (min age 0) ran before the API opened; wait first.
        first = True

        async def tick() -> int:
            nonlocal first
            if first:
                first = False
                return 0
            return await self.sweep(SWEEP_MIN_AGE_SECONDS)

        await run_ticks(
            stop, tick, logger=log, event="archive.sweep_failed", interval=lambda _: SWEEP_SECONDS
        )

    async def sweep(self, min_age_seconds: float = 0.0) -> int:
        """Archive spool files whose batch is past the step that wrote them
        (the input once submitted, output and error once routed); the rest
        are rebuilt by the normal flow. Returns how many were archived."""
        archived = 0
        for batch_id, kind, path in self.archive.leftovers(min_age_seconds):
            try:
                async with self.engine.connect() as conn:
                    row = await gauges.batch_archive_state(conn, batch_id)
                done = row is not None and (
                    row.state == "routed" or (kind in ("input", "ids") and row.state == "submitted")
                )
                if done and row is not None:
                    await self.archive.keep(
                        path,
                        row.spend_day,
                        batch_id,
                        kind,
                        {"provider_batch_id": row.provider_batch_id, "recovered": True},
                    )
                    path.unlink(missing_ok=True)
                    archived += 1
                    log.info("archive.recovered", batch_id=batch_id, kind=kind)
            except Exception as exc:
                log.warning(
                    "archive.recover_failed", batch_id=batch_id, kind=kind, error=type(exc).__name__
                )
        return archived
