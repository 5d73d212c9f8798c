"""kill -9 at the worst instants, then restart: every accepted task reaches
exactly one terminal state, nothing is submitted or stored twice.

Each test runs real ``batchd serve`` processes against the emulator over a
socket. ``BATCHD_CRASH_AT`` makes a replica die (``os._exit``, no cleanup)
at a named point; a plain kill -9 covers the instants in between.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchd.emulator.openai import Emulator
from batchd.faults import EXIT_CODE
from tests import invariants
from tests.acceptance.conftest import Cluster, engine_for
from tests.acceptance.procs import Loader, chat_task, wait_settled

pytestmark = pytest.mark.chaos


async def _crash_then_recover(
    shared_db: str,
    emulator: tuple[Emulator, str],
    cluster: Cluster,
    point: str,
    tasks: list[dict[str, Any]],
) -> invariants.Report:
    emu, url = emulator
    [victim] = await cluster(shared_db, url, crash_at=point)
    loader = Loader([victim])
    try:
        await loader.post(tasks)
    finally:
        await loader.close()
    assert await victim.wait(60) == EXIT_CODE, victim.tail()
    [survivor] = await cluster(shared_db, url)
    engine = engine_for(shared_db)
    try:
        await wait_settled(engine, 60, replicas=[survivor])
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
    finally:
        await engine.dispose()
    assert report.ok, report.violations
    assert report.tasks == len(tasks)
    return report


def _tasks(n: int, prefix: str) -> list[dict[str, Any]]:
    return [chat_task(f"{prefix}-{i}") for i in range(n)]


async def test_crash_between_batch_commit_and_upload_resends_once(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    report = await _crash_then_recover(
        shared_db, emulator, cluster, "after_claim", _tasks(30, "claim")
    )
    assert report.by_state == {"succeeded": 30}
    assert report.provider_batches == 1


async def test_crash_after_upload_creates_one_batch(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    report = await _crash_then_recover(
        shared_db, emulator, cluster, "after_upload", _tasks(30, "upload")
    )
    assert report.by_state == {"succeeded": 30}
    assert report.provider_batches == 1


async def test_crash_after_create_adopts_the_provider_batch(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, _ = emulator
    report = await _crash_then_recover(
        shared_db, emulator, cluster, "after_create", _tasks(30, "create")
    )
    assert report.by_state == {"succeeded": 30}
    # The batch created before the crash was found by our id and adopted.
    assert report.provider_batches == 1
    assert emu.calls["upload"] == 1 and emu.calls["create"] == 1


async def test_crash_halfway_through_routing_stores_each_result_once(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    # The output file's successes are settled first, a chunk a transaction:
    # the crash lands after the first chunk committed and before the error
    # file's retries; the route resumed by the survivor stores the rest.
    tasks = _tasks(40, "route") + [
        chat_task(f"route-retry-{i}", emulate="http_500*1") for i in range(10)
    ]
    report = await _crash_then_recover(shared_db, emulator, cluster, "mid_route", tasks)
    assert report.by_state == {"succeeded": 50}


async def test_crash_after_routing_commits_keeps_the_routing(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    report = await _crash_then_recover(
        shared_db, emulator, cluster, "after_route", _tasks(20, "routed")
    )
    assert report.by_state == {"succeeded": 20}
    assert report.provider_batches == 1


async def test_kill_while_ingesting_keeps_every_accepted_task(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    [replica] = await cluster(shared_db, url)
    loader = Loader([replica])
    tasks = _tasks(2000, "ingest")
    posting = asyncio.create_task(loader.post_all(tasks, chunk=50, concurrency=8))
    await loader.wait_accepted(300)
    await replica.kill()
    accepted_before = set(loader.accepted)
    await replica.start()
    await posting
    engine = engine_for(shared_db)
    try:
        await wait_settled(engine, 90, replicas=[replica])
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    assert accepted_before <= loader.accepted and report.tasks == len(tasks)
    assert report.by_state == {"succeeded": len(tasks)}
