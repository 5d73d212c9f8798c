"""The schema: built from nothing by Alembic, matching tables.py, fully reversible."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from batchd.service import alembic_config, schema_head
from batchd.store.engine import async_url
from batchd.store.tables import metadata
from tests.conftest import _admin, _with_db


@pytest.fixture
def empty_db(pg_admin_url: str) -> Iterator[str]:
    name = f"batchd_m_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(pg_admin_url, f'CREATE DATABASE "{name}"'))
    yield _with_db(pg_admin_url, name)
    asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _tables(url: str) -> set[str]:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def names() -> set[str]:
        engine = create_async_engine(async_url(url))
        async with engine.connect() as conn:
            found = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        await engine.dispose()
        return found
    return asyncio.run(names())


def _diff(url: str) -> list[object]:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> list[object]:
        engine = create_async_engine(async_url(url))
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), metadata))
        await engine.dispose()
        return list(diff)
    return asyncio.run(run())


def _version(url: str) -> str | None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> str | None:
        engine = create_async_engine(async_url(url))
        async with engine.connect() as conn:
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))
                       ).scalar_one_or_none()
        await engine.dispose()
        return version
    return asyncio.run(run())


def test_upgrade_builds_the_schema_tables_py_describes(empty_db: str) -> None:
    command.upgrade(alembic_config(async_url(empty_db)), "head")
    assert {"tasks", "batches", "results", "task_events", "alembic_version"} <= _tables(empty_db)
    assert _diff(empty_db) == []


def test_every_migration_downgrades_and_upgrades_again(empty_db: str) -> None:
    cfg = alembic_config(async_url(empty_db))
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "base")
    assert _tables(empty_db) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    assert _diff(empty_db) == []
    assert _version(empty_db) == schema_head()
