"""Leaving the batch lane: fallbacks, resubmissions, lost calls, and what they
do to attempts and to the line numbers of the batch left behind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from batchd.domain import RESUBMIT_MARGIN, SYNC_MARGIN
from batchd.emulator.openai import Emulator
from batchd.errors import ConfigError
from tests.harness import API_KEY, Harness, chat_task, running


async def _sweep(h: Harness) -> None:
    await h.service.sync_lane.sweep()


async def _states(h: Harness) -> dict[str, tuple[str, int]]:
    return {
        r["custom_id"]: (r["state"], r["attempts"])
        for r in await h.rows("SELECT custom_id, state, attempts FROM tasks")
    }


async def test_a_fallback_never_takes_a_task_past_max_attempts(db_url: str, tmp_path: Path) -> None:
    emulator = Emulator(api_key=API_KEY, in_progress_seconds=3600)
    async with running(db_url, tmp_path, emulator=emulator, max_attempts=1) as h:
        await h.post(chat_task("late", emulate="http_500", metadata={"latency_profile": "1h"}))
        await h.age_queue(901)
        assert await h.flush() == 1
        assert await _states(h) == {"late": ("submitted", 1)}
        await h.execute("UPDATE tasks SET fallback_at = now()")
        await _sweep(h)
        assert await _states(h) == {"late": ("queued", 0)}  # the unanswered attempt back
        await h.drain_sync(20)
        assert await _states(h) == {"late": ("failed", 1)}
        assert h.emulator.calls["sync"] == 1


async def test_a_lost_sync_call_is_retried_then_failed_within_max_attempts(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, max_attempts=2) as h:
        await h.post(chat_task("lost", lane="sync"))
        for attempt in (1, 2):
            # A replica claims the call, then dies before storing anything.
            await h.expire_backoffs()
            assert len(await h.service.sync_lane._claim(f"sync_dead{attempt}", 8, ["openai"])) == 1
            await h.execute("UPDATE tasks SET submitted_at = now() - interval '1 hour'")
            await _sweep(h)
        assert await _states(h) == {"lost": ("failed", 2)}
        task = await h.task("lost")
        assert task["last_error"]["code"] == "sync_call_lost"
        events = [
            r["outcome"]
            for r in await h.rows(
                "SELECT outcome FROM task_events "
                "WHERE task_id = (SELECT id FROM tasks WHERE custom_id = 'lost') "
                "ORDER BY id"
            )
        ]
        assert events == ["retried", "failed"]
        # Nobody knows what the lost calls cost: their reservations stay.
        assert await h.count("cost_usd IS NULL", "sync_spend") == 2
        assert h.emulator.calls.get("sync", 0) == 0


async def test_validation_errors_find_their_task_after_another_left_the_batch(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        h.emulator.script_batch(
            "validation_failed",
            errors=[
                {"code": "invalid_request", "line": 3, "param": "body", "message": "bad line 3"}
            ],
        )
        await h.post(
            {
                "tasks": [
                    chat_task("v1"),
                    chat_task("v2", metadata={"latency_profile": "6h"}),
                    chat_task("v3"),
                    chat_task("v4"),
                ]
            }
        )
        await h.age_queue(901)
        assert await h.flush() == 1
        lines = {
            r["custom_id"]: r["batch_line"]
            for r in await h.rows("SELECT custom_id, batch_line FROM tasks")
        }
        assert lines == {"v1": 1, "v2": 2, "v3": 3, "v4": 4}
        # v2 gives up on the batch before the provider's verdict comes back.
        await h.execute("UPDATE tasks SET fallback_at = now() WHERE custom_id = 'v2'")
        await _sweep(h)
        await h.make_polls_due()
        await h.service.poller.tick()
        states = {cid: s for cid, (s, _) in (await _states(h)).items()}
        assert states == {"v1": "queued", "v2": "queued", "v3": "failed", "v4": "queued"}
        assert (await h.task("v3"))["last_error"]["message"] == "bad line 3"


async def test_a_task_leaving_before_upload_renumbers_the_file(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        h.emulator.script_batch(
            "validation_failed",
            errors=[
                {"code": "invalid_request", "line": 2, "param": "body", "message": "bad line 2"}
            ],
        )
        await h.post(
            {
                "tasks": [
                    chat_task("w1"),
                    chat_task("w2", metadata={"latency_profile": "6h"}),
                    chat_task("w3"),
                    chat_task("w4"),
                ]
            }
        )
        await h.age_queue(901)
        pending = await h.service.scheduler._flush_one(drain=False)
        assert pending is not None
        await h.execute("UPDATE tasks SET fallback_at = now() WHERE custom_id = 'w2'")
        await _sweep(h)
        await h.service.scheduler.send(pending)
        lines = {
            r["custom_id"]: r["batch_line"]
            for r in await h.rows(
                "SELECT custom_id, batch_line FROM tasks WHERE batch_id IS NOT NULL"
            )
        }
        assert lines == {"w1": 1, "w3": 2, "w4": 3}
        (sent,) = h.emulator.received_files.values()
        assert [orjson.loads(line)["custom_id"] for line in sent.splitlines()] == [
            await h.key(c) + "r0a1" for c in ("w1", "w3", "w4")
        ]
        await h.make_polls_due()
        await h.service.poller.tick()
        states = {cid: s for cid, (s, _) in (await _states(h)).items()}
        assert states == {"w1": "queued", "w2": "queued", "w3": "failed", "w4": "queued"}


async def test_a_token_selects_the_profile_and_24h_resubmits_a_late_batch(
    db_url: str, tmp_path: Path
) -> None:
    emulator = Emulator(api_key=API_KEY, in_progress_seconds=3600)
    deadline = datetime.now(UTC) + timedelta(hours=30)
    async with running(
        db_url,
        tmp_path,
        emulator=emulator,
        ingest_tokens="billing=tok-b,search=tok-s",
        client_profiles="billing=24h",
    ) as h:
        for token, tasks in (
            (
                "tok-b",
                [
                    chat_task("r1"),
                    chat_task("r-dl", deadline=deadline.isoformat()),
                    chat_task("r-own", metadata={"latency_profile": "1h"}),
                ],
            ),
            ("tok-s", [chat_task("plain")]),
        ):
            status, _ = await h.post({"tasks": tasks}, headers={"Authorization": f"Bearer {token}"})
            assert status == 202
        rows = {
            r["custom_id"]: r
            for r in await h.rows(
                "SELECT custom_id, fallback_action, fallback_at - created_at AS after FROM tasks"
            )
        }
        assert rows["r1"]["fallback_action"] == "resubmit"
        assert abs(rows["r1"]["after"] - (timedelta(hours=24) - RESUBMIT_MARGIN)) < timedelta(
            seconds=5
        )
        assert rows["r-dl"]["fallback_action"] == "resubmit"  # before its deadline's
        assert rows["r-own"]["fallback_action"] == "sync"  # the task's own profile wins
        assert (rows["plain"]["fallback_action"], rows["plain"]["after"]) == (None, None)

        await h.age_queue(901)
        assert await h.flush() == 1
        first = await h.scalar("SELECT id FROM batches")
        # 23 hours on, that batch still has not answered.
        await h.execute("UPDATE tasks SET fallback_at = now() WHERE custom_id IN ('r1', 'r-dl')")
        await _sweep(h)
        moved = {
            r["custom_id"]: r
            for r in await h.rows(
                "SELECT custom_id, state, lane, attempts, batch_id, fallback_at, fallback_action "
                "FROM tasks WHERE custom_id IN ('r1', 'r-dl')"
            )
        }
        for r in moved.values():
            assert (r["state"], r["lane"], r["attempts"], r["batch_id"]) == (
                "queued",
                "batch",
                0,
                None,
            )
        assert (moved["r1"]["fallback_at"], moved["r1"]["fallback_action"]) == (None, "sync")
        assert moved["r-dl"]["fallback_at"] == deadline - SYNC_MARGIN
        events = await h.rows(
            "SELECT t.custom_id, e.batch_id, e.outcome FROM task_events e "
            "JOIN tasks t ON t.id = e.task_id "
            "WHERE e.outcome = 'resubmitted' ORDER BY t.custom_id"
        )
        assert [(e["custom_id"], e["batch_id"]) for e in events] == [("r-dl", first), ("r1", first)]

        # No waiting out a window: the fresh batch goes on the next tick.
        assert await h.flush() == 1
        second = await h.rows(
            "SELECT custom_id, attempts, batch_id FROM tasks "
            "WHERE batch_id IS NOT NULL AND batch_id <> :b",
            b=first,
        )
        assert sorted((r["custom_id"], r["attempts"]) for r in second) == [("r-dl", 1), ("r1", 1)]
        await _sweep(h)  # resubmitted once only
        assert await h.count("outcome = 'resubmitted'", "task_events") == 2


async def test_a_client_profile_must_name_a_configured_client(db_url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BATCHD_CLIENT_PROFILES: 'billing'"):
        async with running(
            db_url, tmp_path, ingest_tokens="search=tok-s", client_profiles="billing=6h"
        ):
            pass


async def test_a_resubmitted_task_is_stored_once_when_both_batches_answer(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(
            {"tasks": [chat_task("twice", metadata={"latency_profile": "24h"}), chat_task("once")]}
        )
        await h.age_queue(901)
        assert await h.flush() == 1
        first = await h.scalar("SELECT batch_id FROM tasks WHERE custom_id = 'twice'")
        await h.execute("UPDATE tasks SET fallback_at = now() WHERE custom_id = 'twice'")
        await _sweep(h)
        assert await h.flush() == 1
        second = await h.scalar("SELECT batch_id FROM tasks WHERE custom_id = 'twice'")
        assert second != first
        await h.cycle()  # both batches answer; the old one still holds a line for it
        assert h.emulator.submissions[await h.key("twice")] == 2
        rows = await h.rows("SELECT custom_id, batch_id FROM results ORDER BY custom_id")
        assert rows == [
            {"custom_id": "once", "batch_id": first},
            {"custom_id": "twice", "batch_id": second},
        ]
        assert await _states(h) == {"once": ("succeeded", 1), "twice": ("succeeded", 1)}
