"""batchd benchmark: one table, every figure beside a reference measured in the same run.

Run it with ``scripts/bench`` (makes .venv-bench with batchd, pgqueuer,
procrastinate and the profilers, then runs this file); ``--help`` lists the
knobs, ``--quick`` shrinks every row for a smoke run. It creates its own
database on the server (BATCHD_BENCH_DATABASE_URL, else 127.0.0.1:5432) and
drops it at the end; the daemon and the emulator run as subprocesses, the
load comes from this process over loopback.

Not a test: pytest does not collect it (no test_ prefix) and CI never runs it.
Figures on a shared machine are noisy; each row is the median of ``--runs``
runs unless it says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from batchd.contract import contract_for, parse_task  # noqa: E402
from batchd.decode import BodyPieces, task_bytes_cap  # noqa: E402
from batchd.domain import Limits, Routing, TaskIn, input_line, line_task_id  # noqa: E402
from batchd.ingest import validate_piece  # noqa: E402

DEFAULT_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
ENDPOINT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
BODY_BYTES = 500
API_KEY = "bench-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The parse row on main just before the typed contract (batchd/contract.py), at
# c42f529, median of 7 runs: the contract's target is not to rise past it.
PARSE_BEFORE_US = 8.46


# ------------------------------------------------------------------ workload


def _filler(n: int) -> str:
    words = "the quick brown fox jumps over a lazy dog while batchd queues it up ".split()
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(words[len(out) % len(words)])
    return " ".join(out)[:n]


@functools.cache
def _fill(n: int) -> str:
    return _filler(n)


def make_body(i: int) -> dict[str, Any]:
    """A chat request of exactly BODY_BYTES bytes of JSON."""
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": [{"role": "user", "content": ""}],
    }
    base = len(orjson.dumps(body)) + len(f"{i:09d} ")
    body["messages"][0]["content"] = f"{i:09d} " + _fill(BODY_BYTES - base)
    return body


_MARK = 999_999_999
_HEAD, _TAIL = orjson.dumps({"custom_id": "@", "body": make_body(_MARK)}).split(b"@")
_BODY_HEAD, _BODY_TAIL = _TAIL.split(str(_MARK).encode())


def task_json(prefix: str, i: int) -> bytes:
    """orjson.dumps({"custom_id": ..., "body": make_body(i)}), from a template:
    the load generator must stay cheap next to the server it loads."""
    return b"".join((_HEAD, f"{prefix}-{i:09d}".encode(), _BODY_HEAD, b"%09d" % i, _BODY_TAIL))


def ndjson(prefix: str, start: int, n: int) -> bytes:
    return b"\n".join(task_json(prefix, i) for i in range(start, start + n))


# ------------------------------------------------------------ tiny HTTP client


class _Conn(asyncio.Protocol):
    """Keep-alive HTTP/1.1 over a raw transport: the load generator must cost
    far less CPU than the server it measures (an aiohttp client would not)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"content-length:")
        stop = head.find(b"\r\n", at)
        n = int(head[at + 15 : stop if stop > 0 else None])
        total = end + 4 + n
        if len(self.buf) < total:
            return
        status = int(head[9:12])
        body = bytes(self.buf[end + 4 : total])
        del self.buf[:total]
        waiter, self.waiter = self.waiter, None
        if not waiter.done():
            waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


async def connect(port: int) -> _Conn:
    _t, proto = await asyncio.get_running_loop().create_connection(_Conn, "127.0.0.1", port)
    return proto


def post(port: int, body: bytes, content_type: str = "application/json") -> bytes:
    # Host names the port: a daemon without tokens answers nothing else.
    return (
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:"
        + str(port).encode()
        + b"\r\nContent-Type: "
        + content_type.encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


# --------------------------------------------------------------- environment


def with_db(url: str, name: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def migrate(url: str) -> None:
    from alembic import command

    from batchd.service import alembic_config
    from batchd.store.engine import async_url

    command.upgrade(alembic_config(async_url(url)), "head")


async def reset(url: str) -> None:
    await admin(
        url,
        "TRUNCATE tasks, batches, results, task_events, jobs, job_deltas, "
        "callbacks RESTART IDENTITY CASCADE; CHECKPOINT",
    )


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / CLK_TCK, sum(ticks) / CLK_TCK


class Proc:
    """A subprocess whose stderr/stdout lines are kept (the last few) and scanned."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen(
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        self.lines: list[str] = []
        self._found: asyncio.Future[str] | None = None
        self._pattern: re.Pattern[str] | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.p.pid

    async def wait_for(self, pattern: str, limit: float = 60) -> str:
        loop = asyncio.get_running_loop()
        self._pattern = re.compile(pattern)
        self._found = loop.create_future()
        for line in self.lines:
            if m := self._pattern.search(line):
                return m.group(1)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read())
        try:
            return await asyncio.wait_for(self._found, limit)
        except TimeoutError:
            raise RuntimeError(
                "subprocess did not start:\n" + "\n".join(self.lines[-30:])
            ) from None

    async def _read(self) -> None:
        assert self.p.stdout is not None
        while True:
            line = await asyncio.to_thread(self.p.stdout.readline)
            if not line:
                if self._found is not None and not self._found.done():
                    self._found.set_exception(
                        RuntimeError("subprocess exited:\n" + "\n".join(self.lines[-30:]))
                    )
                return
            self.lines.append(line.rstrip())
            del self.lines[:-200]
            if self._pattern and self._found and not self._found.done():
                if m := self._pattern.search(line):
                    self._found.set_result(m.group(1))

    async def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.p.wait), 40)
            except TimeoutError:
                self.p.kill()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


async def start_emulator() -> tuple[Proc, str]:
    proc = Proc(
        [sys.executable, "-m", "batchd.emulator.openai", "--port", "0", "--api-key", API_KEY],
        dict(os.environ),
    )
    url = await proc.wait_for(r"listening on (\S+)")
    return proc, url


async def start_daemon(
    db_url: str, provider_url: str, data_dir: Path, **settings: Any
) -> tuple[Proc, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHD_")}
    env.update(
        {
            "BATCHD_DATABASE_URL": db_url,
            "BATCHD_OPENAI_BASE_URL": provider_url,
            "OPENAI_API_KEY": API_KEY,
            "BATCHD_HTTP_PORT": "0",
            "BATCHD_DATA_DIR": str(data_dir),
            "BATCHD_LOG_FORMAT": "json",
            "BATCHD_LOG_LEVEL": "info",
        }
    )
    env.update({f"BATCHD_{k.upper()}": str(v) for k, v in settings.items()})
    proc = Proc([sys.executable, "-m", "batchd", "serve"], env)
    line = await proc.wait_for(r'(.*"service\.started".*)')
    return proc, int(orjson.loads(line)["port"])


# ------------------------------------------------------------------- results


@dataclass
class Row:
    what: str
    reference: str
    ratio: str
    absolute: str
    target: str
    met: bool | None
    note: str = ""


@dataclass
class Bench:
    args: argparse.Namespace
    admin_url: str
    db_url: str = ""
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="batchd-bench-")))
    rows: list[Row] = field(default_factory=list)
    emulator: Proc | None = None
    provider_url: str = ""
    extra_dbs: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", file=sys.stderr, flush=True)

    async def new_db(self, suffix: str, *, batchd_schema: bool) -> str:
        name = f"batchd_bench_{os.getpid()}_{suffix}"
        await admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin(self.admin_url, f'CREATE DATABASE "{name}"')
        self.extra_dbs.append(name)
        url = with_db(self.admin_url, name)
        if batchd_schema:
            await asyncio.to_thread(migrate, url)
        return url

    async def drop_dbs(self) -> None:
        for name in self.extra_dbs:
            with contextlib.suppress(Exception):
                await admin(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_rate(x: float, unit: str = "tasks/s") -> str:
    return f"{x:,.0f} {unit}"


def spread(xs: list[float]) -> str:
    return f"(n={len(xs)}, min {min(xs):,.0f}, max {max(xs):,.0f})" if len(xs) > 1 else "(n=1)"


# ------------------------------------------------------------ row 1: bulk

_RAW_INSERT_COLS = (
    "custom_id, endpoint, model, body, body_digest, line_bytes, "
    "est_input_tokens, est_output_tokens, lane"
)


def raw_rows(tasks: list[TaskIn]) -> list[tuple[Any, ...]]:
    return [
        (
            t.custom_id,
            t.endpoint,
            t.model,
            orjson.dumps(t.body).decode(),
            t.digest,
            t.line_bytes,
            t.est_input_tokens,
            t.est_output_tokens,
            "batch",
        )
        for t in tasks
    ]


def multi_row_insert(n: int) -> str:
    values = ",".join(
        "(" + ",".join(f"${r * 9 + c + 1}" + ("::jsonb" if c == 3 else "") for c in range(9)) + ")"
        for r in range(n)
    )
    return (
        f"INSERT INTO tasks ({_RAW_INSERT_COLS}) VALUES {values} "
        "ON CONFLICT (client, custom_id) DO NOTHING"
    )


async def raw_bulk(url: str, requests: list[list[tuple[Any, ...]]], concurrency: int) -> float:
    """The raw PostgreSQL limit: multi-row INSERT ... ON CONFLICT DO NOTHING of
    the same rows, one statement (and one durable commit) per 1,000 rows."""
    pool = await asyncpg.create_pool(url, min_size=concurrency, max_size=concurrency)
    sql = multi_row_insert(len(requests[0]))
    queue = list(reversed(requests))
    try:

        async def worker() -> None:
            async with pool.acquire() as conn:
                stmt = await conn.prepare(sql)
                while queue:
                    rows = queue.pop()
                    flat = [v for r in rows for v in r]
                    if len(rows) != len(requests[0]):
                        await conn.execute(multi_row_insert(len(rows)), *flat)
                    else:
                        await stmt.fetch(*flat)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0
    finally:
        await pool.close()


async def http_bulk(port: int, bodies: list[bytes], concurrency: int) -> float:
    queue = list(reversed(bodies))
    conns = [await connect(port) for _ in range(concurrency)]

    async def worker(c: _Conn) -> None:
        while queue:
            status, reply = await c.request(post(port, queue.pop(), "application/x-ndjson"))
            if status != 202:
                raise RuntimeError(f"bulk POST answered {status}: {reply[:200]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    took = time.perf_counter() - t0
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return took


# ----------------------------------------------------- row 2/3: single POSTs


async def http_single(port: int, bodies: list[bytes], clients: int) -> float:
    queue = list(reversed(bodies))
    conns = [await connect(port) for _ in range(clients)]

    async def worker(c: _Conn) -> None:
        while queue:
            status, reply = await c.request(post(port, queue.pop()))
            if status != 202:
                raise RuntimeError(f"POST answered {status}: {reply[:200]!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    took = time.perf_counter() - t0
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    return took


async def open_loop(
    port: int, bodies: list[bytes], rate: float, max_conns: int = 128
) -> list[float]:
    """Send at a fixed rate whatever the answers do; latency counts from the
    planned send time, so a stall is not hidden (no coordinated omission)."""
    idle = [await connect(port) for _ in range(32)]
    latencies: list[float] = []
    pending: set[asyncio.Task[None]] = set()
    opened = len(idle)
    freed = asyncio.Event()

    async def one(c: _Conn, raw: bytes, planned: float) -> None:
        status, reply = await c.request(raw)
        latencies.append(time.perf_counter() - planned)
        idle.append(c)
        freed.set()
        if status != 202:
            raise RuntimeError(f"POST answered {status}: {reply[:200]!r}")

    # perf_counter, not loop.time(): uvloop's clock ticks in whole milliseconds.
    start = time.perf_counter() + 0.05
    for i, body in enumerate(bodies):
        planned = start + i / rate
        delay = planned - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if idle:
            c = idle.pop()
        elif opened < max_conns:
            c = await connect(port)
            opened += 1
        else:
            freed.clear()
            await freed.wait()
            c = idle.pop()
        t = asyncio.create_task(one(c, post(port, body), planned))
        pending.add(t)
        t.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    for c in idle:
        assert c.transport is not None
        c.transport.close()
    return latencies


def payload(i: int) -> bytes:
    return orjson.dumps(make_body(i))


async def pgqueuer_enqueue(url: str, n: int, clients: int, pool_size: int) -> float:
    from pgqueuer.queries import Queries

    pool = await asyncpg.create_pool(url, min_size=pool_size, max_size=pool_size)
    try:
        queries = Queries.from_asyncpg_pool(pool)
        with contextlib.suppress(Exception):
            await queries.install()
        payloads = [payload(i) for i in range(n)]
        todo = list(reversed(payloads))

        async def worker() -> None:
            while todo:
                await queries.enqueue("batchd_bench", todo.pop())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0
    finally:
        await pool.close()


async def procrastinate_defer(url: str, n: int, clients: int, pool_size: int) -> float:
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=url, min_size=pool_size, max_size=pool_size
        )
    )

    @app.task(name="batchd_bench")  # type: ignore[untyped-decorator]
    async def job(body: str) -> None:  # never run: only enqueue is measured
        pass

    async with app.open_async():
        with contextlib.suppress(Exception):
            await app.schema_manager.apply_schema_async()
        todo = [payload(i).decode() for i in range(n)]
        todo.reverse()

        async def worker() -> None:
            while todo:
                await job.defer_async(body=todo.pop())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0


async def bench_ingest(b: Bench, singles: bool = True) -> None:
    """The bulk row, then (``singles``) the single-POST and p99 rows."""
    a = b.args
    n_bulk, n_single, runs = a.bulk_tasks, a.single_tasks, a.runs
    assert b.emulator is not None
    b.log(f"ingest rows: {runs} runs, bulk {n_bulk} tasks, single {n_single} tasks")
    # A cap above the bulk size and a long window: the scheduler stays idle,
    # so the rows measure ingest alone.
    daemon, port = await start_daemon(
        b.db_url, b.provider_url, b.tmp / "ingest", window_seconds=86400, max_batch_items=50_000
    )
    bulk_b, bulk_raw, single_b, single_pgq, single_proc, p99s = [], [], [], [], [], []
    one_b: list[float] = []
    one_raw: list[float] = []
    pgq_url = await b.new_db("pgqueuer", batchd_schema=False)
    proc_url = await b.new_db("procrastinate", batchd_schema=False)
    try:
        # Warm up: the daemon's pool, prepared statements, the client's connections.
        await http_bulk(port, [ndjson("warm", s, 1000) for s in range(0, 5000, 1000)], 2)
        await http_single(port, [task_json("warm1", i) for i in range(2000)], a.clients)
        for run in range(runs):
            # bulk: NDJSON, 1,000 tasks a request
            await reset(b.db_url)
            prefix = f"bulk{run}"
            bodies = [ndjson(prefix, s, 1000) for s in range(0, n_bulk, 1000)]
            cpu0, (busy0, all0) = cpu_seconds(daemon.pid), machine_busy()
            took = await http_bulk(port, bodies, a.bulk_concurrency)
            cpu_us = (cpu_seconds(daemon.pid) - cpu0) / n_bulk * 1e6
            busy1, all1 = machine_busy()
            busy = (busy1 - busy0) / (all1 - all0)
            bulk_b.append(n_bulk / took)
            await reset(b.db_url)
            tasks = [parse_task(orjson.loads(task_json(prefix, i)), i) for i in range(n_bulk)]
            rows = raw_rows(tasks)
            chunks = [rows[s : s + 1000] for s in range(0, n_bulk, 1000)]
            took = await raw_bulk(b.db_url, chunks, a.bulk_concurrency)
            bulk_raw.append(n_bulk / took)
            b.log(
                f"  run {run}: bulk batchd {bulk_b[-1]:,.0f}/s ({cpu_us:.1f} us of daemon "
                f"CPU a task, machine {busy:.0%} busy), raw {bulk_raw[-1]:,.0f}/s"
            )

            # one client, one large request at a time: the daemon stores a
            # request's pieces while it reads the next; raw gets one connection
            await reset(b.db_url)
            prefix = f"one{run}"
            big = a.one_client_request
            bodies = [ndjson(prefix, s, min(big, n_bulk - s)) for s in range(0, n_bulk, big)]
            one_b.append(n_bulk / await http_bulk(port, bodies, 1))
            await reset(b.db_url)
            tasks = [parse_task(orjson.loads(task_json(prefix, i)), i) for i in range(n_bulk)]
            rows = raw_rows(tasks)
            chunks = [rows[s : s + 1000] for s in range(0, n_bulk, 1000)]
            one_raw.append(n_bulk / await raw_bulk(b.db_url, chunks, 1))
            b.log(
                f"  run {run}: one client batchd {one_b[-1]:,.0f}/s, raw one connection "
                f"{one_raw[-1]:,.0f}/s"
            )
            if not singles:
                continue

            # single POSTs, 64 clients; then the peers at the same concurrency
            await reset(b.db_url)
            bodies = [task_json(f"one{run}", i) for i in range(n_single)]
            took = await http_single(port, bodies, a.clients)
            single_b.append(n_single / took)
            await admin(
                pgq_url, "DO $$ BEGIN TRUNCATE pgqueuer; EXCEPTION WHEN OTHERS THEN NULL; END $$"
            )
            single_pgq.append(
                n_single / await pgqueuer_enqueue(pgq_url, n_single, a.clients, a.peer_pool)
            )
            await admin(
                proc_url,
                "DO $$ BEGIN TRUNCATE procrastinate_jobs CASCADE; "
                "EXCEPTION WHEN OTHERS THEN NULL; END $$",
            )
            single_proc.append(
                n_single / await procrastinate_defer(proc_url, n_single, a.clients, a.peer_pool)
            )
            b.log(
                f"  run {run}: single batchd {single_b[-1]:,.0f}/s, pgqueuer "
                f"{single_pgq[-1]:,.0f}/s, procrastinate {single_proc[-1]:,.0f}/s"
            )

            # p99 at a fixed 1,000 requests/s
            await reset(b.db_url)
            n = int(a.p99_seconds * a.p99_rate)
            lat = await open_loop(port, [task_json(f"lat{run}", i) for i in range(n)], a.p99_rate)
            lat.sort()
            p99 = lat[int(len(lat) * 0.99) - 1] * 1000
            p99s.append(p99)
            b.log(
                f"  run {run}: p50 {lat[len(lat) // 2] * 1000:.1f} ms, p99 {p99:.1f} ms, "
                f"max {lat[-1] * 1000:.1f} ms"
            )
    finally:
        await daemon.stop()
    rb, rr = median(bulk_b), median(bulk_raw)
    b.rows.append(
        Row(
            "bulk ingest (NDJSON, 1,000 tasks/request, 500 B bodies)",
            f"raw multi-row INSERT ON CONFLICT DO NOTHING: {fmt_rate(rr)}",
            f"{rb / rr:.0%} of raw",
            f"{fmt_rate(rb)} {spread(bulk_b)}",
            ">= 50% of raw",
            rb / rr >= 0.5,
            f"{a.bulk_concurrency} concurrent requests",
        )
    )
    ob, orr = median(one_b), median(one_raw)
    b.rows.append(
        Row(
            f"bulk ingest, one client (NDJSON, {a.one_client_request:,} tasks/request, one at a "
            "time)",
            f"raw multi-row INSERT, one connection, 1,000 rows a statement: {fmt_rate(orr)}",
            f"{ob / orr:.0%} of raw",
            f"{fmt_rate(ob)} {spread(one_b)}",
            ">= 50% of raw",
            ob / orr >= 0.5,
            "a request's pieces stored while the next is read",
        )
    )
    if not singles:
        return
    sb, sq, sp = median(single_b), median(single_pgq), median(single_proc)
    b.rows.append(
        Row(
            f"single-task POSTs, {a.clients} concurrent clients",
            f"pgqueuer enqueue {fmt_rate(sq)}; procrastinate defer {fmt_rate(sp)}",
            f"{sb / sq:.2f}x pgqueuer, {sb / sp:.2f}x procrastinate",
            f"{fmt_rate(sb)} {spread(single_b)}",
            "ahead of both; >= 3,000 tasks/s",
            sb > sq and sb > sp and sb >= 3000,
            f"peers: pool of {a.peer_pool} connections, one job per call",
        )
    )
    p = median(p99s)
    b.rows.append(
        Row(
            f"p99 latency of a single POST at {a.p99_rate:,.0f} requests/s",
            "-",
            "-",
            f"{p:.1f} ms (runs: {', '.join(f'{x:.1f}' for x in p99s)})",
            "<= 20 ms",
            p <= 20,
            f"open loop, {a.p99_seconds:.0f} s a run, latency from the planned send time",
        )
    )


# ------------------------------------------------- ingest CPU per task


async def _one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def decode_validate(body: bytes, limits: Limits, routing: Routing) -> list[TaskIn]:
    """What ingest does with an NDJSON body before the database: cut it into
    pieces, decode them and validate each task (decode.py, ingest.py)."""
    pieces = BodyPieces(
        _one_chunk(body),
        "application/x-ndjson",
        contract_for(limits),
        max_bytes=len(body) + 1,
        max_tasks=limits.tasks_per_request,
        max_task_bytes=task_bytes_cap(limits),
    )
    seen: dict[str, str] = {}
    out: list[TaskIn] = []
    while (items := await pieces.next()) is not None:
        out += await validate_piece(
            items, limits, 200 * 1024 * 1024, pieces.tasks - len(items), seen, routing
        )
    return out


async def bench_parse(b: Bench) -> None:
    """Process CPU a task for decode + validate of 1,000-task NDJSON bodies of
    500 B chat tasks, in this process (no HTTP, no database); the reference
    is orjson.loads of the same lines alone."""
    a = b.args
    n = a.parse_tasks
    bodies = [ndjson("parse", s, 1000) for s in range(0, n, 1000)]
    lines = [line for body in bodies for line in body.split(b"\n")]
    limits, routing = Limits(), Routing()
    ours: list[float] = []
    bare: list[float] = []
    for run in range(a.runs):
        t0 = time.process_time()
        for body in bodies:
            await decode_validate(body, limits, routing)
        ours.append((time.process_time() - t0) / n * 1e6)
        t0 = time.process_time()
        for line in lines:
            orjson.loads(line)
        bare.append((time.process_time() - t0) / n * 1e6)
        b.log(
            f"  run {run}: decode + validate {ours[-1]:.2f} us a task, "
            f"orjson.loads alone {bare[-1]:.2f} us"
        )
    us, ref = median(ours), median(bare)
    b.rows.append(
        Row(
            f"ingest CPU per task: decode + validate ({n:,} tasks in NDJSON bodies of 1,000, "
            "500 B chat bodies)",
            f"orjson.loads of the same lines alone: {ref:.2f} us a task",
            f"{us / ref:.1f}x the bare parse",
            f"{us:.2f} us a task (runs: {', '.join(f'{x:.2f}' for x in ours)})",
            f"<= {PARSE_BEFORE_US} us (the row before the typed contract)",
            us <= PARSE_BEFORE_US,
            "process CPU time in the benchmark's own process",
        )
    )


# ------------------------------------------------------ hostile request body


def reset_peak_rss_of(pid: int) -> None:
    """Make a process's VmHWM start again from its current RSS (clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


async def send_streaming(port: int, content_type: bytes, body: bytes) -> int:
    """POST ``body`` while reading the reply: the daemon may refuse (and stop
    reading) long before the body ends. Returns the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: %s\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (port, content_type, len(body))
    )

    async def pump() -> None:
        with contextlib.suppress(ConnectionError, OSError):
            for start in range(0, len(body), 1 << 20):
                writer.write(body[start : start + (1 << 20)])
                await writer.drain()

    pumping = asyncio.create_task(pump())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
    pumping.cancel()
    writer.close()
    return int(head.split(b" ", 2)[1])


async def healthz_during(port: int, work: Awaitable[Any]) -> tuple[Any, list[float]]:
    """Run ``work`` while /healthz is asked every 5 ms on its own connection."""
    conn = await connect(port)
    probe = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode() + b"\r\n\r\n"
    lat: list[float] = []
    done = asyncio.Event()

    async def prober() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            await conn.request(probe)
            lat.append(time.perf_counter() - t0)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(prober())
    try:
        result = await work
    finally:
        done.set()
        await task
        assert conn.transport is not None
        conn.transport.close()
    return result, lat


def p99_ms(lat: list[float]) -> float:
    lat = sorted(lat)
    return lat[max(0, int(len(lat) * 0.99) - 1)] * 1000 if lat else float("nan")


async def bench_hostile(b: Bench) -> None:
    """A 60 MiB body of ``{}`` lines beside a normal 1,000-task request:
    the daemon's peak RSS growth and /healthz p99 while each is handled."""
    assert b.emulator is not None
    size = b.args.hostile_mib << 20
    hostile = b"{}\n" * (size // 3)
    daemon, port = await start_daemon(
        b.db_url, b.provider_url, b.tmp / "hostile", window_seconds=86400, max_batch_items=50_000
    )
    normal_growth, normal_p99, hostile_growth, hostile_p99, statuses = [], [], [], [], []
    try:
        await http_bulk(port, [ndjson("warmh", s, 1000) for s in range(0, 3000, 1000)], 1)
        for run in range(b.args.runs):
            await reset(b.db_url)
            body = ndjson(f"normal{run}", 0, 1000)

            async def normal(body: bytes = body) -> None:
                for i in range(20):  # long enough for a p99 of the probes
                    await http_bulk(port, [body.replace(b'"normal', b'"n%02d' % i)], 1)

            base = rss_mb(daemon.pid)
            reset_peak_rss_of(daemon.pid)
            _, lat = await healthz_during(port, normal())
            normal_growth.append(peak_rss_mb(daemon.pid) - base)
            normal_p99.append(p99_ms(lat))

            base = rss_mb(daemon.pid)
            reset_peak_rss_of(daemon.pid)
            status, lat = await healthz_during(
                port, send_streaming(port, b"application/x-ndjson", hostile)
            )
            hostile_growth.append(peak_rss_mb(daemon.pid) - base)
            hostile_p99.append(p99_ms(lat))
            statuses.append(status)
            b.log(
                f"  run {run}: normal 1,000-task request +{normal_growth[-1]:.1f} MB RSS, "
                f"healthz p99 {normal_p99[-1]:.1f} ms; {b.args.hostile_mib} MiB hostile "
                f"body answered {status}, +{hostile_growth[-1]:.1f} MB RSS, healthz p99 "
                f"{hostile_p99[-1]:.1f} ms"
            )
    finally:
        await daemon.stop()
    growth, p99 = median(hostile_growth), median(hostile_p99)
    mib = b.args.hostile_mib
    b.rows.append(
        Row(
            f"hostile body: {mib} MiB of NDJSON `{{}}` lines, refused",
            f"a normal 1,000-task request: +{median(normal_growth):.1f} MB RSS, /healthz p99 "
            f"{median(normal_p99):.1f} ms",
            f"RSS growth {growth / (size / 1e6):.2f}x the body",
            f"+{growth:.1f} MB peak RSS, /healthz p99 {p99:.1f} ms (answers: "
            f"{', '.join(map(str, statuses))})",
            "<= 4x the body; p99 < 50 ms",
            growth <= 4 * size / 1e6 and p99 < 50 and all(s in (400, 413) for s in statuses),
            "peak RSS: the daemon's VmHWM, reset before each request",
        )
    )


# ------------------------------------------------------ rows 4/5: flush, route


async def seed_queued(url: str, prefix: str, n: int) -> None:
    """n queued tasks, written straight into the table (setup, not measured)."""
    tasks = [parse_task(orjson.loads(task_json(prefix, i)), i) for i in range(n)]
    conn = await asyncpg.connect(url)
    try:
        await conn.copy_records_to_table(
            "tasks",
            records=raw_rows(tasks),
            columns=[c.strip() for c in _RAW_INSERT_COLS.split(",")],
        )
        await conn.execute("UPDATE tasks SET not_before = now() - interval '1 hour'")
    finally:
        await conn.close()


@dataclass
class Parts:
    scheduler: Any
    poller: Any
    router: Any
    provider: Any
    engine: Any
    settings: Any


@contextlib.asynccontextmanager
async def parts(b: Bench, data_dir: Path) -> AsyncIterator[Parts]:
    """The daemon's own scheduler, poller and router (wired by Service, not
    started) in this process, so their memory can be measured alone, on the
    emulator subprocess."""
    from batchd.config import load_settings
    from batchd.provider.openai import OpenAIProvider
    from batchd.service import Service
    from batchd.store.engine import async_url, make_engine

    settings = load_settings(
        database_url=b.db_url,
        data_dir=data_dir,
        max_batch_items=50_000,
        window_seconds=60,
        openai_base_url=b.provider_url,
    )
    engine = make_engine(async_url(b.db_url))
    provider = OpenAIProvider(API_KEY, b.provider_url)
    service = Service(settings, engine, provider)
    try:
        yield Parts(service.scheduler, service.poller, service.router, provider, engine, settings)
    finally:
        await provider.close()
        await engine.dispose()


def write_reference(path: Path, lines: Iterator[bytes]) -> float:
    data = list(lines)  # built before the clock starts: only the writing is timed
    t0 = time.perf_counter()
    with path.open("wb") as f:
        for chunk in data:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def chunks_of_lines(prefix: str, n: int, size: int = 2000) -> Iterator[bytes]:
    for s in range(0, n, size):
        yield b"".join(
            input_line(f"{prefix}-{i:09d}", ENDPOINT, make_body(i))
            for i in range(s, min(n, s + size))
        )


# Keyed as batchd keys them: the line's id names the task (tasks.id).
_RAW_RESULTS_UPSERT = """
    INSERT INTO results AS r (task_id, client, custom_id, batch_id, status_code, response,
                              usage)
    SELECT i, 'local', c, 'ref', s, b::jsonb, u::jsonb
    FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::text[])
         AS t(i, c, s, b, u)
    ON CONFLICT (task_id) DO UPDATE SET status_code = excluded.status_code,
      response = excluded.response, usage = excluded.usage, updated_at = now()"""
# What a route cannot do without, per line, besides the result: its task
# leaves 'submitted' (the exactly-once guard) and its attempt is recorded.
_RAW_TASKS_SETTLE = """
    UPDATE tasks SET state = 'succeeded', finished_at = now(), updated_at = now()
    WHERE id = ANY($1::bigint[])"""
_RAW_EVENTS = """
    INSERT INTO task_events (task_id, client, custom_id, batch_id, attempt, outcome)
    SELECT i, 'local', c, 'ref', 1, 'succeeded'
    FROM unnest($1::bigint[], $2::text[]) AS t(i, c)"""


async def raw_unnest_upsert(url: str, path: Path) -> tuple[float, float]:
    """The raw limits for routing, one unnest statement per 5,000 rows in one
    transaction: (the output file's rows upserted into results, the issue's
    reference; the same plus each task settled and its event written, rolled
    back: PostgreSQL alone doing the writes a route must make)."""
    cols: list[list[Any]] = [[], [], [], [], []]
    for raw in (await asyncio.to_thread(path.read_bytes)).splitlines():
        line = orjson.loads(raw)
        body = line["response"]["body"]
        cols[0].append(line_task_id(line["custom_id"]))
        cols[1].append(line["custom_id"])
        cols[2].append(line["response"]["status_code"])
        cols[3].append(orjson.dumps(body).decode())
        cols[4].append(orjson.dumps(body.get("usage")).decode())
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE results")
        await conn.execute("VACUUM tasks")
        t0 = time.perf_counter()
        async with conn.transaction():
            for s in range(0, len(cols[0]), 5000):
                await conn.execute(_RAW_RESULTS_UPSERT, *(c[s : s + 5000] for c in cols))
        results_only = time.perf_counter() - t0
        await conn.execute("TRUNCATE results")
        tx = conn.transaction()
        await tx.start()
        t0 = time.perf_counter()
        for s in range(0, len(cols[0]), 5000):
            await conn.execute(_RAW_RESULTS_UPSERT, *(c[s : s + 5000] for c in cols))
            await conn.execute(_RAW_TASKS_SETTLE, cols[0][s : s + 5000])
            await conn.execute(_RAW_EVENTS, cols[0][s : s + 5000], cols[1][s : s + 5000])
        writes = time.perf_counter() - t0
        await tx.rollback()
        return results_only, writes
    finally:
        await conn.close()


async def claim_floor(url: str, n: int) -> tuple[float, float]:
    """What PostgreSQL alone needs to move a window's n task rows to a batch:
    one bare UPDATE of every row (no selection, no row locks), rolled back (no
    commit), on a table seeded afresh as the flush's was: the table the
    flush's claim starts from. On the routed table after a VACUUM the same
    update runs about a quarter faster, its new row versions finding room on
    their own pages, which the claim's do not. Returns (the update; the update
    and then the rows' bodies read back in file order, as a flush must to
    build its file)."""
    await reset(url)
    await seed_queued(url, "floor", n)
    conn = await asyncpg.connect(url)
    try:
        tx = conn.transaction()
        await tx.start()
        t0 = time.perf_counter()
        await conn.execute(
            "UPDATE tasks SET state = 'submitted', batch_id = 'floor', "
            "attempts = attempts + 1, submitted_at = now(), updated_at = now()"
        )
        updated = time.perf_counter() - t0
        rows = await conn.fetch(
            "SELECT custom_id, endpoint, body::text FROM tasks WHERE batch_id = 'floor' ORDER BY id"
        )
        read_back = time.perf_counter() - t0
        assert len(rows) == n, len(rows)
        await tx.rollback()
        return updated, read_back
    finally:
        await conn.close()


async def one_window(b: Bench, n: int, tag: str) -> dict[str, float]:
    """Flush a window of n tasks, then route its output file; times and peaks."""
    await reset(b.db_url)
    await seed_queued(b.db_url, tag, n)
    out: dict[str, float] = {}
    async with parts(b, b.tmp / f"win-{tag}") as p:
        async with p.engine.connect() as conn:  # warm the pool outside the timing
            await conn.exec_driver_sql("SELECT 1")
        base = rss_mb()
        reset_peak_rss()
        t0 = time.perf_counter()
        started = await p.scheduler.tick(drain=True)
        await p.scheduler.wait_sends()
        out["flush_total_s"] = time.perf_counter() - t0
        out["flush_peak_mb"] = max(0.0, peak_rss_mb() - base)
        assert started == 1, f"expected one batch, started {started}"
        async with p.engine.connect() as conn:
            row = (
                await conn.exec_driver_sql(
                    "SELECT id, provider_batch_id, state, "
                    "extract(epoch FROM submitted_at - created_at) AS took FROM batches "
                    "WHERE state <> 'routed'"
                )
            ).one()  # history rows are routed
        assert row.state == "submitted", row
        # Build and upload: from the claim's transaction to the provider batch
        # recorded (the database's clock); archiving the input comes after.
        out["flush_s"] = float(row.took)
        for _ in range(200):
            remote = await p.provider.get_batch(row.provider_batch_id)
            if remote.terminal:
                break
            await asyncio.sleep(0.05)
        path = b.tmp / f"out-{tag}.jsonl"
        await p.provider.download_file(remote.output_file_id, path)
        base = rss_mb()
        reset_peak_rss()
        t0 = time.perf_counter()
        summary = await p.router.route(row.id, MODEL, remote, [path])
        out["route_s"] = time.perf_counter() - t0
        out["route_peak_mb"] = max(0.0, peak_rss_mb() - base)
        assert summary.succeeded == n, summary
        out["ref_route_s"], out["floor_route_s"] = await raw_unnest_upsert(b.db_url, path)
        out["floor_claim_s"], out["floor_read_s"] = await claim_floor(b.db_url, n)
        out["ref_write_s"] = await asyncio.to_thread(
            write_reference, b.tmp / f"ref-{tag}.jsonl", chunks_of_lines(tag, n)
        )
        path.unlink()
        (b.tmp / f"ref-{tag}.jsonl").unlink()
    return out


async def bench_windows(b: Bench) -> None:
    a = b.args
    n = a.window_lines
    small = await one_window(b, max(1000, n // 5), "small")
    runs = []
    for run in range(a.runs):
        r = await one_window(b, n, f"w{run}")
        runs.append(r)
        b.log(
            f"  run {run}: flush {n / r['flush_s']:,.0f} lines/s (+{r['flush_peak_mb']:.0f} "
            f"MB), route {n / r['route_s']:,.0f} lines/s (+{r['route_peak_mb']:.0f} MB)"
        )
    flush = median([n / r["flush_s"] for r in runs])
    total = median([n / r["flush_total_s"] for r in runs])
    ref_w = median([n / r["ref_write_s"] for r in runs])
    floor = median([n / r["floor_claim_s"] for r in runs])
    floor_read = median([n / r["floor_read_s"] for r in runs])
    fpk = median([r["flush_peak_mb"] for r in runs])
    b.rows.append(
        Row(
            f"flush: build and upload a {n:,}-line window",
            f"writing the same bytes to a file: {fmt_rate(ref_w, 'lines/s')}; PostgreSQL "
            f"alone, one bare UPDATE of the same rows seeded as the flush's (no selection, no "
            f"row locks; rolled back, no commit): {fmt_rate(floor, 'rows/s')}; the same, then "
            f"their bodies read back in file order: {fmt_rate(floor_read, 'rows/s')}",
            f"{flush / ref_w:.1%} of file write, {flush / floor:.0%} of the bare update, "
            f"{flush / floor_read:.0%} of update + read",
            f"{fmt_rate(flush, 'lines/s')} {spread([n / r['flush_s'] for r in runs])}; "
            f"{fmt_rate(total, 'lines/s')} with the input archived; peak +{fpk:.0f} MB "
            f"(+{small['flush_peak_mb']:.0f} MB at {max(1000, n // 5):,} lines)",
            ">= 100,000 lines/s, memory flat",
            flush >= 100_000 and fpk <= small["flush_peak_mb"] * 1.5 + 20,
            "claim + stream from the database + upload + create; archive (gzip) after",
        )
    )
    route = median([n / r["route_s"] for r in runs])
    ref_r = median([n / r["ref_route_s"] for r in runs])
    floor_r = median([n / r["floor_route_s"] for r in runs])
    rpk = median([r["route_peak_mb"] for r in runs])
    b.rows.append(
        Row(
            f"route a {n:,}-line output file",
            f"raw unnest upsert of the same rows: {fmt_rate(ref_r, 'lines/s')}; PostgreSQL alone "
            f"also settling each task and writing its event: {fmt_rate(floor_r, 'lines/s')}",
            f"{route / ref_r:.0%} of raw, {route / floor_r:.0%} of the writes",
            f"{fmt_rate(route, 'lines/s')} "
            f"{spread([n / r['route_s'] for r in runs])}; peak +{rpk:.0f} MB "
            f"(+{small['route_peak_mb']:.0f} MB at {max(1000, n // 5):,} lines)",
            ">= 50,000 lines/s, memory flat",
            route >= 50_000 and rpk <= small["route_peak_mb"] * 1.5 + 20,
            "results upserted, tasks settled, events written: 5,000 success lines a "
            "transaction; failures and the batch settled in a last one",
        )
    )


# ---------------------------------------------------------------- row 6: e2e


async def bench_e2e(b: Bench) -> None:
    a = b.args
    n = a.e2e_tasks
    b.log(f"end to end: {n:,} tasks")
    await reset(b.db_url)
    emulator, url = await start_emulator()
    daemon, port = await start_daemon(
        b.db_url,
        url,
        b.tmp / "e2e",
        window_seconds=2,
        max_batch_items=50_000,
        poll_interval_seconds=0.5,
        scheduler_interval_seconds=0.25,
    )
    conn = await asyncpg.connect(b.db_url)
    peak = 0.0
    try:
        bodies = (ndjson("e2e", s, 1000) for s in range(0, n, 1000))
        t0 = time.perf_counter()
        conns = [await connect(port) for _ in range(a.bulk_concurrency)]

        async def sender(c: _Conn) -> None:
            for body in bodies:
                status, reply = await c.request(post(port, body, "application/x-ndjson"))
                if status != 202:
                    raise RuntimeError(f"bulk POST answered {status}: {reply[:200]!r}")

        send = asyncio.gather(*(sender(c) for c in conns))
        ingested_at = None
        done = 0
        while True:
            await asyncio.sleep(1.0)
            peak = max(peak, peak_rss_mb(daemon.pid))
            if ingested_at is None and send.done():
                send.result()
                ingested_at = time.perf_counter() - t0
                b.log(f"  all {n:,} accepted after {ingested_at:.1f} s")
            done = await conn.fetchval("SELECT count(*) FROM results")
            if done >= n:
                break
            if time.perf_counter() - t0 > a.e2e_timeout:
                raise RuntimeError(f"only {done:,} of {n:,} results after {a.e2e_timeout} s")
        took = time.perf_counter() - t0
        peak = max(peak, peak_rss_mb(daemon.pid))
        batches = await conn.fetchval("SELECT count(*) FROM batches")
    finally:
        await conn.close()
        await daemon.stop()
        await emulator.stop()
    b.log(f"  {n:,} results after {took:.1f} s, {batches} batches, peak RSS {peak:.0f} MB")
    b.rows.append(
        Row(
            f"end to end: {n:,} tasks ingest -> batches -> emulator -> results",
            "-",
            "-",
            f"{took:.0f} s ({n / took:,.0f} tasks/s; all accepted at {ingested_at:.0f} s), "
            f"daemon peak RSS {peak:.0f} MB",
            "<= 3 min, peak RSS <= 300 MB",
            took <= 180 and peak <= 300,
            f"1 run; {batches} batches of <= 50,000, emulator at zero latency",
        )
    )


# ------------------------------------------------------- rows 7/8: jobs


async def bench_submit_job(b: Bench) -> None:
    """`batchd submit FILE --wait --out` as a user runs it, against the
    pipeline's own span (first task created -> last task finished)."""
    n = b.args.job_tasks
    b.log(f"jobs: batchd submit --wait --out, {n:,} tasks")
    await reset(b.db_url)
    path = b.tmp / "job.jsonl"
    with path.open("wb") as f:
        for start in range(0, n, 10_000):
            f.write(ndjson("job", start, min(10_000, n - start)) + b"\n")
    out = b.tmp / "job-results.jsonl"
    emulator, url = await start_emulator()
    daemon, port = await start_daemon(
        b.db_url,
        url,
        b.tmp / "jobs",
        window_seconds=2,
        max_batch_items=50_000,
        poll_interval_seconds=0.5,
        scheduler_interval_seconds=0.25,
    )
    try:
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "batchd",
            "submit",
            str(path),
            "--url",
            f"http://127.0.0.1:{port}",
            "--job",
            "bench",
            "--wait",
            str(b.args.e2e_timeout),
            "--out",
            str(out),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=ROOT,
        )
        said, _ = await proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"batchd submit exited {proc.returncode}: {said.decode()}")
        conn = await asyncpg.connect(b.db_url)
        try:
            span = await conn.fetchval("""
                SELECT extract(epoch FROM max(finished_at) - min(created_at)) FROM tasks
                WHERE job = 'bench'""")
        finally:
            await conn.close()
    finally:
        await daemon.stop()
        await emulator.stop()
    with out.open("rb") as f:
        lines = sum(1 for _ in f)
    if lines != n:
        raise RuntimeError(f"--out holds {lines:,} lines, not {n:,}")
    span = float(span)
    extra = wall - span
    b.log(f"  submit --wait --out took {wall:.1f} s; pipeline span {span:.1f} s")
    b.rows.append(
        Row(
            f"jobs: `batchd submit FILE --wait --out` for {n:,} tasks",
            f"pipeline span (first task created -> last finished) {span:.1f} s",
            f"+{extra:.1f} s",
            f"{wall:.1f} s wall, {lines:,} result lines written",
            "client adds < 5 s + 10%",
            extra < 5 + 0.1 * span,
            "1 run; 4 requests in flight, one GET /v1/jobs/{job} every 0.25 s, results "
            "written while the job runs (GET /v1/jobs/{job}/results?stop_at_open=true after "
            "the last line written), the rest streamed once it finished; the span includes "
            "ingest",
        )
    )


async def seed_job(conn: asyncpg.Connection, name: str, n: int, deltas: int) -> None:
    """A finished job of ``n`` tasks with results, written by SQL (not the
    API): its counters folded, plus ``deltas`` not folded yet, as a busy
    daemon leaves them."""
    await conn.execute(f"""
        WITH t AS (
            INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes,
                               state, attempts, finished_at, job)
            SELECT '{name}-' || g, '{ENDPOINT}', '{MODEL}', '{{}}', 'd', 10, 'succeeded', 1,
                   now(), '{name}' FROM generate_series(1, {n}) g
            RETURNING id, client, custom_id)
        INSERT INTO results (task_id, client, custom_id, batch_id, status_code, response,
                             cost_usd, sync_cost_usd)
        SELECT id, client, custom_id, 'seed', 200, '{{}}', 0.000001, 0.000002 FROM t""")
    await conn.execute(f"""
        INSERT INTO jobs (client, job, tasks, succeeded, spend_usd, sync_equivalent_usd,
                          finished_at)
        VALUES ('local', '{name}', {n - deltas}, {n - deltas}, {n - deltas} * 0.000001,
                {n - deltas} * 0.000002, now())""")
    await conn.execute(f"""
        INSERT INTO job_deltas (client, job, tasks, succeeded, spend_usd, sync_usd)
        SELECT 'local', '{name}', 1, 1, 0.000001, 0.000002 FROM generate_series(1, {deltas})""")


async def bench_job_status(b: Bench) -> None:
    """GET /v1/jobs/{job} for a job of --status-tasks tasks against one of 10."""
    a = b.args
    big, small = a.status_tasks, 10
    b.log(f"jobs: status of a {big:,}-task job vs a {small}-task job")
    await reset(b.db_url)
    conn = await asyncpg.connect(b.db_url)
    try:
        await seed_job(conn, "big", big, 50)
        await seed_job(conn, "small", small, 5)
        await conn.execute("VACUUM ANALYZE tasks, results, jobs, job_deltas")
    finally:
        await conn.close()
    daemon, port = await start_daemon(b.db_url, b.provider_url, b.tmp / "status")
    try:
        c = await connect(port)
        p99: dict[str, list[float]] = {"big": [], "small": []}
        for _ in range(a.runs):
            for name in ("small", "big"):
                raw = (f"GET /v1/jobs/{name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode()
                took = []
                for _ in range(a.status_requests):
                    t0 = time.perf_counter()
                    status, body = await c.request(raw)
                    took.append(time.perf_counter() - t0)
                    if status != 200:
                        raise RuntimeError(f"status answered {status}: {body[:200]!r}")
                took.sort()
                p99[name].append(took[int(len(took) * 0.99) - 1] * 1000)
        view = orjson.loads(body)
        c.transport.close()  # type: ignore[union-attr]
    finally:
        await daemon.stop()
    if view["tasks"] != big:
        raise RuntimeError(f"the big job counts {view['tasks']} tasks, not {big}")
    pb, ps = median(p99["big"]), median(p99["small"])
    b.rows.append(
        Row(
            f"jobs: GET /v1/jobs/{{job}} p99 for a {big:,}-task job",
            f"a {small}-task job: p99 {ps:.2f} ms",
            f"{pb / ps:.2f}x",
            f"p99 {pb:.2f} ms (runs: {', '.join(f'{x:.2f}' for x in p99['big'])})",
            "flat: <= 1.5x the 10-task job's",
            pb <= ps * 1.5,
            f"{a.status_requests} sequential requests a job a run, over one "
            "keep-alive connection; tasks, results and counters seeded by SQL",
        )
    )


# --------------------------------------------------------------- row 7: idle


async def bench_idle(b: Bench) -> None:
    secs = b.args.idle_seconds
    b.log(f"idle: {secs:.0f} s with no tasks")
    url = await b.new_db("idle", batchd_schema=True)
    name = url.rsplit("/", 1)[1]
    daemon, _port = await start_daemon(url, b.provider_url, b.tmp / "idle")
    conn = await asyncpg.connect(b.admin_url)
    try:
        await asyncio.sleep(10)  # past start-up

        async def stat() -> tuple[int, float, float]:
            await asyncio.sleep(1.1)  # backends flush their counters at most once a second
            row = await conn.fetchrow(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", name
            )
            return int(row[0]), cpu_seconds(daemon.pid), time.perf_counter()

        marks = [await stat()]
        for _ in range(2):  # two halves: the rate must not grow with time
            await asyncio.sleep(secs / 2)
            marks.append(await stat())
    finally:
        await conn.close()
        await daemon.stop()
    wall = marks[2][2] - marks[0][2]
    cpu = (marks[2][1] - marks[0][1]) / wall
    halves = [
        (marks[k + 1][0] - marks[k][0]) / (marks[k + 1][2] - marks[k][2]) * 60 for k in range(2)
    ]
    qpm = (marks[2][0] - marks[0][0]) / wall * 60
    ticks = loop_ticks_per_minute()
    bound = ticks * IDLE_STATEMENTS_PER_TICK
    b.rows.append(
        Row(
            f"idle: no tasks for {secs / 60:.0f} min"
            if secs >= 60
            else f"idle: no tasks for {secs:.0f} s",
            "-",
            "-",
            f"{cpu:.2%} of a core; {qpm:,.0f} transactions/min (halves {halves[0]:,.0f} and "
            f"{halves[1]:,.0f}) = {qpm / ticks:.1f} per loop tick ({ticks:,.0f} ticks/min)",
            "< 1% of a core; queries/min bounded by loop intervals",
            cpu < 0.01 and qpm <= bound and max(halves) <= 1.2 * min(halves),
            f"bound: {IDLE_STATEMENTS_PER_TICK} a tick (a checkout's ping and its statements) "
            f"= {bound:,.0f}/min; CPU from /proc/<pid>/stat, transactions from "
            "pg_stat_database (pg_stat_statements is not preloaded on this server)",
        )
    )


# An idle loop tick checks out one connection (pre-ping) and runs at most a
# few statements; more than this a tick would mean work that is not the loop's.
IDLE_STATEMENTS_PER_TICK = 4


def loop_ticks_per_minute() -> float:
    """How often the daemon's loops wake at the default settings with nothing to do."""
    from batchd import callbacks, jobs, snapshots, sync_lane
    from batchd.config import Settings

    s = Settings()
    per_minute: tuple[float, ...] = (
        60 / s.scheduler_interval_seconds,
        60 / min(s.poll_interval_seconds, 5.0),
        60 / snapshots.SNAPSHOT_SECONDS,
        60 / getattr(sync_lane, "_IDLE_TICK_SECONDS", sync_lane._TICK_SECONDS),
        60 / callbacks._TICK_SECONDS,
        60 / jobs._TICK_SECONDS,
    )
    return sum(per_minute)


# -------------------------------------------------------------------- output


def table(b: Bench, started: float) -> str:
    cpu = platform.processor() or platform.machine()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    head = [
        f"batchd benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} cores ({model or cpu}), Python {platform.python_version()}, "
        f"PostgreSQL {b.args.pg_version}, {time.time() - started:.0f} s; "
        f"medians of {b.args.runs} runs unless noted; load average at the end "
        f"{os.getloadavg()[0]:.1f} (shared machine: other work competes for the cores)",
        "",
        "| what | reference (same run) | vs reference | batchd | target | met |",
        "|---|---|---|---|---|---|",
    ]
    body = [
        f"| {r.what} | {r.reference} | {r.ratio} | {r.absolute}"
        f"{f' ({r.note})' if r.note else ''} | {r.target} | "
        f"{'yes' if r.met else 'NO' if r.met is not None else '-'} |"
        for r in b.rows
    ]
    return "\n".join(head + body) + "\n"


# "bulk" is the ingest group's first row alone: a quick loop for ingest work.
# storage, prune, history and migrations are a year of operation's rows
# (tests/bench/year.py).
ROWS = (
    "parse",
    "ingest",
    "bulk",
    "hostile",
    "windows",
    "e2e",
    "jobs",
    "status",
    "idle",
    "storage",
    "prune",
    "history",
    "migrations",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="small sizes and a 30 s idle row, for a smoke run"
    )
    p.add_argument("--only", default=",".join(ROWS), help=f"comma-separated of {ROWS}")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bulk-tasks", type=int, default=40_000)
    p.add_argument("--bulk-concurrency", type=int, default=4)
    p.add_argument(
        "--one-client-request",
        type=int,
        default=10_000,
        help="tasks per request of the one-client bulk row",
    )
    p.add_argument(
        "--hostile-mib", type=int, default=60, help="size of the hostile body of the hostile row"
    )
    p.add_argument("--single-tasks", type=int, default=20_000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument(
        "--peer-pool",
        type=int,
        default=10,
        help="connection pool of each peer (batchd's own pool is 10 + 10 overflow)",
    )
    p.add_argument("--p99-rate", type=float, default=1000)
    p.add_argument("--p99-seconds", type=float, default=10)
    p.add_argument("--window-lines", type=int, default=50_000)
    p.add_argument("--e2e-tasks", type=int, default=1_000_000)
    p.add_argument("--e2e-timeout", type=float, default=900)
    p.add_argument("--idle-seconds", type=float, default=600)
    p.add_argument("--job-tasks", type=int, default=200_000)
    p.add_argument("--status-tasks", type=int, default=1_000_000)
    p.add_argument("--status-requests", type=int, default=2000)
    p.add_argument(
        "--parse-tasks",
        type=int,
        default=100_000,
        help="tasks of the parse row (ingest CPU per task)",
    )
    p.add_argument("--out", type=Path, help="also write the table to this file")
    from tests.bench import year

    year.add_arguments(p)
    a = p.parse_args(argv)
    if a.quick:
        a.runs = min(a.runs, 2)
        a.bulk_tasks, a.single_tasks, a.p99_seconds = 10_000, 5_000, 3
        a.window_lines, a.e2e_tasks, a.idle_seconds = 20_000, 100_000, 30
        a.job_tasks, a.status_tasks, a.status_requests = 20_000, 100_000, 500
        a.storage_tasks, a.prune_rows, a.history = 40_000, 300_000, 300_000
        a.migration_tasks = 300_000
        a.parse_tasks = 20_000
    return a


async def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from batchd import logs

    logs.configure("warning")  # the in-process scheduler and router stay quiet
    admin_url = os.environ.get("BATCHD_BENCH_DATABASE_URL", DEFAULT_ADMIN)
    b = Bench(a, admin_url)
    started = time.time()
    conn = await asyncpg.connect(admin_url)
    a.pg_version = (await conn.fetchval("SHOW server_version")).split()[0]
    await conn.close()
    only = set(a.only.split(","))
    b.emulator, b.provider_url = await start_emulator()
    try:
        b.db_url = await b.new_db("main", batchd_schema=True)
        if "parse" in only:
            await bench_parse(b)
        if "ingest" in only or "bulk" in only:
            await bench_ingest(b, singles="ingest" in only)
        if "hostile" in only:
            await bench_hostile(b)
        if "windows" in only:
            await bench_windows(b)
        if "e2e" in only:
            await bench_e2e(b)
        if "jobs" in only:
            await bench_submit_job(b)
        if "status" in only:
            await bench_job_status(b)
        if "idle" in only:
            await bench_idle(b)
        from tests.bench import year

        if "storage" in only:
            await year.bench_storage(b)
        if "prune" in only:
            await year.bench_prune(b)
        if "history" in only:
            await year.bench_history(b)
        if "migrations" in only:
            await year.bench_migrations(b)
    finally:
        await b.emulator.stop()
        await b.drop_dbs()
        shutil.rmtree(b.tmp, ignore_errors=True)
    out = table(b, started)
    print(out)
    if a.out:
        a.out.write_text(out)
    return 0 if all(r.met for r in b.rows) else 1


if __name__ == "__main__":
    try:
        import uvloop

        sys.exit(uvloop.run(main()))
    except ImportError:
        sys.exit(asyncio.run(main()))
