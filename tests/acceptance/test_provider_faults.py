"""Provider faults seen by a running daemon: 5xx, 429 with retry-after,
timeouts and connection resets on every call, truncated and malformed
output, a batch stuck in finalizing, an expired batch, a duplicate batch.

tests/integration/test_openai_adapter.py already pins how the adapter maps
each fault to a ProviderError; these tests check what the daemon then does:
retry with bounded backoff that respects retry-after, count the fault in
``batchd_provider_requests_total{operation,code}``, log it, and still settle
every task exactly once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from batchd.emulator.openai import Emulator
from batchd.provider.openai import OpenAIProvider
from tests import invariants
from tests.acceptance.conftest import Cluster, engine_for
from tests.acceptance.procs import (
    API_KEY,
    Loader,
    chat_task,
    provider_requests,
    wait_settled,
)

pytestmark = pytest.mark.chaos

# Exhausting the SDK's own two retries makes a fault reach the daemon.
SDK_TRIES = 3


async def test_faults_on_every_call_are_retried_counted_and_logged(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    emu.inject("upload", "http_503", times=SDK_TRIES)
    emu.inject("list_batches", "reset_before", times=SDK_TRIES)
    emu.inject("create", "http_429", retry_after=1)
    emu.inject("create", "timeout_after_commit", seconds=5)  # lands, then no answer
    emu.inject("retrieve", "http_500", times=SDK_TRIES)
    emu.inject("retrieve", "http_429", times=SDK_TRIES, retry_after=2)
    emu.inject("retrieve", "hang", times=SDK_TRIES, seconds=10)
    emu.inject("download", "truncate", mode="content_length")
    emu.inject("download", "reset_before", times=SDK_TRIES)
    [replica] = await cluster(shared_db, url, provider_timeout_seconds=1, lease_seconds=4)
    loader = Loader([replica])
    engine = engine_for(shared_db)
    try:
        await loader.post([chat_task(f"fault-{i}") for i in range(20)])
        await wait_settled(engine, 120, replicas=[replica])
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
        counted = await provider_requests(replica)
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    assert report.by_state == {"succeeded": 20}
    # The create that timed out after landing was found and adopted, not repeated.
    assert report.provider_batches == 1
    assert any(e["adopted"] for e in replica.events("batch.submitted"))
    for key in [
        ("upload_file", "503"),
        ("list_batches", "error"),
        ("create_batch", "429"),
        ("create_batch", "error"),
        ("get_batch", "500"),
        ("get_batch", "429"),
        ("get_batch", "error"),
        ("download_file", "error"),
        ("get_batch", "200"),
    ]:
        assert counted.get(key, 0) >= 1, (key, counted)
    assert counted[("download_file", "error")] >= 2
    sends = replica.events("batch.send_failed")
    assert {(e["operation"], e["status"]) for e in sends} >= {
        ("upload_file", 503),
        ("list_batches", None),
        ("create_batch", 429),
        ("create_batch", None),
    }
    # retry-after is respected, with at most 20% jitter on top.
    [limited] = [e for e in sends if e["status"] == 429]
    assert 1.0 <= limited["retry_in"] <= 1.2
    checks = replica.events("batch.check_failed")
    assert {e["status"] for e in checks} >= {500, 429, None}
    assert all(e["retry_in"] == 2 for e in checks if e["status"] == 429)
    print(f"\nfaults applied: {dict(emu.faults_applied)}")


async def test_truncated_malformed_stuck_and_expired_batches_settle_once(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster
) -> None:
    emu, url = emulator
    emu.script_batch("stuck_finalizing", seconds=3)
    emu.script_batch("expire", run_fraction=0.5)
    emu.inject("download", "truncate", mode="clean", fraction=0.6)
    tasks = [
        chat_task(f"out-{i}", emulate="malformed*1" if i % 7 == 0 else None) for i in range(100)
    ]
    [replica] = await cluster(shared_db, url, max_batch_items=50)
    loader = Loader([replica])
    engine = engine_for(shared_db)
    try:
        await loader.post(tasks)
        saw_finalizing = False

        async def finalizing() -> bool:
            async with engine.connect() as conn:
                return bool(
                    (
                        await conn.execute(
                            text(
                                "SELECT count(*) FROM batches WHERE provider_status = 'finalizing'"
                            )
                        )
                    ).scalar()
                )

        for _ in range(600):
            if await finalizing():
                saw_finalizing = True
                break
            await asyncio.sleep(0.05)
        await wait_settled(engine, 120, replicas=[replica])
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
        async with engine.connect() as conn:
            statuses = sorted(
                r[0] for r in await conn.execute(text("SELECT provider_status FROM batches"))
            )
            attempts = dict(
                (await conn.execute(text("SELECT custom_id, attempts FROM tasks"))).all()
            )
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    assert report.by_state == {"succeeded": 100}
    assert saw_finalizing, "the stuck batch was never seen in finalizing"
    assert "expired" in statuses and statuses.count("completed") >= 2
    # Malformed lines and the expired half were submitted again, once.
    assert all(attempts[f"out-{i}"] >= 2 for i in range(0, 100, 7))
    assert max(attempts.values()) <= 3
    assert [e for e in replica.events("batch.check_failed") if e["operation"] == "download_file"]


async def test_a_duplicate_provider_batch_is_cancelled_before_it_runs(
    shared_db: str, emulator: tuple[Emulator, str], cluster: Cluster, tmp_path: Path
) -> None:
    emu, url = emulator
    emu.validating_seconds = 12  # long enough to cancel the duplicate before it runs
    [victim] = await cluster(shared_db, url, crash_at="after_create")
    loader = Loader([victim])
    engine = engine_for(shared_db)
    provider = OpenAIProvider(api_key=API_KEY, base_url=url, max_retries=0)
    try:
        await loader.post([chat_task(f"dup-{i}") for i in range(10)])
        assert await victim.wait(60) != 0
        # The create landed twice (as a retried create can): same file, same id.
        [first] = emu.batches.values()
        await provider.create_batch(
            first.input_file_id, first.endpoint, "24h", dict(first.metadata or {})
        )
        emu.inject("cancel", "http_500")
        [survivor] = await cluster(shared_db, url)
        loader.replicas.append(survivor)
        await wait_settled(engine, 60, replicas=[survivor])
        report = await invariants.check(engine, emu.record(), accepted=loader.accepted)
        counted = await provider_requests(survivor)
    finally:
        await provider.close()
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    assert report.by_state == {"succeeded": 10}
    # Either may be kept (creation times tie within a second); one ran, one never did.
    kept, dup = sorted(emu.batches.values(), key=lambda b: b.status != "completed")
    assert kept.status == "completed"
    assert dup.status == "cancelled" and dup.request_counts["completed"] == 0
    assert counted[("cancel_batch", "500")] == 1 and counted[("cancel_batch", "200")] == 1
    assert [e for e in survivor.events("batch.duplicate_cancelled")]
