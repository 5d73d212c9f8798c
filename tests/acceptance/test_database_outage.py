"""PostgreSQL stops or restarts under running replicas: they stay up, ingest
answers 503 with Retry-After (never 202 for a task it could not store), the
loops back off, and everything resumes by itself when the database returns.

These tests stop and start a private server of their own (fixture
``private_pg``), never the shared one.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from batchd.emulator.openai import Emulator
from tests import invariants
from tests.acceptance.conftest import Cluster, engine_for
from tests.acceptance.procs import Loader, PrivatePostgres, chat_task, wait_settled

pytestmark = pytest.mark.chaos


async def test_database_down_means_503_then_everything_resumes(
    private_pg: PrivatePostgres, private_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    replicas = await cluster(private_db, url, 2)
    loader = Loader(replicas)
    engine = engine_for(private_db)
    try:
        await loader.post_all([chat_task(f"before-{i}") for i in range(100)], chunk=25)
        await wait_settled(engine, 60, replicas=replicas)
        await engine.dispose()

        private_pg.stop("immediate")
        down_at = time.monotonic()
        answers = []
        async with aiohttp.ClientSession() as http:
            for n in range(12):
                r = replicas[n % 2]
                body = orjson.dumps({"tasks": [chat_task(f"during-{n}")]})
                async with http.post(
                    f"{r.url}/v1/tasks", data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    answers.append(
                        (
                            resp.status,
                            resp.headers.get("Retry-After"),
                            (await resp.json())["error"]["code"],
                        )
                    )
                async with http.get(f"{r.url}/healthz") as resp:
                    assert resp.status == 200
                async with http.get(f"{r.url}/readyz") as resp:
                    assert resp.status == 503
                await asyncio.sleep(0.5)
        outage = time.monotonic() - down_at
        assert all(r.alive for r in replicas)
        # None of those requests could be stored, and none was acknowledged.
        assert {a[0] for a in answers} == {503}, answers
        assert all(a[1] and int(a[1]) > 0 for a in answers)
        private_pg.start()

        await loader.post_all([chat_task(f"after-{i}") for i in range(100)], chunk=25)
        await wait_settled(engine, 90, replicas=replicas)
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    # The requests made during the outage were refused and are not stored.
    assert report.by_state == {"succeeded": 200}
    for r in replicas:
        failed = [e for e in r.events("scheduler.tick_failed")]
        assert failed, r.tail()
        # Backing off: consecutive failures are counted, and there were far
        # fewer failed ticks than the 0.2 s tick would make in the outage.
        assert max(e["failures"] for e in failed) >= 3
        assert len(failed) < outage / 0.2 / 2


async def test_restart_while_ingesting_never_acknowledges_an_unstored_task(
    private_pg: PrivatePostgres, private_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    replicas = await cluster(private_db, url, 2)
    loader = Loader(replicas, seed=7)
    engine = engine_for(private_db)
    tasks = [chat_task(f"restart-{i}") for i in range(3000)]
    try:
        posting = asyncio.create_task(loader.post_all(tasks, chunk=10, concurrency=4, pause=0.01))
        await loader.wait_accepted(600)
        private_pg.stop("immediate")
        await asyncio.sleep(2)
        private_pg.start()
        await posting
        await wait_settled(engine, 120, replicas=replicas)
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    assert report.by_state == {"succeeded": 3000}
    assert all(r.alive for r in replicas)
    assert loader.answers.get(503, 0) + loader.answers.get("connection", 0) > 0, loader.answers
