"""The core pipeline end to end: HTTP ingest → windows → emulated batches via the
openai SDK → poll → route → results, on real PostgreSQL."""

from __future__ import annotations

import asyncio
import gzip
from collections import Counter
from contextlib import aclosing
from pathlib import Path

import orjson
from sqlalchemy import text

from batchd.domain import input_line, line_id
from batchd.emulator.openai import Emulator
from batchd.provider.openai import OpenAIProvider
from batchd.service import Service
from batchd.store.windows import stream_batch_lines
from tests.harness import API_KEY, chat_task, running
from tests.invariants import job_counter_problems


async def test_full_journey_stores_every_result_once(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        status, body = await h.post(chat_task("one"))
        assert status == 202 and body["accepted"] == 1
        status, body = await h.post({"tasks": [chat_task(f"many-{i}") for i in range(5)]})
        assert (status, body["accepted"]) == (202, 5)
        status, body = await h.post([chat_task(f"nd-{i}") for i in range(4)], ndjson=True)
        assert (status, body["accepted"]) == (202, 4)
        assert (await h.task("one"))["state"] == "queued"

        assert await h.flush() == 0  # nothing is due: the window is 900 s
        await h.age_queue(901)
        await h.cycle()

        assert await h.count("state = 'succeeded'") == 10
        assert await h.count("true", "results") == 10
        task = await h.task("nd-3")
        assert task["state"] == "succeeded" and task["attempts"] == 1
        assert task["response"]["object"] == "chat.completion"
        reasons = await h.rows("SELECT flush_reason, item_count, state FROM batches")
        assert reasons == [{"flush_reason": "timeout", "item_count": 10, "state": "routed"}]

        seen: list[str] = []
        after = "0"
        while True:
            status, page = await h.get("/v1/results", after=after, limit="3")
            seen += [r["custom_id"] for r in page["results"]]
            after = page["next"]
            if not page["has_more"]:
                break
        assert sorted(seen) == sorted(
            {"one", *(f"many-{i}" for i in range(5)), *(f"nd-{i}" for i in range(4))}
        )
        status, page = await h.get("/v1/results", after=after)
        assert page["results"] == []


async def test_input_file_holds_every_task_of_its_batch_in_line_order(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task(f"f{i}", content='é "x"\n' * i) for i in range(7)]})
        await h.age_queue(901)
        assert await h.flush() == 1
        batch = (await h.rows("SELECT id, input_file_id FROM batches"))[0]
        tasks = await h.rows(
            "SELECT id, client, custom_id, endpoint, body, batch_line, "
            "replay_count, attempts FROM tasks ORDER BY id"
        )
        assert [t["batch_line"] for t in tasks] == list(range(1, 8))
        # Each line under batchd's id for this attempt, never the caller's custom_id.
        ids = [line_id(t["id"], t["replay_count"], t["attempts"]) for t in tasks]
        expected = b"".join(
            input_line(lid, t["endpoint"], t["body"]) for lid, t in zip(ids, tasks, strict=True)
        )
        assert h.emulator.received_files[batch["input_file_id"]] == expected
        # The archive keeps the mapping back to each caller's task.
        archived = h.service.archive.find(batch["id"], "ids")
        assert archived is not None
        with gzip.open(archived) as f:
            assert [orjson.loads(line) for line in f] == [
                [lid, t["client"], t["custom_id"]] for lid, t in zip(ids, tasks, strict=True)
            ]
        # Read in pages smaller than the batch, the lines still come whole and in order.
        async with h.engine.connect() as conn:
            pages = [
                [r[7] for r in rows]
                async for rows in stream_batch_lines(conn, batch["id"], chunk=3)
            ]
        assert pages == [["f0", "f1", "f2"], ["f3", "f4", "f5"], ["f6"]]
        # Left after one page, the stream takes back the page it was reading
        # ahead, and the connection is free for the next statement.
        async with h.engine.connect() as conn:
            async with aclosing(stream_batch_lines(conn, batch["id"], chunk=3)) as stream:
                async for _rows in stream:
                    break
            assert (await conn.execute(text("SELECT count(*) FROM tasks"))).scalar() == 7


async def test_cap_flushes_full_windows_and_timeout_flushes_the_rest(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, max_batch_items=10) as h:
        await h.post({"tasks": [chat_task(f"t{i}") for i in range(25)]})
        assert await h.flush() == 2
        sizes = await h.rows("SELECT flush_reason, item_count FROM batches ORDER BY created_at")
        assert sizes == [{"flush_reason": "cap", "item_count": 10}] * 2
        assert await h.queued() == 5
        await h.age_queue(901)
        assert await h.flush() == 1
        last = await h.rows(
            "SELECT flush_reason, item_count FROM batches WHERE flush_reason = 'timeout'"
        )
        assert last == [{"flush_reason": "timeout", "item_count": 5}]


async def test_file_size_limit_splits_a_window(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, max_file_bytes=2048) as h:
        await h.post({"tasks": [chat_task(f"big{i}", content="x" * 300) for i in range(12)]})
        await h.age_queue(901)
        await h.cycle()
        batches = await h.rows("SELECT flush_reason, item_count, input_bytes FROM batches")
        assert len(batches) > 1
        assert all(b["input_bytes"] <= 2048 for b in batches)
        assert "limit" in {b["flush_reason"] for b in batches}
        assert sum(b["item_count"] for b in batches) == 12
        for data in h.emulator.received_files.values():
            assert len(_bytes(data)) <= 2048
        assert await h.count("state = 'succeeded'") == 12


async def test_window_that_fills_a_file_flushes_before_its_timeout(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, max_file_bytes=2048) as h:
        await h.post({"tasks": [chat_task(f"small{i}") for i in range(2)]})
        assert await h.flush() == 0, "two small tasks neither fill a file nor time out"
        await h.post({"tasks": [chat_task(f"big{i}", content="x" * 300) for i in range(12)]})
        await h.flush()
        batches = await h.rows("SELECT flush_reason FROM batches")
        assert batches and {b["flush_reason"] for b in batches} == {"limit"}


async def test_task_nearly_as_large_as_a_file_is_sent_alone(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, max_file_bytes=2048) as h:
        status, body = await h.post(
            {"tasks": [chat_task("huge", content="x" * 1800), chat_task("small")]}
        )
        assert status == 202, body
        await h.age_queue(901)
        await h.cycle()
        assert await h.count("state = 'succeeded'") == 2
        sizes = await h.rows("SELECT item_count FROM batches ORDER BY created_at")
        assert [b["item_count"] for b in sizes] == [1, 1]


async def test_task_past_the_file_limit_is_refused_at_ingest(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, max_file_bytes=2048) as h:
        status, body = await h.post(chat_task("huge", content="x" * 2100))
        assert status == 413
        assert body["error"]["code"] == "task_too_large"
        assert "huge" in body["error"]["message"]
        assert await h.count("true") == 0


async def test_two_models_make_two_batches(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(
            {
                "tasks": [chat_task(f"a{i}", "gpt-4o-mini") for i in range(3)]
                + [chat_task(f"b{i}", "gpt-4.1-nano") for i in range(2)]
            }
        )
        await h.age_queue(901)
        await h.cycle()
        rows = await h.rows("SELECT model, item_count FROM batches ORDER BY model")
        assert rows == [
            {"model": "gpt-4.1-nano", "item_count": 2},
            {"model": "gpt-4o-mini", "item_count": 3},
        ]


async def test_retry_succeeds_on_second_and_third_attempt(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(
            {
                "tasks": [
                    chat_task("second", emulate="http_500*1"),
                    chat_task("third", emulate="http_429*2"),
                    chat_task("first"),
                ]
            }
        )
        await h.run_until_settled()
        attempts = {
            r["custom_id"]: (r["state"], r["attempts"])
            for r in await h.rows("SELECT custom_id, state, attempts FROM tasks")
        }
        assert attempts == {
            "first": ("succeeded", 1),
            "second": ("succeeded", 2),
            "third": ("succeeded", 3),
        }
        assert h.emulator.submissions[await h.key("third")] == 3
        outcomes = [
            r["outcome"]
            for r in await h.rows(
                "SELECT outcome FROM task_events "
                "WHERE task_id = (SELECT id FROM tasks WHERE custom_id = 'third') "
                "ORDER BY id"
            )
        ]
        assert outcomes == ["retried", "retried", "succeeded"]


async def test_retry_backs_off_before_joining_a_window(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, retry_backoff_seconds=600) as h:
        await h.post(chat_task("slow", emulate="http_500*1"))
        await h.age_queue(901)
        await h.cycle()
        wait = await h.scalar("SELECT extract(epoch FROM not_before - now()) FROM tasks")
        assert 290 < float(wait) <= 600  # equal jitter on the first retry: [300, 600)
        assert await h.flush() == 0


async def test_always_retryable_task_fails_after_exactly_three_attempts(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("doomed", emulate="http_503"))
        await h.run_until_settled()
        task = await h.task("doomed")
        assert (task["state"], task["attempts"]) == ("failed", 3)
        assert task["last_error"]["status"] == 503
        assert h.emulator.submissions[await h.key("doomed")] == 3
        status, page = await h.get("/v1/failed")
        assert status == 200
        assert [r["custom_id"] for r in page["failed"]] == ["doomed"]


async def test_bad_request_line_fails_at_once(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task("bad", emulate="http_400"), chat_task("good")]})
        await h.run_until_settled()
        task = await h.task("bad")
        assert (task["state"], task["attempts"]) == ("failed", 1)
        assert task["last_error"]["code"] == "context_length_exceeded"
        assert (await h.task("good"))["state"] == "succeeded"


async def test_missing_lines_are_retried(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task("ghost", emulate="missing*1"), chat_task("here")]})
        await h.age_queue(901)
        await h.cycle()
        ghost = await h.task("ghost")
        assert ghost["state"] == "queued" and ghost["last_error"]["code"] == "missing_from_output"
        await h.run_until_settled()
        ghost = await h.task("ghost")
        assert (ghost["state"], ghost["attempts"]) == ("succeeded", 2)


async def test_all_failed_batch_has_no_output_file(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task(f"f{i}", emulate="http_404") for i in range(3)]})
        await h.age_queue(901)
        await h.cycle()
        batch = (
            await h.rows(
                "SELECT provider_status, output_file_id, error_file_id, request_counts FROM batches"
            )
        )[0]
        assert batch["provider_status"] == "completed"
        assert batch["output_file_id"] is None and batch["error_file_id"]
        assert batch["request_counts"]["failed"] == 3
        assert await h.count("state = 'failed' AND attempts = 1") == 3


async def test_validation_failed_batch_fails_named_lines_and_requeues_the_rest(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        h.emulator.script_batch(
            "validation_failed",
            errors=[
                {
                    "code": "invalid_request",
                    "line": 2,
                    "param": "body.messages",
                    "message": "bad messages",
                }
            ],
        )
        await h.post({"tasks": [chat_task(f"v{i}") for i in range(3)]})
        await h.age_queue(901)
        await h.cycle()
        states = {
            r["custom_id"]: (r["state"], r["attempts"])
            for r in await h.rows("SELECT custom_id, state, attempts FROM tasks")
        }
        assert states == {"v0": ("queued", 1), "v1": ("failed", 1), "v2": ("queued", 1)}
        await h.run_until_settled()
        assert await h.count("state = 'succeeded' AND attempts = 2") == 2


async def test_token_limit_requeues_without_counting_the_attempt(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        h.emulator.script_batch("token_limit_exceeded")
        await h.post({"tasks": [chat_task(f"k{i}") for i in range(3)]})
        await h.age_queue(901)
        await h.cycle()
        assert await h.count("state = 'queued' AND attempts = 0") == 3
        assert await h.scalar("SELECT token_limited FROM batches") is True
        await h.run_until_settled()
        assert await h.count("state = 'succeeded' AND attempts = 1") == 3


async def test_expired_batch_keeps_partial_output_and_retries_the_rest(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        h.emulator.script_batch("expire", run_fraction=0.5)
        await h.post({"tasks": [chat_task(f"e{i}") for i in range(10)]})
        await h.age_queue(901)
        await h.cycle()
        assert await h.scalar("SELECT provider_status FROM batches") == "expired"
        done = await h.count("state = 'succeeded' AND attempts = 1")
        again = await h.count("state = 'queued' AND attempts = 1")
        assert done == 5 and again == 5
        await h.run_until_settled()
        assert await h.count("state = 'succeeded'") == 10
        assert await h.count("true", "results") == 10


async def test_duplicate_lines_and_reroutes_store_each_result_once(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task("twice", emulate="duplicate"), chat_task("once")]})
        await h.age_queue(901)
        await h.cycle()
        assert await h.count("true", "results") == 2
        assert await h.count("outcome = 'succeeded'", "task_events") == 2
        # Routing the same batch again (a crash after commit, a second replica)
        # must not change anything.
        await h.execute("UPDATE batches SET state = 'submitted', next_poll_at = now()")
        await h.service.poller.tick()
        assert await h.count("true", "results") == 2
        assert await h.count("outcome = 'succeeded'", "task_events") == 2


async def test_a_batch_routed_in_chunks_resumes_after_a_failed_chunk_exactly_once(
    db_url: str, tmp_path: Path
) -> None:
    """Success lines are settled a few per transaction. A route that fails
    part-way keeps the chunks it committed; routed again, it stores each
    result once, and the batch's cost (taken from its results rows) is still
    its results' plus the unattributed."""
    # A client with a budget, so the batch holds a reservation its route settles.
    async with running(db_url, tmp_path, ingest_tokens="svc=tok-svc", client_budgets="svc=10") as h:
        h.service.router.chunk_lines = 3
        marks = {2: "http_400", 4: "http_500*1", 6: "duplicate", 9: "missing*1"}
        status, _ = await h.post(
            {"tasks": [chat_task(f"c{i}", job="chunked", emulate=marks.get(i)) for i in range(12)]},
            headers={"Authorization": "Bearer tok-svc"},
        )
        assert status == 202
        # A fault in the database: no transaction after the first that wrote
        # results can write any (created_at is its transaction's start).
        await h.execute("""
            CREATE FUNCTION refuse_later() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF EXISTS (SELECT 1 FROM results WHERE created_at < now()) THEN
                    RAISE EXCEPTION 'refused';
                END IF;
                RETURN NEW;
            END $$""")
        await h.execute(
            "CREATE TRIGGER refuse_later BEFORE INSERT ON results "
            "FOR EACH ROW EXECUTE FUNCTION refuse_later()"
        )
        await h.age_queue(901)
        await h.flush()
        await h.make_polls_due()
        await h.service.poller.tick()
        # The first chunk stayed (2 results if it held c6's two lines); the
        # batch is not routed.
        assert await h.scalar("SELECT state FROM batches") == "submitted"
        kept = await h.count("true", "results")
        assert kept in (2, 3)
        assert await h.count("state = 'succeeded'") == kept
        assert await h.count("state = 'submitted'") == 12 - kept
        await h.execute("DROP TRIGGER refuse_later ON results")
        await h.execute("UPDATE batches SET lease_until = NULL")  # its retry delay, over
        await h.make_polls_due()
        await h.service.poller.tick()

        states = {
            r["custom_id"]: r["state"] for r in await h.rows("SELECT custom_id, state FROM tasks")
        }
        assert states == {
            **{f"c{i}": "succeeded" for i in range(12)},
            "c2": "failed",
            "c4": "queued",
            "c9": "queued",
        }
        assert await h.count("true", "results") == 9
        assert await h.count("outcome = 'succeeded'", "task_events") == 9
        batch = (
            await h.rows("""
            SELECT b.state, b.cost_usd, b.unattributed_cost_usd, b.unattributed_lines,
                   (SELECT sum(cost_usd) FROM results r WHERE r.batch_id = b.id) AS results,
                   (SELECT cost_usd FROM client_spend s WHERE s.batch_id = b.id) AS client
            FROM batches b""")
        )[0]
        assert batch["state"] == "routed" and batch["results"] > 0
        # The duplicate line is billed, and nobody's result.
        assert batch["unattributed_lines"] == 1 and batch["unattributed_cost_usd"] > 0
        assert batch["cost_usd"] == batch["results"] + batch["unattributed_cost_usd"]
        assert batch["client"] == batch["results"]
        assert await job_counter_problems(h.engine) == []
        await h.run_until_settled()
        assert await h.count("state = 'succeeded'") == 11


async def test_duplicate_and_conflicting_ingest(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        status, body = await h.post(chat_task("same"))
        assert (status, body["accepted"], body["duplicates"]) == (202, 1, 0)
        status, body = await h.post(chat_task("same"))
        assert (status, body["accepted"], body["duplicates"]) == (202, 0, 1)
        assert body["tasks"] == [{"custom_id": "same", "state": "queued"}]
        status, body = await h.post(
            {"tasks": [chat_task("new"), chat_task("same", content="other")]}
        )
        assert status == 409 and body["error"]["code"] == "conflict"
        assert "same" in body["error"]["message"]
        assert await h.count("true") == 1  # "new" was not stored either


async def test_invalid_task_is_named_and_nothing_is_stored(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        bad = {"custom_id": "b", "body": {"messages": []}}
        status, body = await h.post({"tasks": [chat_task("ok"), bad]})
        assert status == 400
        assert body["error"]["field"] == "body.model" and body["error"]["index"] == 1
        assert "task 1 ('b')" in body["error"]["message"]
        assert await h.count("true") == 0


async def test_oversized_request_gets_413(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, max_request_bytes=4096) as h:
        status, body = await h.post(chat_task("huge", content="x" * 10_000))
        assert status == 413 and body["error"]["code"] == "payload_too_large"
        assert await h.count("true") == 0


async def test_unknown_task_is_404(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        status, body = await h.get("/v1/tasks/nope")
        assert status == 404 and body["error"]["code"] == "not_found"


async def test_bearer_token_is_required_when_configured(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, ingest_tokens="s3cret") as h:
        status, body = await h.post(chat_task("a"))
        assert status == 401 and body["error"]["code"] == "unauthorized"
        status, _ = await h.post(chat_task("a"), headers={"Authorization": "Bearer s3cret"})
        assert status == 202
        status, _ = await h.get("/healthz")
        assert status == 200


async def test_custom_id_never_twice_in_a_file_nor_in_two_live_batches(
    db_url: str, tmp_path: Path
) -> None:
    emulator = Emulator(api_key=API_KEY, in_progress_seconds=30)
    async with running(db_url, tmp_path, emulator=emulator, max_batch_items=4) as h:
        await h.post({"tasks": [chat_task(f"u{i}", emulate="http_500*1") for i in range(10)]})
        await h.age_queue(901)
        await h.flush()
        await h.flush()  # a second tick while the first batches are live adds nothing
        seen: Counter[str] = Counter()
        for data in h.emulator.received_files.values():
            ids = [orjson.loads(line)["custom_id"] for line in _bytes(data).splitlines()]
            assert len(ids) == len(set(ids))
            seen.update(ids)
        assert set(seen.values()) == {1} and len(seen) == 10


def _bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    return bytes(getattr(data, "data", b"")) or bytes(getattr(data, "content", b""))


async def test_output_file_gone_at_the_provider_retries_its_tasks(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        h.emulator.inject("download", "http_404")
        await h.post({"tasks": [chat_task("lost1"), chat_task("lost2")]})
        await h.age_queue(901)
        await h.cycle()
        assert await h.count("state = 'queued' AND attempts = 1") == 2
        assert (
            await h.scalar("SELECT last_error->>'code' FROM tasks LIMIT 1") == "missing_from_output"
        )
        await h.run_until_settled()
        assert await h.count("state = 'succeeded' AND attempts = 2") == 2


async def test_flush_on_shutdown_sends_queued_windows_as_drain(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task(f"d{i}") for i in range(3)]})
        settings = h.settings.model_copy(
            update={"flush_on_shutdown": True, "shutdown_grace_seconds": 10}
        )
        replica = Service(
            settings,
            h.engine,
            OpenAIProvider(api_key=API_KEY, base_url=h.settings.openai_base_url, max_retries=0),
        )
        stop, started = asyncio.Event(), asyncio.Event()
        run = asyncio.create_task(replica.run(stop, started))
        await started.wait()
        stop.set()
        await run
        batches = await h.rows("SELECT flush_reason, item_count, state FROM batches")
        assert batches == [{"flush_reason": "drain", "item_count": 3, "state": "submitted"}]
