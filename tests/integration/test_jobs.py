"""Jobs (DESIGN section 13): counters kept as tasks move, the results stream,
cancel (also racing a flush), the job callback, and scoping by client."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from sqlalchemy import text

from batchd.client import verify_callback
from batchd.domain import line_task_id
from batchd.jobs import Jobs
from batchd.store.engine import make_engine
from tests.harness import Harness, chat_task, running
from tests.integration.test_callbacks import AUTH, SECRET, callback_settings
from tests.invariants import job_counter_problems
from tests.receiver import Receiver

COUNTS = ("tasks", "queued", "submitted", "succeeded", "failed", "cancelled")


async def job(h: Harness, name: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, body = await h.get(f"/v1/jobs/{name}", headers=headers)
    assert status == 200, body
    return dict(body)


def counts(view: dict[str, Any]) -> dict[str, int]:
    return {k: view[k] for k in COUNTS}


async def sent_custom_ids(h: Harness) -> list[str]:
    """The custom_ids of every line the provider received (files carry
    batchd's line ids, which name the task)."""
    ids = [line_task_id(c) for b in h.emulator.record()["batches"] for c in b["custom_ids"]]
    names = {r["id"]: r["custom_id"] for r in await h.rows("SELECT id, custom_id FROM tasks")}
    return [names[i] for i in ids if i is not None]


async def results(
    h: Harness, name: str, headers: dict[str, str] | None = None, **params: str
) -> tuple[int, list[dict[str, Any]]]:
    async with h.http.get(
        f"{h.base_url}/v1/jobs/{name}/results", params=params, headers=headers
    ) as r:
        raw = await r.read()
        if r.status != 200:
            return r.status, [orjson.loads(raw)]
        assert r.content_type == "application/x-ndjson"
        return r.status, [orjson.loads(line) for line in raw.splitlines()]


async def test_counters_follow_tasks_through_retries_failures_and_replays(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, max_attempts=2) as h:
        tasks = [chat_task(f"ok-{i}", job="eval-1") for i in range(6)]
        tasks += [
            chat_task("flaky", emulate="http_500*1", job="eval-1"),
            chat_task("broken", emulate="http_400", job="eval-1"),
            chat_task("no-job"),
        ]
        status, body = await h.post({"tasks": tasks})
        assert (status, body["accepted"]) == (202, 9)
        view = await job(h, "eval-1")
        assert counts(view) == {
            "tasks": 8,
            "queued": 8,
            "submitted": 0,
            "succeeded": 0,
            "failed": 0,
            "cancelled": 0,
        }
        assert view["finished_at"] is None and view["spend_usd"] == "0.000000"

        await h.run_until_settled()
        view = await job(h, "eval-1")
        assert counts(view) == {
            "tasks": 8,
            "queued": 0,
            "submitted": 0,
            "succeeded": 7,
            "failed": 1,
            "cancelled": 0,
        }
        assert view["finished_at"] is not None
        spend = await h.scalar("""SELECT round(sum(r.cost_usd), 6) FROM results r
                                  JOIN tasks t USING (custom_id) WHERE t.job = 'eval-1'""")
        assert view["spend_usd"] == str(spend) and spend > 0
        sync = await h.scalar("""SELECT round(sum(r.sync_cost_usd), 6) FROM results r
                                 JOIN tasks t USING (custom_id) WHERE t.job = 'eval-1'""")
        assert view["sync_equivalent_usd"] == str(sync)
        assert view["savings_usd"] == str(sync - spend)
        assert await job_counter_problems(h.engine) == []

        # A replay reopens the job; the counters follow it out and back.
        status, _ = await h.post_json("/v1/failed/replay", {"custom_ids": ["broken"]})
        assert status == 200
        view = await job(h, "eval-1")
        assert (view["failed"], view["queued"], view["finished_at"]) == (0, 1, None)
        await h.run_until_settled()
        assert (await job(h, "eval-1"))["failed"] == 1
        # Folding the deltas into the row changes no answer.
        before = await job(h, "eval-1")
        await h.service.jobs.fold_all()
        assert await h.count("true", "job_deltas") == 0
        assert await job(h, "eval-1") == before
        assert await job_counter_problems(h.engine) == []


async def test_jobs_list_newest_first_and_page_by_name(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        for n in range(5):
            await h.post(chat_task(f"t-{n}", job=f"run-{n}"))
            await asyncio.sleep(0.01)
        names: list[str] = []
        after: str | None = None
        while True:
            params = {"limit": "2", **({"after": after} if after else {})}
            status, page = await h.get("/v1/jobs", None, **params)
            assert status == 200
            names += [j["job"] for j in page["jobs"]]
            after = page["next"]
            if not page["has_more"]:
                break
        assert names == [f"run-{n}" for n in range(4, -1, -1)]
        assert (await h.get("/v1/jobs/nope"))[0] == 404
        assert (await h.get("/v1/jobs", after="bad name!"))[0] == 400


async def test_results_read_in_pages_are_every_line_once_in_order(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        tasks = [
            chat_task(f"p{i}", job="paged", emulate="http_400" if i % 4 == 1 else None)
            for i in range(23)
        ]
        assert (await h.post({"tasks": tasks}))[0] == 202
        await h.run_until_settled()
        assert (await h.post({"tasks": [chat_task("late", job="paged")]}))[0] == 202
        _, whole = await results(h, "paged")
        assert [x["custom_id"] for x in whole] == [f"p{i}" for i in range(23)]

        async def read(**options: Any) -> list[bytes]:
            return b"".join(
                [c async for c in h.service.jobs.results("local", "paged", **options)]
            ).splitlines()

        one_page = await read(page=1000)
        assert [orjson.loads(x) for x in one_page] == whole
        for page in (1, 2, 5, 23, 24):
            assert await read(page=page) == one_page, page
        failed = await read(page=2, states=["failed"])
        assert [orjson.loads(x)["custom_id"] for x in failed] == [f"p{i}" for i in range(1, 23, 4)]
        ids = await h.rows("SELECT id FROM tasks WHERE job = 'paged' ORDER BY id")
        assert await read(page=3, after=ids[9]["id"]) == one_page[10:]


async def test_every_clients_jobs_page_newest_first_through_ties(db_url: str) -> None:
    """The admin's listing (the console's): each client's newest merged, and
    a (client, job) cursor that neither skips nor repeats jobs created in
    the same instant by different clients."""
    engine = make_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("""
                INSERT INTO jobs (client, job, created_at)
                SELECT c, 'run-' || g, timestamptz '2026-12-01' + (g / 2) * interval '1 hour'
                FROM unnest(ARRAY['alpha', 'beta', 'local']) c, generate_series(1, 7) g""")
            )
        jobs = Jobs(engine)
        seen: list[tuple[str, str]] = []
        after: tuple[str, str] | None = None
        while True:
            page = await jobs.page_all(after, 4)
            seen += [(j.client, j.job) for j in page]
            if len(page) < 4:
                break
            after = (page[-1].client, page[-1].job)
    finally:
        await engine.dispose()
    expected = sorted(
        ((c, f"run-{g}") for c in ("alpha", "beta", "local") for g in range(1, 8)),
        key=lambda k: (int(k[1][4:]) // 2, k[0], k[1]),
        reverse=True,
    )
    assert seen == expected


async def test_results_stream_in_task_order_filter_by_state_and_resume(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(
            {
                "tasks": [
                    chat_task(f"r-{i}", job="stream", emulate="http_400" if i % 3 == 0 else None)
                    for i in range(9)
                ]
            }
        )
        status, lines = await results(h, "stream")
        assert (status, lines) == (200, [])  # nothing finished yet
        await h.run_until_settled()
        status, lines = await results(h, "stream")
        assert [line["custom_id"] for line in lines] == [f"r-{i}" for i in range(9)]
        ok = [line for line in lines if line["state"] == "succeeded"]
        assert ok and all(line["response"]["object"] == "chat.completion" for line in ok)
        assert all(line["attempts"] == 1 for line in lines)
        bad = [line for line in lines if line["state"] == "failed"]
        assert [line["custom_id"] for line in bad] == ["r-0", "r-3", "r-6"]
        assert all("error" in line and "response" not in line for line in bad)
        _, only_failed = await results(h, "stream", state="failed")
        assert only_failed == bad
        _, rest = await results(h, "stream", after="r-4")
        assert rest == lines[5:]
        assert (await results(h, "stream", after="not-in-job"))[0] == 404
        assert (await results(h, "stream", state="queued"))[0] == 400
        assert (await results(h, "missing"))[0] == 404


async def test_results_stop_at_open_give_a_running_jobs_lines_in_their_final_order(
    db_url: str, tmp_path: Path
) -> None:
    """?stop_at_open=true ends before the first task not finished, so what a
    reader takes while the job runs is the start of the final stream and
    it can resume after its last line without a gap."""
    async with running(db_url, tmp_path) as h:
        await h.post(
            {
                "tasks": [
                    chat_task(f"o-{i}", job="live", emulate={1: "http_500*1", 3: "http_400"}.get(i))
                    for i in range(6)
                ]
            }
        )
        await h.age_queue(901)
        await h.cycle()  # o-1 is back in the queue for a retry; the rest finished
        assert (await h.task("o-1"))["state"] == "queued"
        _, running_now = await results(h, "live")
        assert [x["custom_id"] for x in running_now] == ["o-0", "o-2", "o-3", "o-4", "o-5"]
        _, prefix = await results(h, "live", stop_at_open="true")
        assert prefix == running_now[:1]
        assert (await results(h, "live", stop_at_open="true", after="o-0")) == (200, [])
        assert (await results(h, "live", stop_at_open="maybe"))[0] == 400

        async def read(**options: Any) -> list[bytes]:
            return b"".join(
                [
                    c
                    async for c in h.service.jobs.results(
                        "local", "live", stop_at_open=True, **options
                    )
                ]
            ).splitlines()

        for page in (1, 2, 1000):
            assert [orjson.loads(x) for x in await read(page=page)] == prefix, page
        assert await read(page=1, states=["failed"]) == []

        await h.run_until_settled()
        _, final = await results(h, "live")
        assert [x["custom_id"] for x in final] == [f"o-{i}" for i in range(6)]
        _, rest = await results(h, "live", stop_at_open="true", after="o-0")
        assert prefix + rest == final
        ids = await h.rows("SELECT id FROM tasks WHERE job = 'live' ORDER BY id")
        for page in (1, 4):
            assert [orjson.loads(x) for x in await read(page=page, after=ids[1]["id"])] == final[
                2:
            ], page
        assert [orjson.loads(x)["custom_id"] for x in await read(page=2, states=["failed"])] == [
            "o-3"
        ]


async def test_cancel_stops_queued_tasks_for_good_and_twice_is_harmless(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task(f"sent-{i}", job="backfill") for i in range(3)]})
        await h.age_queue(901)
        await h.flush()  # these three are at the provider now
        await h.post({"tasks": [chat_task(f"wait-{i}", job="backfill") for i in range(4)]})
        status, body = await h.post_json("/v1/jobs/backfill/cancel", {})
        assert status == 200, body
        assert body["cancelled_now"] == 4
        assert (body["cancelled"], body["submitted"], body["queued"]) == (4, 3, 0)
        assert body["cancelled_at"] is not None
        status, again = await h.post_json("/v1/jobs/backfill/cancel", {})
        assert (status, again["cancelled_now"], again["cancelled"]) == (200, 0, 4)

        # Tasks at the provider finish; the cancelled ones are never sent.
        await h.run_until_settled()
        view = await job(h, "backfill")
        assert counts(view) == {
            "tasks": 7,
            "queued": 0,
            "submitted": 0,
            "succeeded": 3,
            "failed": 0,
            "cancelled": 4,
        }
        assert sorted(await sent_custom_ids(h)) == ["sent-0", "sent-1", "sent-2"]
        task = await h.task("wait-0")
        assert task["state"] == "cancelled" and task["attempts"] == 0
        assert task["last_error"]["code"] == "cancelled"
        # Not failed, not in the manual queue, not replayable; its own report column.
        assert (await h.get("/v1/failed"))[1]["failed"] == []
        _, replay = await h.post_json("/v1/failed/replay", {"custom_ids": ["wait-0"]})
        assert replay["replayed"] == 0 and "cancelled" in replay["skipped"][0]["reason"]
        _, report = await h.get("/v1/report/daily")
        assert (report["cancelled"], report["failed"], report["succeeded"]) == (4, 0, 3)
        _, lines = await results(h, "backfill", state="cancelled")
        assert [line["custom_id"] for line in lines] == [f"wait-{i}" for i in range(4)]
        # Nothing joins a cancelled job.
        status, body = await h.post(chat_task("late", job="backfill"))
        assert (status, body["error"]["code"]) == (409, "job_cancelled")
        assert await h.count("custom_id = 'late'") == 0
        assert (await h.post_json("/v1/jobs/nope/cancel", {}))[0] == 404
        assert await job_counter_problems(h.engine) == []


async def test_a_retry_of_a_cancelled_jobs_task_is_cancelled_not_sent_again(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("retry-me", emulate="http_500*1", job="stop"))
        await h.age_queue(901)
        await h.flush()
        await h.post_json("/v1/jobs/stop/cancel", {})
        await h.cycle()  # the line comes back retryable: queued again
        await h.service.jobs.tick()
        task = await h.task("retry-me")
        assert (task["state"], task["attempts"]) == ("cancelled", 1)
        assert await job_counter_problems(h.engine) == []


@pytest.mark.parametrize("rounds", [12])
async def test_cancel_racing_a_flush_never_leaves_a_cancelled_task_in_a_batch(
    db_url: str, tmp_path: Path, rounds: int
) -> None:
    async with running(db_url, tmp_path, max_batch_items=50) as h:
        for r in range(rounds):
            name = f"race-{r}"
            await h.post({"tasks": [chat_task(f"{name}-{i}", job=name) for i in range(200)]})
            await h.age_queue(901)
            cancel = asyncio.create_task(h.post_json(f"/v1/jobs/{name}/cancel", {}))
            await asyncio.sleep(0.002 * (r % 4))
            await h.flush()
            status, body = await cancel
            assert status == 200, body
        await h.run_until_settled()
        sent = set(await sent_custom_ids(h))
        rows = await h.rows("SELECT custom_id, state, batch_id, attempts FROM tasks")
        cancelled = {r["custom_id"] for r in rows if r["state"] == "cancelled"}
        assert cancelled and not cancelled & sent
        assert all(
            r["batch_id"] is None and r["attempts"] == 0 for r in rows if r["state"] == "cancelled"
        )
        assert {r["custom_id"] for r in rows if r["state"] == "succeeded"} == sent
        assert await job_counter_problems(h.engine) == []


async def test_counters_stay_exact_under_concurrent_ingest_routing_and_cancels(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, max_batch_items=40, max_attempts=2) as h:

        async def sender(k: int) -> None:
            for n in range(6):
                await h.post(
                    {
                        "tasks": [
                            chat_task(
                                f"c{k}-{n}-{i}",
                                job=f"shared-{k % 2}",
                                emulate="http_500*1"
                                if i % 5 == 0
                                else "http_400"
                                if i % 7 == 0
                                else None,
                            )
                            for i in range(30)
                        ]
                    }
                )

        async def pipeline() -> None:
            for _ in range(8):
                await h.expire_backoffs()
                await h.age_queue(901)
                await h.cycle()
                await h.service.jobs.tick()

        await asyncio.gather(*(sender(k) for k in range(4)), pipeline())
        await h.post_json("/v1/jobs/shared-1/cancel", {})
        await h.run_until_settled()
        assert await job_counter_problems(h.engine) == []
        views = [await job(h, f"shared-{k}") for k in range(2)]
        assert [v["tasks"] for v in views] == [360, 360]
        assert all(v["queued"] == v["submitted"] == 0 and v["finished_at"] for v in views)


async def test_jobs_are_per_client(db_url: str, tmp_path: Path) -> None:
    a = {"Authorization": "Bearer tok-a"}
    b = {"Authorization": "Bearer tok-b"}
    async with running(db_url, tmp_path, ingest_tokens="alpha=tok-a,beta=tok-b") as h:
        await h.post(chat_task("a-1", job="nightly"), headers=a)
        await h.post(
            {"tasks": [chat_task("b-1", job="nightly"), chat_task("b-2", job="nightly")]}, headers=b
        )
        assert (await job(h, "nightly", a))["tasks"] == 1
        assert (await job(h, "nightly", b))["tasks"] == 2
        _, page = await h.get("/v1/jobs", headers=a)
        assert [j["job"] for j in page["jobs"]] == ["nightly"]
        _, done = await h.post_json("/v1/jobs/nightly/cancel", {}, headers=a)
        assert done["cancelled_now"] == 1
        assert (await job(h, "nightly", b))["cancelled"] == 0
        assert (await h.task_as("b-1", b))["state"] == "queued"
        _, lines = await results(h, "nightly", a)
        assert [line["custom_id"] for line in lines] == ["a-1"]
        _, lines = await results(h, "nightly", b)
        assert lines == []
        assert (await results(h, "nightly", b, after="a-1"))[0] == 404


async def test_a_finished_job_calls_back_once_signed(db_url: str, tmp_path: Path) -> None:
    receiver = Receiver(SECRET)
    url = await receiver.start()
    try:
        async with running(db_url, tmp_path, **callback_settings(tmp_path)) as h:
            status, body = await h.post(
                {
                    "tasks": [
                        chat_task("cb-1", job="with-hook", job_callback_url=f"{url}/jobs"),
                        chat_task("cb-2", job="with-hook"),
                    ]
                },
                headers=AUTH,
            )
            assert status == 202, body
            bad = await h.post(chat_task("cb-3", job_callback_url=f"{url}/jobs"), headers=AUTH)
            assert bad[0] == 400 and bad[1]["error"]["field"] == "job_callback_url"
            await h.age_queue(901)
            await h.cycle()
            await h.service.jobs.tick()
            await h.service.callbacks.drain()
            got = receiver.deliveries("/jobs")
            assert len(got) == 1 and got[0].verified
            payload = verify_callback(SECRET, got[0].headers, got[0].body)
            assert payload["type"] == "job" and payload["job"] == "with-hook"
            assert (payload["succeeded"], payload["tasks"], payload["queued"]) == (2, 2, 0)
            assert payload["finished_at"] is not None
            await h.service.jobs.tick()
            await h.service.callbacks.drain()
            assert len(receiver.deliveries("/jobs")) == 1
            # PUT moves the callback; a hostile URL is refused.
            status, body = await h.put_json(
                "/v1/jobs/with-hook", {"callback_url": f"{url}/other"}, headers=AUTH
            )
            assert (status, body["callback_url"]) == (200, f"{url}/other")
            status, body = await h.put_json(
                "/v1/jobs/with-hook", {"callback_url": "http://evil.example/x"}, headers=AUTH
            )
            assert status == 400
            assert (await h.put_json("/v1/jobs/nope", {"callback_url": None}, headers=AUTH))[
                0
            ] == 404
    finally:
        await receiver.stop()


async def test_status_reads_one_row_whatever_the_job_size(db_url: str, tmp_path: Path) -> None:
    """The status of a 100,000-task job plans as the same two index probes
    as a 10-task job's (the benchmark times them)."""
    async with running(db_url, tmp_path) as h:
        await seed_job(h, "big", 100_000)
        await seed_job(h, "small", 10)
        for name, n in (("big", 100_000), ("small", 10)):
            view = await job(h, name)
            assert (view["tasks"], view["succeeded"]) == (n, n)
            plan = await h.scalar(f"""EXPLAIN (ANALYZE, FORMAT JSON, COSTS OFF)
                SELECT * FROM jobs j, LATERAL (SELECT count(*) FROM job_deltas d
                WHERE d.client = j.client AND d.job = j.job) x
                WHERE j.client = 'local' AND j.job = '{name}'""")
            assert "Seq Scan" not in orjson.dumps(plan).decode()


async def seed_job(h: Harness, name: str, n: int, response_bytes: int = 50) -> None:
    """``n`` succeeded tasks of a job with results, written by SQL (not the
    API), and the job's counters as the pipeline would have left them."""
    await h.execute(f"""
        WITH t AS (
            INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes,
                               state, attempts, finished_at, job)
            SELECT '{name}-' || g, '/v1/chat/completions', 'gpt-4o-mini', '{{}}', 'd', 10,
                   'succeeded', 1, now(), '{name}' FROM generate_series(1, {n}) g
            RETURNING id, client, custom_id)
        INSERT INTO results (task_id, client, custom_id, batch_id, status_code, response,
                             cost_usd, sync_cost_usd)
        SELECT id, client, custom_id, 'seed', 200,
               jsonb_build_object('object', 'chat.completion',
                                  'pad', repeat('x', {response_bytes})),
               0.000001, 0.000002 FROM t""")
    await h.execute(f"""
        INSERT INTO jobs (client, job, tasks, succeeded, spend_usd, sync_equivalent_usd,
                          finished_at)
        VALUES ('local', '{name}', {n}, {n}, {n} * 0.000001, {n} * 0.000002, now())""")


async def test_results_of_a_100000_task_job_stream_in_flat_memory(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await seed_job(h, "wide", 100_000, response_bytes=400)
        received = 0
        lines = 0
        tracemalloc.start()
        try:
            async with h.http.get(
                f"{h.base_url}/v1/jobs/wide/results", timeout=aiohttp.ClientTimeout(total=300)
            ) as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(1 << 16):
                    received += len(chunk)
                    lines += chunk.count(b"\n")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert lines == 100_000
        assert received > 40_000_000
        # The whole answer is 40+ MB; server and client together held a few
        # pages of it at most.
        assert peak < received / 8, (peak, received)


async def test_a_sync_call_given_back_moves_its_job_back_to_queued(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("refused", lane="sync", emulate="http_401", job="rush"))
        await h.service.sync_lane.tick()
        await h.service.sync_lane.wait_calls()
        task = await h.task("refused")
        assert (task["state"], task["attempts"]) == ("queued", 0)
        view = await job(h, "rush")
        assert (view["queued"], view["submitted"]) == (1, 0)
        assert await job_counter_problems(h.engine) == []
