"""Migrations run online: on a table with history, the retention migration
(0010), the smaller-rows one (0012) and the providers one (0013) never hold
ingest back longer than a bound while they change the catalog and build or
drop indexes, and they keep
every row through a downgrade and back. (The same at 10,000,000 tasks, with
0011 too: the benchmark's migrations row.)"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from alembic import command

from batchd.service import alembic_config
from batchd.store.engine import async_url
from tests.conftest import _admin, _with_db

BEFORE = "0009_jobs"
ROWS = 200_000
# An insert may wait for the catalog-only ALTERs (milliseconds); a scan or an
# index build under a lock that blocks writers would take far longer.
BOUND_SECONDS = 0.5


@pytest.fixture
def seeded_db(pg_admin_url: str) -> Iterator[str]:
    name = f"batchd_o_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(pg_admin_url, f'CREATE DATABASE "{name}"'))
    url = _with_db(pg_admin_url, name)
    command.upgrade(alembic_config(async_url(url)), BEFORE)
    asyncio.run(_seed(url))
    yield url
    asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://")


async def _seed(url: str) -> None:
    conn = await asyncpg.connect(_plain(url))
    try:
        await conn.execute(f"""
            INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes,
                               state, finished_at)
            SELECT 'old-' || i, '/v1/chat/completions', 'gpt-4o-mini',
                   jsonb_build_object('model', 'gpt-4o-mini', 'n', i), md5(i::text), 100,
                   CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'succeeded' END, now()
            FROM generate_series(1, {ROWS}) i""")
        await conn.execute(f"""
            INSERT INTO results (custom_id, batch_id, status_code, response)
            SELECT 'old-' || i, 'b', 200, '{{}}' FROM generate_series(1, {ROWS}) i
            WHERE i % 10 <> 0""")
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def _insert_while(url: str, done: threading.Event) -> list[float]:
    """Single-task inserts, one after another, until ``done``: each one's time."""
    conn = await asyncpg.connect(_plain(url))
    waits: list[float] = []
    try:
        i = 0
        while not done.is_set():
            t0 = time.perf_counter()
            await conn.execute(
                """
                INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes)
                VALUES ($1, '/v1/chat/completions', 'gpt-4o-mini', '{}', 'd', 10)""",
                f"new-{i}",
            )
            waits.append(time.perf_counter() - t0)
            i += 1
            await asyncio.sleep(0.005)
    finally:
        await conn.close()
    return waits


def _upgrade_while_inserting(url: str, target: str) -> tuple[list[float], float]:
    """Upgrade to ``target`` while single-task inserts go on: each insert's
    time, and the migration's."""
    done = threading.Event()
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            command.upgrade(alembic_config(async_url(url)), target)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            done.set()

    async def run() -> tuple[list[float], float]:
        worker = threading.Thread(target=migrate)
        t0 = time.perf_counter()
        worker.start()
        waits = await _insert_while(url, done)
        worker.join()
        return waits, time.perf_counter() - t0

    waits, took = asyncio.run(run())
    assert not errors, errors
    return waits, took


def test_the_retention_migration_never_blocks_ingest_beyond_a_bound(seeded_db: str) -> None:
    waits, took = _upgrade_while_inserting(seeded_db, "0010_retention")
    # The inserts ran all along the migration, and none waited long.
    assert waits and max(waits) < BOUND_SECONDS, (waits, took)

    async def rows() -> tuple[int, int, int]:
        conn = await asyncpg.connect(_plain(seeded_db))
        try:
            return (
                await conn.fetchval("SELECT count(*) FROM tasks WHERE custom_id LIKE 'old-%'"),
                await conn.fetchval("SELECT count(*) FROM results"),
                await conn.fetchval("SELECT count(*) FROM tasks WHERE body IS NULL"),
            )
        finally:
            await conn.close()

    assert asyncio.run(rows()) == (ROWS, ROWS - ROWS // 10, 0)
    cfg = alembic_config(async_url(seeded_db))
    command.downgrade(cfg, BEFORE)
    command.upgrade(cfg, "head")
    assert asyncio.run(rows())[:2] == (ROWS, ROWS - ROWS // 10)


def test_the_lean_rows_migration_never_blocks_ingest_beyond_a_bound(seeded_db: str) -> None:
    command.upgrade(alembic_config(async_url(seeded_db)), "0011_client_task_key")
    waits, took = _upgrade_while_inserting(seeded_db, "0012_lean_rows")
    assert waits and max(waits) < BOUND_SECONDS, (waits, took)

    async def indexes() -> set[str]:
        conn = await asyncpg.connect(_plain(seeded_db))
        try:
            return {
                r[0]
                for r in await conn.fetch(
                    "SELECT indexname FROM pg_indexes WHERE tablename IN ('tasks', 'task_events')"
                )
            }
        finally:
            await conn.close()

    found = asyncio.run(indexes())
    assert "tasks_batch_held" in found
    assert not found & {"tasks_batch", "task_events_custom_id"}


def test_the_providers_migration_never_blocks_ingest_beyond_a_bound(seeded_db: str) -> None:
    command.upgrade(alembic_config(async_url(seeded_db)), "0012_lean_rows")
    waits, took = _upgrade_while_inserting(seeded_db, "0013_providers")
    assert waits and max(waits) < BOUND_SECONDS, (waits, took)

    async def state() -> tuple[int, set[str]]:
        conn = await asyncpg.connect(_plain(seeded_db))
        try:
            # Every task stored before, and during, the upgrade is OpenAI's.
            return (
                await conn.fetchval("SELECT count(*) FROM tasks WHERE provider <> 'openai'"),
                {
                    r[0]
                    for r in await conn.fetch(
                        "SELECT indexname FROM pg_indexes WHERE tablename = 'tasks'"
                    )
                },
            )
        finally:
            await conn.close()

    others, found = asyncio.run(state())
    assert others == 0 and "tasks_queued_provider" in found and "tasks_queued_lane" not in found
