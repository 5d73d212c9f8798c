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
                lambda c: compare_metadata(MigrationContext.configure(c), metadata)
            )
        await engine.dispose()
        return list(diff)

    return asyncio.run(run())


def _version(url: str) -> str | None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> str | None:
        engine = create_async_engine(async_url(url))
        async with engine.connect() as conn:
            version = (
                await conn.execute(text("SELECT version_num FROM alembic_version"))
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


def _sql(url: str, sql: str) -> list[tuple[object, ...]]:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> list[tuple[object, ...]]:
        engine = create_async_engine(async_url(url))
        async with engine.begin() as conn:
            result = await conn.execute(text(sql))
            rows = [tuple(r) for r in result] if result.returns_rows else []
        await engine.dispose()
        return rows

    return asyncio.run(run())


_OLD_ROWS = """
INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes, state, client,
                   callback_url)
VALUES ('anon-1', '/v1/chat/completions', 'm', '{}', 'd', 2, 'succeeded', NULL,
        'http://127.0.0.1/cb'),
       ('named-1', '/v1/chat/completions', 'm', '{}', 'd', 2, 'failed', 'billing', NULL);
INSERT INTO results (custom_id, batch_id, status_code, response)
VALUES ('anon-1', 'bd_1', 200, '{}'), ('gone', 'bd_1', 200, '{}');
INSERT INTO task_events (custom_id, batch_id, attempt, outcome)
VALUES ('anon-1', 'bd_1', 1, 'succeeded'), ('named-1', 'bd_1', 1, 'failed'),
       ('gone', 'bd_1', 1, 'succeeded');
INSERT INTO callbacks (custom_id, client, url, task_state, task_attempts)
VALUES ('anon-1', NULL, 'http://127.0.0.1/cb', 'succeeded', 1);
INSERT INTO sync_spend (claim_id, custom_id, model, spend_day, reserved_usd)
VALUES ('sync_1', 'named-1', 'm', '2026-12-01', 0.5);
INSERT INTO batches (id, endpoint, model, flush_reason, item_count, input_bytes, spend_day)
VALUES ('bd_1', '/v1/chat/completions', 'm', 'timeout', 2, 4, '2026-12-01');
"""


def test_the_client_key_migration_keeps_every_row_and_reverses(empty_db: str) -> None:
    """0011: rows stored before clients keep their data, the anonymous ones
    under 'local'; every row finds its task by id; old batches route by
    custom_id; and the downgrade gives the old shape back."""
    cfg = alembic_config(async_url(empty_db))
    command.upgrade(cfg, "0010_retention")
    for statement in _OLD_ROWS.strip().split(";"):
        if statement.strip():
            _sql(empty_db, statement)
    command.upgrade(cfg, "0011_client_task_key")
    assert _sql(empty_db, "SELECT custom_id, client FROM tasks ORDER BY custom_id") == [
        ("anon-1", "local"),
        ("named-1", "billing"),
    ]
    assert _sql(
        empty_db,
        """
        SELECT r.custom_id, r.client, t.custom_id FROM results r
        LEFT JOIN tasks t ON t.id = r.task_id ORDER BY r.custom_id""",
    ) == [("anon-1", "local", "anon-1"), ("gone", "local", None)]
    assert _sql(
        empty_db,
        """
        SELECT e.custom_id, e.client, t.custom_id FROM task_events e
        LEFT JOIN tasks t ON t.id = e.task_id ORDER BY e.custom_id""",
    ) == [("anon-1", "local", "anon-1"), ("gone", "local", None), ("named-1", "billing", "named-1")]
    assert _sql(
        empty_db,
        """
        SELECT c.client, t.custom_id FROM callbacks c JOIN tasks t ON t.id = c.task_id""",
    ) == [("local", "anon-1")]
    assert _sql(
        empty_db,
        """
        SELECT t.custom_id FROM sync_spend s JOIN tasks t ON t.id = s.task_id""",
    ) == [("named-1",)]
    assert _sql(empty_db, "SELECT own_line_ids FROM batches") == [(False,)]
    # The new key: the same custom_id under another client is a new task.
    _sql(
        empty_db,
        """
        INSERT INTO tasks (client, custom_id, endpoint, model, body, body_digest, line_bytes)
        VALUES ('billing', 'anon-1', '/v1/chat/completions', 'm', '{}', 'd', 2)""",
    )
    with pytest.raises(Exception, match="tasks_client_custom_id"):
        _sql(
            empty_db,
            """
            INSERT INTO tasks (client, custom_id, endpoint, model, body, body_digest, line_bytes)
            VALUES ('billing', 'anon-1', '/v1/chat/completions', 'm', '{}', 'd', 2)""",
        )
    # Two clients share a custom_id: the old schema cannot hold both, so the
    # downgrade refuses and changes nothing.
    with pytest.raises(RuntimeError, match="clients share custom_ids"):
        command.downgrade(cfg, "0010_retention")
    assert _version(empty_db) == "0011_client_task_key"
    _sql(empty_db, "DELETE FROM tasks WHERE client = 'billing' AND custom_id = 'anon-1'")
    command.downgrade(cfg, "0010_retention")
    assert _sql(empty_db, "SELECT custom_id, client FROM tasks ORDER BY custom_id") == [
        ("anon-1", None),
        ("named-1", "billing"),
    ]
    assert _sql(empty_db, "SELECT count(*) FROM results") == [(2,)]


def _indexes(url: str, table: str) -> set[str]:
    found = _sql(url, f"SELECT indexname FROM pg_indexes WHERE tablename = '{table}'")
    return {str(r[0]) for r in found}


def test_the_lean_rows_migration_keeps_old_copies_and_gives_them_back(empty_db: str) -> None:
    """0012: events stored before keep their copies of the task's key, events
    after need none, succeeded tasks leave the batch index; the downgrade
    refills every copy from its task and rebuilds the old indexes."""
    cfg = alembic_config(async_url(empty_db))
    command.upgrade(cfg, "0011_client_task_key")
    _sql(
        empty_db,
        """
        INSERT INTO tasks (id, custom_id, endpoint, model, body, body_digest, line_bytes, state,
                           client, batch_id)
        VALUES (1, 'old', '/v1/chat/completions', 'm', NULL, 'd', 2, 'succeeded', 'billing',
                'bd_1'),
               (2, 'new', '/v1/chat/completions', 'm', NULL, 'd', 2, 'succeeded', 'local',
                'bd_1'),
               (3, 'held', '/v1/chat/completions', 'm', '{}', 'd', 2, 'failed', 'local',
                'bd_1')""",
    )
    _sql(
        empty_db,
        """
        INSERT INTO results (task_id, client, custom_id, batch_id, status_code, response)
        VALUES (1, 'billing', 'old', 'bd_1', 200, '{}')""",
    )
    _sql(
        empty_db,
        """
        INSERT INTO task_events (task_id, client, custom_id, batch_id, attempt, outcome)
        VALUES (1, 'billing', 'old', 'bd_1', 1, 'succeeded')""",
    )
    command.upgrade(cfg, "0012_lean_rows")
    assert "tasks_batch" not in _indexes(empty_db, "tasks")
    assert "task_events_custom_id" not in _indexes(empty_db, "task_events")
    # What batchd writes from now on: no copies of the key.
    _sql(
        empty_db,
        """
        INSERT INTO task_events (task_id, batch_id, attempt, outcome)
        VALUES (2, 'bd_1', 1, 'succeeded'), (3, 'bd_1', 1, 'failed')""",
    )
    # The batch index holds the task that did not succeed, not the two that did.
    assert _sql(
        empty_db,
        """
        SELECT count(*) FROM tasks WHERE batch_id = 'bd_1' AND state <> 'succeeded'""",
    ) == [(1,)]
    assert _sql(empty_db, "SELECT custom_id FROM task_events ORDER BY id") == [
        ("old",),
        (None,),
        (None,),
    ]
    command.downgrade(cfg, "0011_client_task_key")
    assert _sql(empty_db, "SELECT custom_id, client FROM task_events ORDER BY task_id") == [
        ("old", "billing"),
        ("new", "local"),
        ("held", "local"),
    ]
    assert {"tasks_batch"} <= _indexes(empty_db, "tasks")
    assert "tasks_batch_held" not in _indexes(empty_db, "tasks")
    assert "task_events_custom_id" in _indexes(empty_db, "task_events")
    with pytest.raises(Exception, match="custom_id"):
        _sql(
            empty_db,
            """
            INSERT INTO task_events (task_id, client, batch_id, attempt, outcome)
            VALUES (3, 'local', 'bd_1', 1, 'failed')""",
        )
    command.upgrade(cfg, "head")
    assert _diff(empty_db) == []


def test_the_providers_migration_keeps_old_rows_at_openai_and_reverses(empty_db: str) -> None:
    """0013: every task and batch stored before providers was OpenAI's and
    stays so (a constant default, no rewrite); the window index leads with
    the provider; the downgrade gives the old index back."""
    cfg = alembic_config(async_url(empty_db))
    command.upgrade(cfg, "0012_lean_rows")
    _sql(
        empty_db,
        """
        INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes)
        VALUES ('old-1', '/v1/chat/completions', 'm', '{}', 'd', 2)""",
    )
    _sql(
        empty_db,
        """
        INSERT INTO batches (id, endpoint, model, flush_reason, item_count, input_bytes,
                             spend_day)
        VALUES ('bd_old', '/v1/chat/completions', 'm', 'timeout', 1, 2, '2026-12-01')""",
    )
    command.upgrade(cfg, "0013_providers")
    assert _sql(empty_db, "SELECT custom_id, provider FROM tasks") == [("old-1", "openai")]
    assert _sql(empty_db, "SELECT provider, est_input_tokens, create_started_at FROM batches") == [
        ("openai", 0, None)
    ]
    indexes = "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'tasks_queued%'"
    assert _sql(empty_db, indexes) == [("tasks_queued_provider",)]
    command.downgrade(cfg, "0012_lean_rows")
    assert _sql(empty_db, indexes) == [("tasks_queued_lane",)]
    assert _sql(empty_db, "SELECT custom_id FROM tasks") == [("old-1",)]
