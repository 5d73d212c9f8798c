"""Alembic environment, async: runs migrations over the asyncpg engine.

The URL comes from ``config.attributes["url"]`` when batchd calls Alembic in
process, else from BATCHD_DATABASE_URL (or the embedded server).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from batchd.config import load_settings
from batchd.store.engine import resolve_url
from batchd.store.tables import metadata

config = context.config
target_metadata = metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      compare_type=True, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    url = config.attributes.get("url")
    if url is None:
        settings = load_settings()
        url = await resolve_url(settings.database_url, settings.data_dir)
    engine = create_async_engine(url)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("batchd migrations run online only: give a database URL")

connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    asyncio.run(_run_async())
