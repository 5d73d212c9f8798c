"""batchd.client (async and sync) and `batchd submit` against a live service."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from batchd.client import (
    BatchdClient,
    BatchdClientError,
    SubmitError,
    SyncBatchdClient,
    TaskNotFound,
)
from tests.harness import chat_task, running

TOKEN = "tok-client-tests"  # noqa: S105 (a test token)


def _tasks(prefix: str, n: int, *, bad: set[int] | None = None) -> list[dict[str, Any]]:
    return [
        chat_task(f"{prefix}{i}", emulate="http_400" if i in (bad or set()) else None)
        for i in range(n)
    ]


async def test_async_client_submits_in_chunks_waits_and_pages_results(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, ingest_tokens=f"svc={TOKEN}") as h:
        tasks = _tasks("a", 25, bad={7})
        async with BatchdClient(h.base_url, TOKEN) as client:
            seen: list[int] = []
            summary = await client.submit(tasks, chunk=10, progress=seen.append)
            assert (summary.tasks, summary.accepted, summary.duplicates, summary.requests) == (
                25,
                25,
                0,
                3,
            )
            assert seen == [10, 20, 25]
            again = await client.submit(tasks, chunk=10)
            assert (again.accepted, again.duplicates) == (0, 25)
            assert (await client.submit_one(chat_task("one")))["state"] == "queued"
            assert (await client.get_task("a3"))["state"] == "queued"
            with pytest.raises(TaskNotFound):
                await client.get_task("nobody")

            settle = asyncio.create_task(h.run_until_settled())
            done = await client.wait([t["custom_id"] for t in tasks], timeout=120, interval=0.05)
            await settle
            assert len(done) == 25 and done["a7"]["state"] == "failed"
            assert all(v["state"] == "succeeded" for k, v in done.items() if k != "a7")

            rows = [r async for r in client.results(limit=10)]
            assert sorted(r["custom_id"] for r in rows) == sorted(
                [t["custom_id"] for t in tasks if t["custom_id"] != "a7"] + ["one"]
            )
            last = rows[-2]["seq"]
            assert [r["custom_id"] async for r in client.results(after=last)] == [
                rows[-1]["custom_id"]
            ]
        assert await h.count("client = 'svc'") == 26


async def test_refused_chunk_says_which_task_and_how_many_were_stored(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        tasks = _tasks("r", 30)
        del tasks[14]["body"]["model"]
        async with BatchdClient(h.base_url) as client:
            with pytest.raises(SubmitError) as caught:
                await client.submit(tasks, chunk=10)
        err = caught.value
        assert err.status == 400 and err.code == "invalid_task"
        assert err.stored == 10 and err.task_index == 14
        assert err.details["field"] == "body.model"
        assert await h.count("true") == 10


async def test_sync_client_from_a_thread_without_a_loop(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:

        def use_it() -> tuple[Any, ...]:
            with SyncBatchdClient(h.base_url) as client:
                summary = client.submit(_tasks("s", 5), chunk=2)
                view = client.get_task("s1")
                return summary, view

        summary, view = await asyncio.to_thread(use_it)
        assert (summary.accepted, summary.requests) == (5, 3)
        assert view["state"] == "queued"
        await h.run_until_settled()

        def read_back() -> tuple[Any, ...]:
            with SyncBatchdClient(h.base_url) as client:
                done = client.wait([f"s{i}" for i in range(5)], timeout=30)
                rows = list(client.results(limit=2))
                return done, rows

        done, rows = await asyncio.to_thread(read_back)
        assert {v["state"] for v in done.values()} == {"succeeded"}
        assert sorted(r["custom_id"] for r in rows) == [f"s{i}" for i in range(5)]
    with SyncBatchdClient("http://127.0.0.1:9") as client:
        with pytest.raises(RuntimeError, match="running event loop"):
            client.get_task("x")


async def test_client_retries_429_and_503_after_retry_after(tmp_path: Path) -> None:
    """A loopback stand-in that sheds load first, then accepts."""
    answers = [(429, "1"), (503, None)]
    hits: list[float] = []

    async def tasks_handler(request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        lines = (await request.read()).splitlines()
        if answers:
            status, after = answers.pop(0)
            headers = {"Retry-After": after} if after else {}
            return web.json_response(
                {"error": {"code": "busy", "message": "later"}}, status=status, headers=headers
            )
        return web.json_response(
            {
                "accepted": len(lines),
                "duplicates": 0,
                "tasks": [
                    {"custom_id": orjson.loads(x)["custom_id"], "state": "queued"} for x in lines
                ],
            },
            status=202,
        )

    app = web.Application()
    app.router.add_post("/v1/tasks", tasks_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with BatchdClient(url, backoff=0.01) as client:
            summary = await client.submit(_tasks("x", 3))
            assert (summary.accepted, summary.retries) == (3, 2)
            assert hits[1] - hits[0] >= 0.95  # honoured Retry-After: 1
        answers.extend([(429, "0")] * 3)
        async with BatchdClient(url, retries=2, backoff=0.01) as client:
            with pytest.raises(BatchdClientError) as caught:
                await client.submit(_tasks("y", 1))
            assert caught.value.status == 429
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- batchd submit


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "submit",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _write(path: Path, tasks: list[dict[str, Any]], blank_after: int | None = None) -> Path:
    lines = [orjson.dumps(t).decode() for t in tasks]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_submit_command_sends_a_file_and_waits_for_it(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, ingest_tokens=TOKEN) as h:
        good = _write(tmp_path / "good.jsonl", _tasks("f", 12, bad={3}), blank_after=5)
        code, out, _ = await _cli(
            str(good), "--url", h.base_url, "--token", TOKEN, "--chunk", "5", "--job", "good-run"
        )
        assert code == 0
        assert "submitted 12 task(s)" in out and "3 request(s)" in out and "12 accepted" in out
        assert "as job good-run" in out
        assert await h.count("job = 'good-run'") == 12

        results = tmp_path / "results.jsonl"
        waiting = asyncio.create_task(
            _cli(
                str(good),
                "--url",
                h.base_url,
                "--token",
                TOKEN,
                "--wait",
                "120",
                "--job",
                "good-run",
                "--out",
                str(results),
            )
        )
        await h.run_until_settled()
        code, out, _ = await waiting
        assert "0 accepted, 12 duplicate(s)" in out
        assert "job good-run: 12 task(s): 11 succeeded, 1 failed, 0 cancelled" in out
        assert f"wrote 12 result(s) to {results}" in out
        lines = {r["custom_id"]: r for r in map(orjson.loads, results.read_bytes().splitlines())}
        # In the order the tasks were accepted: chunks in flight together may
        # commit in any order.
        assert sorted(lines) == sorted(f"f{i}" for i in range(12))
        assert lines["f3"]["state"] == "failed" and lines["f4"]["response"]["object"]
        assert code == 1  # a failed task is worth a non-zero exit

        # The default job is the file's stem and the time; an all-duplicate
        # resubmission is an empty job, finished at once.
        code, out, _ = await _cli(str(good), "--url", h.base_url, "--token", TOKEN, "--wait", "30")
        assert code == 0 and "as job good-20" in out and ": 0 task(s)" in out

        broken = _tasks("g", 8)
        broken[6]["endpoint"] = "/v1/nowhere"
        path = _write(tmp_path / "broken.jsonl", broken, blank_after=2)
        code, _, err = await _cli(str(path), "--url", h.base_url, "--token", TOKEN, "--chunk", "4")
        assert code == 1
        assert f"{path}:8: refused (400 invalid_task)" in err and "endpoint" in err
        assert "4 task(s) were stored" in err

        (tmp_path / "junk.jsonl").write_text('{"custom_id": "j1"}\n{not json\n')
        code, _, err = await _cli(str(tmp_path / "junk.jsonl"), "--url", h.base_url)
        assert code == 2 and "junk.jsonl:2: not valid JSON" in err and "nothing was sent" in err
        assert await h.count("custom_id LIKE 'j%'") == 0


async def test_submit_command_draws_a_progress_bar_on_a_terminal(
    db_url: str, tmp_path: Path
) -> None:
    import fcntl
    import os
    import pty
    import struct
    import termios

    async with running(db_url, tmp_path) as h:
        path = _write(tmp_path / "tty.jsonl", _tasks("t", 30))
        leader, follower = pty.openpty()
        # A terminal 100 columns wide (a fresh pty has no size at all).
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "batchd",
                "submit",
                str(path),
                "--url",
                h.base_url,
                "--chunk",
                "10",
                stdout=asyncio.subprocess.PIPE,
                stderr=follower,
            )
            out, _ = await proc.communicate()
            os.close(follower)
            follower = -1
            drawn = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                drawn += chunk
        finally:
            os.close(leader)
            if follower != -1:
                os.close(follower)
        assert proc.returncode == 0 and b"submitted 30 task(s)" in out
        bar = drawn.decode(errors="replace")
        assert "submitted: 100%" in bar and "30/30" in bar, bar


# ------------------------------------------------------------------- jobs


async def _batchd(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class _CuttingProxy:
    """A loopback stand-in in front of batchd that passes every request on,
    and cuts the connection part-way through a line of the first results
    streams longer than the next of ``cuts`` bytes."""

    def __init__(self, upstream: str, cuts: list[int], *, drop_stop: bool = False) -> None:
        self.upstream = upstream
        self.cuts = cuts
        self.drop_stop = drop_stop  # a daemon from before ?stop_at_open ignores it
        self.cut = 0
        self.results_reads: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        self.http = aiohttp.ClientSession()
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def close(self) -> None:
        await self.runner.cleanup()
        if self.http is not None:
            await self.http.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.http is not None
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() in ("authorization", "content-type")
        }
        params = {
            k: v for k, v in request.query.items() if not (self.drop_stop and k == "stop_at_open")
        }
        async with self.http.request(
            request.method,
            self.upstream + request.path,
            params=params,
            data=await request.read(),
            headers=headers,
        ) as up:
            body = await up.read()
            kind = up.headers.get("Content-Type", "application/json")
        if request.path.endswith("/results"):
            self.results_reads.append(request.query_string)
            if self.cuts and len(body) > self.cuts[0]:
                cut = self.cuts.pop(0)
                assert body[cut - 1 : cut] != b"\n"  # part-way through a line
                partial = web.StreamResponse(status=up.status, headers={"Content-Type": kind})
                await partial.prepare(request)
                await partial.write(body[:cut])
                self.cut += 1
                assert request.transport is not None
                request.transport.close()
                return partial
        return web.Response(status=up.status, body=body, headers={"Content-Type": kind})


async def test_wait_writes_results_while_the_job_runs_identical_to_a_later_read(
    db_url: str, tmp_path: Path
) -> None:
    """submit --wait --out's client call: the lines finished while the job
    runs are written then, in their final order, and the file ends byte for
    byte what `job results` writes after the job, though every stream of the
    wait was cut part-way through a line and resumed."""
    async with running(db_url, tmp_path) as h:
        first = [
            chat_task(f"w{i:02}", emulate={2: "http_400", 5: "http_500*1"}.get(i))
            for i in range(30)
        ]
        second = [chat_task(f"w{i:02}") for i in range(30, 50)]
        proxy = _CuttingProxy(h.base_url, [150, 700, 2500])
        url = await proxy.start()
        out = tmp_path / "live.jsonl"
        part = out.with_name(out.name + ".part")
        waiting: asyncio.Task[tuple[dict[str, Any], int]] | None = None
        try:
            async with BatchdClient(url, backoff=0.01) as client:
                await client.submit(first, job="live", chunk=7, concurrency=3)
                await h.age_queue(901)
                await h.flush()
                await client.submit(second, job="live", chunk=7, concurrency=3)
                waiting = asyncio.create_task(
                    client.wait_job_results("live", out, timeout=120, interval=0.05, min_tasks=50)
                )
                await h.make_polls_due()
                await h.service.poller.tick()  # the first 30 finish, w05 goes back for a retry
                # Chunks in flight together commit in any order: the task
                # order is the ids'.
                order = [
                    r["custom_id"]
                    for r in await h.rows(
                        "SELECT custom_id FROM tasks WHERE job = 'live' ORDER BY id"
                    )
                ]
                before_open = order[: order.index("w05")]
                assert before_open
                for _ in range(200):
                    if part.exists() and part.read_bytes().count(b"\n") == len(before_open):
                        break
                    await asyncio.sleep(0.05)
                early = part.read_bytes()
                assert [orjson.loads(x)["custom_id"] for x in early.splitlines()] == before_open
                assert not waiting.done() and not out.exists()
                await h.run_until_settled()
                view, lines = await waiting
            assert (view["succeeded"], view["failed"], lines) == (49, 1, 50)
            assert not part.exists()
            assert proxy.cut >= 2 and any("stop_at_open=true" in q for q in proxy.results_reads)
            async with BatchdClient(h.base_url) as direct:
                assert await direct.write_job_results("live", tmp_path / "later.jsonl") == 50
            written = out.read_bytes()
            assert written == (tmp_path / "later.jsonl").read_bytes()
            assert written.startswith(early)
            ids = [orjson.loads(x)["custom_id"] for x in written.splitlines()]
            assert ids == order and len(set(ids)) == 50
        finally:
            if waiting is not None and not waiting.done():
                waiting.cancel()
            await proxy.close()


async def test_wait_writes_the_whole_file_again_when_the_daemon_skips_open_tasks(
    db_url: str, tmp_path: Path
) -> None:
    """Against a daemon that ignores ?stop_at_open (it leaves out the tasks
    not finished and goes on), the lines read while the job ran have gaps:
    the count at the end says so and the file is read again, whole."""
    async with running(db_url, tmp_path) as h:
        proxy = _CuttingProxy(h.base_url, [], drop_stop=True)
        url = await proxy.start()
        out = tmp_path / "old.jsonl"
        waiting: asyncio.Task[tuple[dict[str, Any], int]] | None = None
        try:
            async with BatchdClient(url) as client:
                await client.submit(
                    [
                        chat_task(f"o{i}", emulate="http_500*1" if i == 1 else None)
                        for i in range(6)
                    ],
                    job="old",
                )
                waiting = asyncio.create_task(
                    client.wait_job_results("old", out, timeout=120, interval=0.05)
                )
                await h.age_queue(901)
                await h.cycle()  # o1 goes back for a retry; the rest finished
                part = out.with_name(out.name + ".part")
                for _ in range(200):
                    if part.exists() and part.read_bytes().count(b"\n") == 5:
                        break
                    await asyncio.sleep(0.05)
                assert part.read_bytes().count(b"\n") == 5  # o1 skipped: a gap
                await h.run_until_settled()
                view, lines = await waiting
            assert (view["tasks"], lines) == (6, 6)
            assert [orjson.loads(x)["custom_id"] for x in out.read_bytes().splitlines()] == [
                f"o{i}" for i in range(6)
            ]
        finally:
            if waiting is not None and not waiting.done():
                waiting.cancel()
            await proxy.close()


async def test_job_commands_show_list_cancel_and_write_results(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task(f"k{i}", job="nightly") for i in range(4)]})
        await h.post(chat_task("other", job="older"))
        await h.age_queue(901)
        await h.flush()
        await h.post({"tasks": [chat_task(f"q{i}", job="nightly") for i in range(3)]})
        url = ["--url", h.base_url]
        code, out, _ = await _batchd("job", "nightly", *url)
        view = orjson.loads(out)
        assert code == 0 and (view["tasks"], view["queued"], view["submitted"]) == (7, 3, 4)
        code, out, _ = await _batchd("jobs", *url)
        assert code == 0 and out.index("job older:") < out.index("job nightly:")  # newest first
        code, out, _ = await _batchd("job", "cancel", "nightly", *url)
        assert code == 0 and "cancelled 3 queued task(s); 4 at the provider" in out
        await h.run_until_settled()
        out_file = tmp_path / "nightly.jsonl"
        code, out, _ = await _batchd("job", "results", "nightly", "--out", str(out_file), *url)
        assert code == 0 and "wrote 7 result(s)" in out
        states = [orjson.loads(line)["state"] for line in out_file.read_bytes().splitlines()]
        assert states == ["succeeded"] * 4 + ["cancelled"] * 3
        code, out, _ = await _batchd(
            "job", "results", "nightly", "--state", "cancelled", "--out", str(out_file), *url
        )
        assert code == 0 and "wrote 3 result(s)" in out
        code, _, err = await _batchd("job", "nobody", *url)
        assert code == 2 and "404 not_found" in err
        code, _, err = await _batchd("job", "results", "nightly", *url)
        assert code == 2 and "needs --out" in err


async def test_clients_submit_into_a_job_wait_on_it_and_iterate_its_results(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, ingest_tokens=f"svc={TOKEN}") as h:
        tasks = _tasks("j", 30, bad={5})
        tasks[7]["job"] = "its-own"
        async with BatchdClient(h.base_url, TOKEN) as client:
            summary = await client.submit(tasks, chunk=4, job="eval", concurrency=3)
            assert (summary.tasks, summary.accepted, summary.requests) == (30, 30, 8)
            assert (await client.get_job("eval"))["tasks"] == 29
            assert (await client.get_job("its-own"))["tasks"] == 1
            seen: list[int] = []
            settle = asyncio.create_task(h.run_until_settled())
            final = await client.wait_job(
                "eval", timeout=120, interval=0.05, progress=lambda v: seen.append(v["succeeded"])
            )
            await settle
            assert (final["succeeded"], final["failed"]) == (28, 1)
            assert seen == sorted(seen)
            lines = [r async for r in client.job_results("eval")]
            # In the order they were accepted: chunks in flight together may
            # commit in any order.
            assert sorted(r["custom_id"] for r in lines) == sorted(
                t["custom_id"] for t in tasks if t["custom_id"] != "j7"
            )
            assert [r["custom_id"] async for r in client.job_results("eval", state="failed")] == [
                "j5"
            ]
            cut = lines[20]["custom_id"]
            rest = [r["custom_id"] async for r in client.job_results("eval", after=cut)]
            assert rest == [r["custom_id"] for r in lines[21:]]
            assert {j["job"] async for j in client.jobs()} == {"eval", "its-own"}
            with pytest.raises(TaskNotFound):
                await client.get_job("missing")

        def sync_side() -> tuple[dict[str, Any], list[str], int]:
            with SyncBatchdClient(h.base_url, TOKEN) as sync:
                sync.submit(_tasks("s", 3), job="sync-job")
                cancelled = sync.cancel_job("sync-job")
                ids = [r["custom_id"] for r in sync.job_results("sync-job")]
                n = sync.write_job_results("sync-job", tmp_path / "sync.jsonl")
                view, waited = sync.wait_job_results(
                    "sync-job", tmp_path / "waited.jsonl", timeout=30
                )
                assert (view["cancelled"], waited) == (3, 3)
                return cancelled, ids, n

        cancelled, ids, n = await asyncio.to_thread(sync_side)
        assert cancelled["cancelled_now"] == 3 and ids == ["s0", "s1", "s2"] and n == 3
        assert (tmp_path / "waited.jsonl").read_bytes() == (tmp_path / "sync.jsonl").read_bytes()
