"""Backpressure: a full queue answers 429, a slow database 503, both with
Retry-After and both storing nothing; a 202 means the tasks are committed.

The slow database is real: another connection holds a lock that every
INSERT into tasks must wait for.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.harness import Harness, chat_task, running


@asynccontextmanager
async def tasks_locked(engine: AsyncEngine) -> AsyncIterator[None]:
    """Hold a lock that blocks every INSERT into tasks until the block ends."""
    async with engine.connect() as conn:
        async with conn.begin():
            await conn.execute(text("LOCK TABLE tasks IN SHARE MODE"))
            yield


async def _post(h: Harness, ids: list[str]) -> tuple[int, dict[str, Any], str | None]:
    async with h.http.post(
        f"{h.base_url}/v1/tasks", json={"tasks": [chat_task(i) for i in ids]}
    ) as r:
        return r.status, await r.json(), r.headers.get("Retry-After")


async def _until(condition: Callable[[], bool]) -> None:
    """Let the service run until it reaches the state a test waits for."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the service never reached the awaited state")


async def _stored(h: Harness, ids: list[str]) -> set[str]:
    rows = await h.rows("SELECT custom_id FROM tasks WHERE custom_id = ANY(:ids)", ids=ids)
    return {r["custom_id"] for r in rows}


async def test_past_max_queued_tasks_ingest_answers_429_and_stores_nothing(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, max_queued_tasks=10) as h:
        status, _, _ = await _post(h, [f"q{i}" for i in range(10)])
        assert status == 202
        status, body, retry_after = await _post(h, ["one-too-many"])
        assert (status, body["error"]["code"], retry_after) == (429, "queue_full", "30")
        assert await _stored(h, ["one-too-many"]) == set()


async def test_concurrent_requests_cannot_overshoot_max_queued_tasks(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, max_queued_tasks=5) as h:
        replies = await asyncio.gather(*(_post(h, [f"c{i}"]) for i in range(20)))
        assert sorted(status for status, _, _ in replies) == [202] * 5 + [429] * 15
        assert await h.count("true") == 5


async def test_a_locked_table_gets_503_with_retry_after_and_nothing_is_stored(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, ingest_timeout_seconds=0.3) as h:
        ids = [f"slow{i}" for i in range(12)]
        async with tasks_locked(h.engine):
            replies = await asyncio.gather(*(_post(h, [cid]) for cid in ids))
        assert {(s, b["error"]["code"], ra) for s, b, ra in replies} == {(503, "overloaded", "2")}
        assert await _stored(h, ids) == set()
        status, _, _ = await _post(h, ["after-the-lock"])
        assert status == 202 and await h.count("true") == 1


async def test_requests_queued_behind_slow_commits_get_503_and_are_never_stored(
    db_url: str, tmp_path: Path
) -> None:
    """Every INSERT takes a second (a real trigger, not a lock: lock_timeout
    cannot end it), so requests behind the two busy writers give up."""
    async with running(db_url, tmp_path, ingest_timeout_seconds=0.3) as h:
        await h.execute("""
            CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS
              $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$;
            """)
        await h.execute(
            "CREATE TRIGGER slow AFTER INSERT ON tasks "
            "FOR EACH STATEMENT EXECUTE FUNCTION slow_insert()"
        )
        ingest = h.service.api.ingest
        first = []
        for i in range(2):  # one for each writer, so both are busy
            first.append(asyncio.create_task(_post(h, [f"w{i}"])))
            await _until(
                lambda n=i + 1: (
                    not ingest._queue.qsize()  # type: ignore[misc]
                    and ingest._pending >= n
                )
            )
        queued = await asyncio.gather(*(_post(h, [f"late{i}"]) for i in range(10)))
        assert {(s, b["error"]["code"], ra) for s, b, ra in queued} == {(503, "overloaded", "2")}
        assert [(await t)[0] for t in first] == [202, 202]
        await h.execute("DROP TRIGGER slow ON tasks")
        assert (await _post(h, ["after"]))[0] == 202  # the writers skip the abandoned ones
        assert await _stored(h, [f"late{i}" for i in range(10)]) == set()
        assert await h.count("true") == 3


async def test_past_max_pending_tasks_ingest_answers_503_at_once(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, ingest_timeout_seconds=30, max_pending_tasks=3) as h:
        async with tasks_locked(h.engine):
            first = asyncio.create_task(_post(h, ["p1", "p2", "p3"]))
            await _until(lambda: h.service.api.ingest._pending >= 3)
            status, body, retry_after = await _post(h, ["p4"])
            assert (status, body["error"]["code"], retry_after) == (503, "overloaded", "2")
            assert "3 tasks are already waiting" in body["error"]["message"]
        assert (await first)[0] == 202
        assert await _stored(h, ["p1", "p2", "p3", "p4"]) == {"p1", "p2", "p3"}


async def test_a_flood_gets_only_202_429_503_and_exactly_the_202s_are_stored(
    db_url: str, tmp_path: Path
) -> None:
    """40 clients x 15 requests of 1-4 tasks on loopback, a queue cap below
    the total, and the table locked for a moment in the middle."""
    rng = random.Random(7)
    requests = [
        [f"f{c}-{r}-{k}" for k in range(rng.randint(1, 4))] for c in range(40) for r in range(15)
    ]
    async with running(
        db_url, tmp_path, max_queued_tasks=300, max_pending_tasks=60, ingest_timeout_seconds=0.3
    ) as h:
        replies: list[tuple[list[str], int, dict[str, Any], str | None]] = []
        answered = asyncio.Event()

        async def client(mine: list[list[str]]) -> None:
            for ids in mine:
                status, body, retry_after = await _post(h, ids)
                replies.append((ids, status, body, retry_after))
                if len(replies) >= 150:
                    answered.set()

        async def slow_database() -> None:
            await answered.wait()
            async with tasks_locked(h.engine):
                await asyncio.sleep(0.5)

        await asyncio.gather(
            slow_database(), *(client(requests[c * 15 : (c + 1) * 15]) for c in range(40))
        )

        statuses = {status for _, status, _, _ in replies}
        assert statuses <= {202, 429, 503}, statuses
        assert statuses == {202, 429, 503} and len(replies) == len(requests)
        for _ids, status, body, retry_after in replies:
            if status != 202:
                assert retry_after is not None and int(retry_after) > 0
                assert body["error"]["code"] == {429: "queue_full", 503: "overloaded"}[status]
        accepted = {cid for ids, s, _, _ in replies if s == 202 for cid in ids}
        refused = {cid for ids, s, _, _ in replies if s != 202 for cid in ids}
        everything = sorted(accepted | refused)
        assert await _stored(h, everything) == accepted
        assert await h.count("true") == len(accepted)
        assert sum(b["accepted"] for _, s, b, _ in replies if s == 202) == len(accepted)
