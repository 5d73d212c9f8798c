"""Large and hostile request bodies (issue 17, item 5): decoded in bounded
pieces as they stream in, limits that bite while reading, and still all or
nothing when the pieces of one request are stored while the next is read."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from tests.harness import chat_task, running

MiB = 1024 * 1024


def ndjson(tasks: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(t) for t in tasks)


def many(prefix: str, n: int) -> list[dict[str, Any]]:
    return [chat_task(f"{prefix}-{i}") for i in range(n)]


async def test_a_request_of_many_pieces_is_stored_whole(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        tasks = many("big", 6000)  # several pieces of the decoder
        status, body = await h.post({"tasks": tasks})
        assert status == 202 and body["accepted"] == 6000, body
        status, body = await h.post(tasks[:3000] + many("more", 3000), ndjson=True)
        assert status == 202, body
        assert (body["accepted"], body["duplicates"]) == (3000, 3000)
        # The same id twice in one request, pieces apart: a duplicate if the
        # body is the same, a 409 if not.
        status, body = await h.post(many("twice", 5000) + many("twice", 1), ndjson=True)
        assert status == 202 and (body["accepted"], body["duplicates"]) == (5000, 1)
        assert await h.count("true") == 14000


async def test_a_bad_task_in_a_late_piece_stores_nothing(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        tasks = many("late", 6000)
        tasks[5500]["body"].pop("model")
        status, body = await h.post(tasks, ndjson=True)
        assert status == 400 and body["error"]["index"] == 5500, body
        assert body["error"]["field"] == "body.model"
        tasks = many("clash", 6000)
        tasks[5999] = chat_task("clash-10", model="gpt-4.1")  # clash-10 came pieces before
        status, body = await h.post({"tasks": tasks})
        assert status == 409 and body["error"]["custom_ids"] == ["clash-10"], body
        await h.post(chat_task("stored-before", model="gpt-4.1"))
        tasks = [*many("against-stored", 6000), chat_task("stored-before")]
        status, body = await h.post(tasks, ndjson=True)
        assert status == 409 and body["error"]["custom_ids"] == ["stored-before"], body
        status, body = await h.post({"tasks": many("toomany", 10_001)})
        assert status == 413 and body["error"]["code"] == "too_many_tasks"
        # Earlier pieces of each were inserted in the request's transaction,
        # and rolled back with it.
        assert await h.count("true") == 1


class PeakRss:
    """The process's resident set sampled from a thread (the event loop may be busy)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return int(self.peak - self.base)


async def send_raw(port: int, content_type: bytes, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` from a task that keeps writing while the reply is read:
    the server may answer (and stop reading) long before the body ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: %s\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (port, content_type, len(body))
    )

    async def pump() -> None:
        try:
            for start in range(0, len(body), MiB):
                writer.write(body[start : start + MiB])
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the server stopped reading: expected once it has refused

    pumping = asyncio.create_task(pump())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    rest = await asyncio.wait_for(reader.read(65536), 60)
    pumping.cancel()
    writer.close()
    return int(head.split(b" ", 2)[1]), rest


async def test_a_60_mib_hostile_body_is_refused_within_a_memory_bound(
    db_url: str, tmp_path: Path
) -> None:
    """Issue 17: a 63 MiB NDJSON body of ``{}`` took the daemon from 129 MB
    to 2.94 GB and a 32 MiB body stalled /healthz for 2.9 s."""
    hostile_ndjson = b"{}\n" * (60 * MiB // 3)
    hostile_json = b'{"tasks": [' + b"{}," * (60 * MiB // 3) + b"{}]}"
    valid_ndjson = ndjson([chat_task(f"fine-{i}", "gpt-4o-mini") for i in range(200_000)])
    async with running(db_url, tmp_path) as h:
        port = h.service.port
        assert port is not None
        for content_type, body, code in (
            (b"application/x-ndjson", hostile_ndjson, "too_many_tasks"),
            (b"application/json", hostile_json, "too_many_tasks"),
            (b"application/x-ndjson", valid_ndjson, "too_many_tasks"),
        ):
            rss = PeakRss()
            healthz: list[float] = []

            async def probe(healthz: list[float] = healthz) -> None:
                while True:
                    started = time.monotonic()
                    status, _ = await h.get("/healthz")
                    healthz.append(time.monotonic() - started)
                    assert status == 200
                    await asyncio.sleep(0.01)

            prober = asyncio.create_task(probe())
            status, reply = await send_raw(port, content_type, body)
            prober.cancel()
            growth = rss.stop()
            assert status in (400, 413), reply
            assert orjson.loads(reply)["error"]["code"] == code
            # Far below the body's own size (the old decoder: 45x it).
            assert growth < 60 * MiB, growth / MiB
            assert healthz and max(healthz) < 1.0, max(healthz)
        assert await h.count("true") == 0


async def test_a_declared_oversize_body_is_refused_before_reading(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, max_request_bytes=1 * MiB) as h:
        port = h.service.port
        assert port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (port, 2 * MiB)
        )  # and not one byte of the body
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.close()
        assert head.split(b" ", 2)[1] == b"413"
        padded = [chat_task(f"chunked-{i}", content="x" * 400) for i in range(3000)]  # 1.4 MB
        status, body = await h.post(padded, ndjson=True)
        assert status == 413 and body["error"]["code"] == "payload_too_large"
        assert await h.count("true") == 0


async def test_a_body_that_stalls_between_pieces_is_dropped_and_stores_nothing(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, ingest_timeout_seconds=1) as h:
        port = h.service.port
        assert port is not None
        body = ndjson(many("stall", 6000))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/x-ndjson\r\nContent-Length: %d\r\n\r\n"
            % (port, len(body))
            + body[: len(body) // 2]
        )  # then nothing
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        reply = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        assert head.split(b" ", 2)[1] == b"408", head + reply
        assert await h.count("true") == 0
