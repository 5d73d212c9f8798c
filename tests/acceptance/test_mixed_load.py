"""Issue 3's closing check, as processes: ``batchd serve`` pointed at a
standalone emulator (``python -m batchd.emulator.openai``) with a 2 s window
and a cap of 40 takes 400 mixed tasks to the right terminal state, and no
batch is ever over the cap."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from sqlalchemy import text

from tests import invariants
from tests.acceptance.conftest import Cluster, engine_for
from tests.acceptance.procs import API_KEY, Loader, chat_task, free_port, wait_settled

MIX = {  # marker → (state, attempts, last error code)
    None: ("succeeded", 1, None),
    "http_500*2": ("succeeded", 3, None),
    "http_400": ("failed", 1, "context_length_exceeded"),
    "http_429": ("failed", 3, "rate_limit_exceeded"),
}


@pytest.fixture
async def standalone_emulator() -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd.emulator.openai",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert b"listening" in line, line
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        await proc.wait()


async def test_400_mixed_tasks_reach_the_right_state_in_batches_within_the_cap(
    shared_db: str, standalone_emulator: str, cluster: Cluster
) -> None:
    [replica] = await cluster(
        shared_db, standalone_emulator, window_seconds=2, max_batch_items=40, max_attempts=3
    )
    markers = list(MIX)
    tasks = [chat_task(f"mix-{i}", emulate=markers[i % 4]) for i in range(400)]
    loader = Loader([replica])
    engine = engine_for(shared_db)
    try:
        # Trickled in, so both timeout and cap flushes happen.
        await loader.post_all(tasks, chunk=20, concurrency=1, pause=0.1)
        await wait_settled(engine, 120, replicas=[replica])
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{standalone_emulator.removesuffix('/v1')}/_emulator/record",
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as resp,
        ):
            record = await resp.json()
        report = await invariants.check(engine, record, accepted=loader.accepted)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT custom_id, state, attempts, last_error->>'code' FROM tasks")
                )
            ).all()
            sizes = (await conn.execute(text("SELECT item_count, flush_reason FROM batches"))).all()
    finally:
        await loader.close()
        await engine.dispose()
    assert report.ok, report.violations
    for cid, state, attempts, code in rows:
        expected = MIX[markers[int(cid.split("-")[1]) % 4]]
        assert (state, attempts, code) == expected, cid
    assert max(len(b["custom_ids"]) for b in record["batches"]) <= 40
    assert max(n for n, _ in sizes) <= 40
    reasons = collections.Counter(reason for _, reason in sizes)
    assert reasons["cap"] >= 1, reasons
