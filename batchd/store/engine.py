"""Database engine: the configured PostgreSQL, or an embedded one (pgserver)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from batchd.errors import ConfigError


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def async_url(url: str) -> str:
    """Accept postgres://, postgresql:// or postgresql+asyncpg:// URLs."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a vague text
        raise ConfigError(f"BATCHD_DATABASE_URL: not a database URL ({exc})") from None
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg2", "postgresql+asyncpg"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ConfigError("BATCHD_DATABASE_URL: must be a postgresql:// URL")


def embedded_url(data_dir: Path) -> str:
    """Start (or join) a PostgreSQL server living in ``data_dir/pg``.

    pgserver shares the server between processes using the same directory
    and stops it when the last of them exits, so neither `serve` nor `demo`
    leaves a database running behind it. One killed with -9 leaves it up;
    the next start joins it.
    """
    import pgserver

    pgdir = (data_dir / "pg").resolve()
    pgdir.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(pgdir), cleanup_mode="stop")  # type: ignore[attr-defined]
    uri: str = server.get_uri()
    return async_url(uri)


async def resolve_url(database_url: str | None, data_dir: Path) -> str:
    if database_url:
        return async_url(database_url)
    return await asyncio.to_thread(embedded_url, data_dir)


def make_engine(url: str, pool_size: int = 10, pool_timeout: float = 30.0) -> AsyncEngine:
    """``pool_timeout``: how long a caller waits for a free connection before
    sqlalchemy's TimeoutError (the API answers 503 to it)."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
        pool_recycle=1800,
        # Statement parameters hold task bodies and responses: keep them out
        # of the error texts that end up in logs.
        hide_parameters=True,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        # No JIT: every statement here is short, and on a deep queue the
        # planner's cost estimate crosses jit_above_cost and spends half a
        # second compiling a query that runs in milliseconds, every tick.
        connect_args={
            "server_settings": {"application_name": "batchd", "jit": "off"},
            "timeout": 10,
        },
    )


async def schema_version(conn: AsyncConnection) -> str | None:
    """The newest migration applied to this database (None: stamped with none)."""
    row = await conn.execute(text("SELECT version_num FROM alembic_version"))
    return row.scalar_one_or_none()
