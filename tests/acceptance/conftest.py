"""Fixtures for process-level tests: replicas of ``batchd serve`` as real
subprocesses, the emulator over a real socket, and a private PostgreSQL
that the tests may stop and restart (never the shared server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command

from batchd.emulator.openai import Emulator
from batchd.store.engine import async_url, make_engine
from tests.acceptance.procs import (
    API_KEY,
    PrivatePostgres,
    Replica,
    find_pg_bindir,
    replica_env,
)
from tests.conftest import _admin

# Fast clocks for everything: windows, polls, retries and leases in fractions
# of a second, so a crash and its recovery fit in a few seconds.
FAST = {
    "window_seconds": 0.3,
    "max_batch_items": 50,
    "poll_interval_seconds": 0.2,
    "scheduler_interval_seconds": 0.2,
    "retry_backoff_seconds": 0.2,
    "lease_seconds": 2,
    "shutdown_grace_seconds": 10,
}


@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    bindir = find_pg_bindir()
    if bindir is None:
        pytest.skip(
            "no initdb/pg_ctl found (looked in BATCHD_TEST_PG_BINDIR, "
            "/usr/lib/postgresql/*/bin, pg_config --bindir and pgserver): "
            "cannot start a private PostgreSQL to restart"
        )
    pg = PrivatePostgres(bindir)
    pg.init()
    try:
        yield pg
    finally:
        pg.destroy()


@pytest.fixture
async def private_db(private_pg: PrivatePostgres) -> AsyncIterator[str]:
    """A fresh database at head on the private server (plain postgresql:// URL)."""
    from batchd.service import alembic_config

    if not _pg_up(private_pg):
        private_pg.start()  # a test that stopped it may have failed before restarting
    name = f"batchd_c_{uuid.uuid4().hex[:10]}"
    await _admin(private_pg.url, f'CREATE DATABASE "{name}"')
    url = private_pg.url.rsplit("/", 1)[0] + f"/{name}"
    await asyncio.to_thread(command.upgrade, alembic_config(async_url(url)), "head")
    yield url
    if not _pg_up(private_pg):
        private_pg.start()
    await _admin(private_pg.url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_up(pg: PrivatePostgres) -> bool:
    from tests.conftest import _port_open

    return _port_open("127.0.0.1", pg.port)


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[Emulator, str]]:
    emu = Emulator(api_key=API_KEY)
    url = await emu.start()
    try:
        yield emu, url
    finally:
        await emu.stop()


Cluster = Callable[..., Awaitable[list[Replica]]]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """``await cluster(db_url, emulator_url, n, **settings)`` starts n replicas;
    every one still running is killed at teardown."""
    made: list[Replica] = []

    async def start(
        db_url: str, emulator_url: str, n: int = 1, *, crash_at: str | None = None, **settings: Any
    ) -> list[Replica]:
        env = replica_env(db_url, emulator_url, **{**FAST, **settings})
        new = [Replica(f"r{len(made) + i}", env, tmp_path) for i in range(n)]
        made.extend(new)
        await asyncio.gather(*(r.start(crash_at=crash_at) for r in new))
        return new

    yield start
    for r in made:
        await r.kill()


@pytest.fixture
async def shared_db(db_url: str) -> str:
    """A template clone on the shared server, as a plain postgresql:// URL."""
    return db_url.replace("postgresql+asyncpg://", "postgresql://")


def engine_for(url: str) -> Any:
    return make_engine(async_url(url), pool_size=2)
