"""SIGTERM: stop taking tasks (503), finish the write in hand, release the
claims, exit 0 within BATCHD_SHUTDOWN_GRACE_SECONDS."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import text

from batchd.emulator.openai import Emulator
from tests import invariants
from tests.acceptance.conftest import Cluster, engine_for
from tests.acceptance.procs import Loader, chat_task, until, wait_settled

GRACE = 4.0


async def test_sigterm_drains_releases_claims_and_exits_zero_within_the_grace(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    # A create that hangs keeps a send in flight when the signal comes; a long
    # lease means only the drain's release can free its batch soon.
    emu.inject("create", "hang", seconds=120)
    [replica] = await cluster(shared_db, url, shutdown_grace_seconds=GRACE, lease_seconds=60)
    loader = Loader([replica])
    engine = engine_for(shared_db)
    try:
        await loader.post([chat_task(f"drain-{i}") for i in range(20)])
        await until(lambda: emu.calls["create"] > 0, what="a create in flight")
        posting = asyncio.create_task(
            loader.post_all(
                [chat_task(f"late-{i}") for i in range(400)], chunk=5, concurrency=4, pause=0.01
            )
        )
        await loader.wait_accepted(100)
        started = time.monotonic()
        code = await replica.terminate(within=GRACE + 30)
        elapsed = time.monotonic() - started
        statuses_during_drain = dict(loader.answers)
        async with engine.connect() as conn:
            held = (
                await conn.execute(
                    text("SELECT count(*) FROM batches WHERE lease_owner IS NOT NULL")
                )
            ).scalar()
        # A fresh replica picks the released batch up at once and finishes.
        [successor] = await cluster(shared_db, url, lease_seconds=60)
        loader.replicas.append(successor)
        await posting
        await wait_settled(engine, 60, replicas=[successor])
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
    finally:
        await loader.close()
        await engine.dispose()
    assert code == 0, replica.tail()
    assert elapsed < GRACE + 5, elapsed
    assert held == 0
    drained = replica.events("service.stopped")
    assert drained and replica.events("service.claims_released")[0]["batches"] >= 1
    # While draining, ingest said 503 (then the port closed); every 202 is stored.
    assert statuses_during_drain.get(503, 0) + statuses_during_drain.get("connection", 0) > 0
    assert report.ok, report.violations
    assert report.by_state == {"succeeded": 420}
