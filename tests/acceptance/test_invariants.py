"""The invariant checker itself: a clean history passes, and each kind of
breakage it exists to catch is reported (a checker that cannot fail would
make every chaos run pass)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd.store.engine import make_engine
from tests import invariants


def _batch(
    pid: str, ours: str, ids: list[str], status: str = "completed", **extra: Any
) -> dict[str, Any]:
    return {
        "id": pid,
        "status": status,
        "metadata": {"batchd_batch_id": ours},
        "custom_ids": ids,
        "request_counts": {"completed": len(ids)},
        "error_codes": [],
        "cancel_requested": False,
        **extra,
    }


CLEAN: dict[str, Any] = {
    "batches": [_batch("batch_1", "bd_1", ["a", "b"]), _batch("batch_2", "bd_2", ["b"])],
    "sync_submissions": {},
}


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """A routed history: a succeeded on the first try, b retried once then failed."""
    engine = make_engine(db_url, pool_size=2)
    async with engine.begin() as conn:
        await conn.execute(
            text("""
            INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes,
                               state, attempts, batch_id)
            VALUES ('a', '/v1/chat/completions', 'm', '{}', 'd', 10, 'succeeded', 1, 'bd_1'),
                   ('b', '/v1/chat/completions', 'm', '{}', 'd', 10, 'failed', 2, 'bd_2')""")
        )
        await conn.execute(
            text("""
            INSERT INTO batches (id, endpoint, model, state, flush_reason, item_count,
                                 input_bytes, spend_day, provider_batch_id)
            VALUES ('bd_1', '/v1/chat/completions', 'm', 'routed', 'cap', 2, 20, now(),
                    'batch_1'),
                   ('bd_2', '/v1/chat/completions', 'm', 'routed', 'cap', 1, 10, now(),
                    'batch_2')""")
        )
        await conn.execute(
            text("""
            INSERT INTO results (task_id, client, custom_id, batch_id, status_code, response)
            SELECT id, client, custom_id, 'bd_1', 200, '{}' FROM tasks WHERE custom_id = 'a'""")
        )
        await conn.execute(
            text("""
            INSERT INTO task_events (task_id, client, custom_id, batch_id, attempt, outcome)
            SELECT id, client, custom_id, 'bd_1', 1, 'succeeded' FROM tasks
            WHERE custom_id = 'a'""")
        )
    yield engine
    await engine.dispose()


async def test_a_clean_history_passes(engine: AsyncEngine) -> None:
    report = await invariants.check(engine, CLEAN, accepted={"a", "b"})
    assert report.ok, report.violations
    assert (report.tasks, report.lost, report.duplicated) == (2, 0, 0)


Breakage = Callable[[dict[str, Any]], None]


def _dup_running(rec: dict[str, Any]) -> None:
    rec["batches"].append(_batch("batch_1b", "bd_1", ["a", "b"]))


def _live_twice(rec: dict[str, Any]) -> None:
    rec["batches"][0]["status"] = "in_progress"
    rec["batches"][1]["status"] = "in_progress"


def _unrecorded(rec: dict[str, Any]) -> None:
    rec["batches"].append(_batch("batch_9", "bd_9", ["a"]))


def _fewer_submissions(rec: dict[str, Any]) -> None:
    rec["batches"].pop()


@pytest.mark.parametrize(
    ("sql", "breakage", "accepted", "expected"),
    [
        (None, None, {"a", "b", "ghost"}, "accepted task(s) are not stored"),
        (
            "UPDATE tasks SET state = 'queued', batch_id = NULL WHERE custom_id = 'b'",
            None,
            None,
            "never reached a terminal state",
        ),
        (
            "UPDATE tasks SET state = 'submitted' WHERE custom_id = 'b'",
            None,
            None,
            "task_in_two_live_batches",
        ),
        (
            "INSERT INTO results (task_id, client, custom_id, batch_id, status_code, response) "
            "SELECT id, client, custom_id, 'bd_2', 200, '{}' FROM tasks WHERE custom_id = 'b'",
            None,
            None,
            "result_without_success",
        ),
        ("DELETE FROM results", None, None, "success_without_result"),
        (
            "INSERT INTO task_events (task_id, client, custom_id, batch_id, attempt, outcome) "
            "SELECT id, client, custom_id, 'bd_1', 1, 'succeeded' FROM tasks WHERE custom_id = 'a'",
            None,
            None,
            "success_stored_twice",
        ),
        # Isolation: another client's row under this task, or a caller's id sent.
        ("UPDATE results SET client = 'beta'", None, None, "under another task's client"),
        (
            "INSERT INTO task_events (task_id, client, custom_id, attempt, outcome) "
            "SELECT id, 'beta', custom_id, 1, 'retried' FROM tasks WHERE custom_id = 'b'",
            None,
            None,
            "under another task's client",
        ),
        (
            "UPDATE batches SET own_line_ids = true WHERE id = 'bd_1'",
            None,
            None,
            "carry an id that is not batchd's",
        ),
        (None, _fewer_submissions, None, "count attempts the provider never saw"),
        (
            "UPDATE tasks SET attempts = 1 WHERE custom_id = 'b'",
            None,
            None,
            "submitted more often than counted",
        ),
        (None, _dup_running, None, "duplicates batch_1"),
        (None, _unrecorded, None, "is not recorded in batches"),
        (None, _live_twice, None, "live in two provider batches"),
    ],
)
async def test_each_breakage_is_reported(
    engine: AsyncEngine,
    sql: str | None,
    breakage: Breakage | None,
    accepted: set[str] | None,
    expected: str,
) -> None:
    record = copy.deepcopy(CLEAN)
    if breakage is not None:
        breakage(record)
    if sql is not None:
        async with engine.begin() as conn:
            await conn.execute(text(sql))
    report = await invariants.check(engine, record, accepted=accepted or {"a", "b"}, settled=True)
    assert not report.ok
    assert any(expected in v for v in report.violations), report.violations


async def test_a_duplicate_cancelled_before_it_ran_and_a_token_limit_are_tolerated(
    engine: AsyncEngine,
) -> None:
    record = copy.deepcopy(CLEAN)
    record["batches"].append(
        _batch(
            "batch_1c",
            "bd_1",
            ["a", "b"],
            status="cancelled",
            cancel_requested=True,
            request_counts={"completed": 0},
        )
    )
    record["batches"].append(
        _batch("batch_t", "bd_t", ["a"], status="failed", error_codes=["token_limit_exceeded"])
    )
    async with engine.begin() as conn:
        await conn.execute(
            text("""
            INSERT INTO batches (id, endpoint, model, state, flush_reason, item_count,
                                 input_bytes, spend_day, provider_batch_id)
            VALUES ('bd_t', '/v1/chat/completions', 'm', 'routed', 'cap', 1, 10, now(),
                    'batch_t')""")
        )
    report = await invariants.check(engine, record, accepted={"a", "b"})
    assert report.ok, report.violations
