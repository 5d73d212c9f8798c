"""Ingest under concurrency: group commit keeps each caller's verdict its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.harness import chat_task, running


async def test_concurrent_single_posts_are_all_stored_once(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        replies = await asyncio.gather(*(h.post(chat_task(f"c{i % 150}")) for i in range(300)))
        assert all(status == 202 for status, _ in replies)
        assert sum(body["accepted"] for _, body in replies) == 150
        assert sum(body["duplicates"] for _, body in replies) == 150
        assert await h.count("true") == 150


async def test_a_conflict_in_a_group_fails_only_its_own_request(
        db_url: str, tmp_path: Path) -> None:
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
        db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        replies = await asyncio.gather(*(
            h.post(chat_task("race", content=f"body {i % 2}")) for i in range(20)))
        statuses = sorted(status for status, _ in replies)
        assert set(statuses) == {202, 409}
        winner = await h.rows("SELECT body FROM tasks WHERE custom_id = 'race'")
        assert len(winner) == 1
        content = winner[0]["body"]["messages"][0]["content"]
        winners = [body for status, body in replies if status == 202]
        assert sum(b["accepted"] for b in winners) == 1
        assert all(status == 202 for (status, _), i in zip(replies, range(20), strict=True)
                   if f"body {i % 2}" == content)
