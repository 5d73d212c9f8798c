"""Several ``batchd serve`` processes on one database share ingest,
scheduling, polling and routing with row claims; a replica that dies holding
a claim gives it up when its lease lapses."""

from __future__ import annotations

import collections

import pytest
from sqlalchemy import text

from batchd.emulator.openai import Emulator
from batchd.faults import EXIT_CODE
from tests import invariants
from tests.acceptance.conftest import Cluster, engine_for
from tests.acceptance.procs import Loader, chat_task, wait_settled

pytestmark = pytest.mark.chaos

LEASE = 2.0


async def test_three_replicas_share_the_work_and_nothing_is_done_twice(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    replicas = await cluster(shared_db, url, 3, lease_seconds=LEASE)
    loader = Loader(replicas, seed=3)
    tasks = [
        chat_task(f"share-{i}", emulate="http_500*1" if i % 10 == 0 else None) for i in range(1500)
    ]
    engine = engine_for(shared_db)
    try:
        await loader.post_all(tasks, chunk=50, concurrency=6)
        await wait_settled(engine, 120, replicas=replicas)
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    assert report.by_state == {"succeeded": 1500}
    flushed = collections.Counter(
        e["batch_id"] for r in replicas for e in r.events("batch.flushed")
    )
    routed = collections.Counter(e["batch_id"] for r in replicas for e in r.events("batch.routed"))
    # Every batch was flushed by exactly one replica and routed by exactly one.
    assert set(flushed.values()) == {1} and set(routed.values()) == {1}
    assert flushed.keys() == routed.keys() and len(flushed) == report.provider_batches
    workers = {
        r.name
        for r in replicas
        for e in r.events()
        if e.get("event") in ("batch.flushed", "batch.routed")
    }
    print(
        f"\nreplicas: batches={len(flushed)} "
        f"flushed_by={[len(r.events('batch.flushed')) for r in replicas]} "
        f"routed_by={[len(r.events('batch.routed')) for r in replicas]}"
    )
    assert len(workers) >= 2, "one replica did all the scheduling and routing"


async def test_a_replica_killed_mid_claim_releases_its_batch_when_the_lease_lapses(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    # The victim dies right after committing its claim (batch row + tasks),
    # before anything reaches the provider; the others see a leased batch.
    others = await cluster(shared_db, url, 2, lease_seconds=LEASE, window_seconds=3600)
    [victim] = await cluster(
        shared_db, url, crash_at="after_claim", lease_seconds=LEASE, window_seconds=0.2
    )
    loader = Loader([victim])
    engine = engine_for(shared_db)
    try:
        await loader.post([chat_task(f"lease-{i}") for i in range(20)])
        assert await victim.wait(60) == EXIT_CODE
        [flushed] = victim.events("batch.flushed")
        await wait_settled(engine, 60, replicas=others)
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text("""
                SELECT extract(epoch FROM submitted_at - created_at) AS waited, submit_attempts
                FROM batches WHERE id = :id"""),
                    {"id": flushed["batch_id"]},
                )
            ).one()
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    assert report.by_state == {"succeeded": 20} and report.provider_batches == 1
    # Nobody touched the batch while the dead replica's lease was valid; a
    # survivor sent it (once) soon after it lapsed.
    assert row.submit_attempts == 2
    assert LEASE <= float(row.waited) < LEASE + 30
    adopters = [
        r.name
        for r in others
        for e in r.events("batch.submitted")
        if e["batch_id"] == flushed["batch_id"]
    ]
    assert len(adopters) == 1


async def test_a_replica_killed_while_routing_leaves_the_batch_to_another(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    [victim] = await cluster(shared_db, url, crash_at="mid_route", lease_seconds=LEASE)
    loader = Loader([victim])
    engine = engine_for(shared_db)
    try:
        await loader.post([chat_task(f"reroute-{i}") for i in range(30)])
        assert await victim.wait(60) == EXIT_CODE
        survivors = await cluster(shared_db, url, 2, lease_seconds=LEASE)
        await wait_settled(engine, 60, replicas=survivors)
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    assert report.by_state == {"succeeded": 30}
    routed_by = [r.name for r in survivors for _ in r.events("batch.routed")]
    assert len(routed_by) == 1
