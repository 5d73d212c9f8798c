"""Ingest under concurrency: group commit keeps each caller's verdict its own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from tests.harness import Harness, chat_task, running


async def test_concurrent_single_posts_are_all_stored_once(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        replies = await asyncio.gather(*(h.post(chat_task(f"c{i % 150}")) for i in range(300)))
        assert all(status == 202 for status, _ in replies)
        assert sum(body["accepted"] for _, body in replies) == 150
        assert sum(body["duplicates"] for _, body in replies) == 150
        assert await h.count("true") == 150


async def test_a_conflict_in_a_group_fails_only_its_own_request(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("taken"))
        good = [h.post(chat_task(f"g{i}")) for i in range(40)]
        bad = h.post({"tasks": [chat_task("innocent"), chat_task("taken", content="different")]})
        replies = await asyncio.gather(bad, *good)
        assert replies[0][0] == 409
        assert all(status == 202 for status, _ in replies[1:])
        assert await h.count("custom_id = 'innocent'") == 0
        assert await h.count("custom_id LIKE 'g%'") == 40


async def test_same_custom_id_with_two_bodies_at_once_admits_exactly_one(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        replies = await asyncio.gather(
            *(h.post(chat_task("race", content=f"body {i % 2}")) for i in range(20))
        )
        statuses = sorted(status for status, _ in replies)
        assert set(statuses) == {202, 409}
        winner = await h.rows("SELECT body FROM tasks WHERE custom_id = 'race'")
        assert len(winner) == 1
        content = winner[0]["body"]["messages"][0]["content"]
        winners = [body for status, body in replies if status == 202]
        assert sum(b["accepted"] for b in winners) == 1
        assert all(
            status == 202
            for (status, _), i in zip(replies, range(20), strict=True)
            if f"body {i % 2}" == content
        )


async def test_a_bulk_request_stores_each_rows_own_columns(db_url: str, tmp_path: Path) -> None:
    # insert_tasks sends a column shared by every row once, and an empty one
    # as NULL: a mixed request must still store each row's own values.
    mixed = [
        chat_task("m-plain"),
        chat_task("m-other-model", model="gpt-4o", metadata={"team": "search"}),
        chat_task("m-sync", lane="sync"),
        {
            "custom_id": "m-embed",
            "endpoint": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": "hi"},
            "metadata": {"latency_profile": "1h"},
        },
    ]
    uniform = [chat_task(f"u{i}") for i in range(3)]
    async with running(db_url, tmp_path) as h:
        for tasks in (mixed, uniform):
            status, reply = await h.post(tasks, ndjson=True)
            assert status == 202 and reply["accepted"] == len(tasks)
        rows = {
            r["custom_id"]: r
            for r in await h.rows(
                "SELECT custom_id, endpoint, model, lane, metadata, fallback_at IS NOT NULL AS fb,"
                " extract(epoch FROM created_at - not_before) AS backdated FROM tasks"
            )
        }
    assert {
        cid: (r["endpoint"], r["model"], r["lane"], r["metadata"], r["fb"])
        for cid, r in rows.items()
    } == {
        "m-plain": ("/v1/chat/completions", "gpt-4o-mini", "batch", None, False),
        "m-other-model": ("/v1/chat/completions", "gpt-4o", "batch", {"team": "search"}, False),
        "m-sync": ("/v1/chat/completions", "gpt-4o-mini", "sync", None, False),
        "m-embed": (
            "/v1/embeddings",
            "text-embedding-3-small",
            "batch",
            {"latency_profile": "1h"},
            True,
        ),
        **{
            f"u{i}": ("/v1/chat/completions", "gpt-4o-mini", "batch", None, False) for i in range(3)
        },
    }
    # The 1h profile's window is shorter than the default 900 s: back-dated.
    assert rows["m-embed"]["backdated"] > 500
    assert all(abs(r["backdated"]) < 1 for cid, r in rows.items() if cid != "m-embed")


async def _post_ndjson(h: Harness, data: bytes) -> tuple[int, Any]:
    async with h.http.post(
        f"{h.base_url}/v1/tasks", data=data, headers={"Content-Type": "application/x-ndjson"}
    ) as r:
        return r.status, await r.json()


async def test_ndjson_skips_blank_lines_and_names_a_bad_one(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        lines = [orjson.dumps(chat_task("b1")), b"", b"  ", orjson.dumps(chat_task("b2"))]
        status, reply = await _post_ndjson(h, b"\n".join(lines))
        assert status == 202 and reply["accepted"] == 2
        status, reply = await _post_ndjson(h, b"\n".join([lines[0], b"", b"{oops"]))
        assert status == 400 and reply["error"]["code"] == "invalid_json"
        assert reply["error"]["message"].startswith("line 3 is not valid JSON")
