"""Shared fixtures: a real PostgreSQL (template database cloned per test), the
provider emulator over a real socket, and the real openai SDK adapter.

The server is BATCHD_TEST_DATABASE_URL, else the local one on 127.0.0.1:5432,
else an embedded pgserver started for the session.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic import command
from sqlalchemy import make_url

from batchd.store.engine import async_url

_LOCAL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _admin_url(tmp_root: Path) -> str:
    explicit = os.environ.get("BATCHD_TEST_DATABASE_URL")
    if explicit:
        return explicit
    if _port_open("127.0.0.1", 5432):
        return _LOCAL
    import pgserver

    server = pgserver.get_server(  # type: ignore[attr-defined]
        str(tmp_root / "pg"),
        cleanup_mode="stop",
    )
    uri: str = server.get_uri()
    return uri


def _with_db(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def _admin(url: str, sql: str) -> None:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {
        "user": parsed.username or "postgres",
        "password": parsed.password,
        "database": parsed.database,
    }
    host = parsed.query.get("host") or parsed.host or "127.0.0.1"
    kwargs["host"] = host if isinstance(host, str) else host[0]
    if parsed.port:
        kwargs["port"] = parsed.port
    conn = await asyncpg.connect(**kwargs)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _admin_url(tmp_path_factory.mktemp("pgserver"))


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A database migrated to head once per session, cloned by every test."""
    from batchd.service import alembic_config

    name = f"batchd_tpl_{os.getpid()}"
    asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}"'))
    asyncio.run(_admin(pg_admin_url, f'CREATE DATABASE "{name}"'))
    command.upgrade(alembic_config(async_url(_with_db(pg_admin_url, name))), "head")
    yield name
    asyncio.run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db_url(pg_admin_url: str, template_db: str) -> AsyncIterator[str]:
    name = f"batchd_t_{uuid.uuid4().hex[:12]}"
    await _admin(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield async_url(_with_db(pg_admin_url, name))
    await _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test, never from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("BATCHD_") and key != "BATCHD_TEST_DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
