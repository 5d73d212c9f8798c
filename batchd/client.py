"""A small client for internal services that talk to batchd (and for `batchd submit`).

Async::

    async with BatchdClient("http://batchd:8080", token="tok") as client:
        summary = await client.submit(tasks)              # any iterable, sent 1,000 per request
        done = await client.wait([t["custom_id"] for t in tasks], timeout=3600)
        async for result in client.results(after=cursor):  # each stored result once
            cursor = result["seq"]

Jobs: a submission tracked as one thing (one status call, whatever its size)::

    async with BatchdClient("http://batchd:8080", token="tok") as client:
        await client.submit(tasks, job="eval-7", concurrency=4)
        final = await client.wait_job("eval-7", timeout=3600)
        async for line in client.job_results("eval-7"):   # resumes if the stream drops
            ...
        await client.cancel_job("eval-7")

Sync (same methods, for code without an event loop)::

    with SyncBatchdClient("http://batchd:8080", token="tok") as client:
        client.submit(tasks)

Submitting is safe to retry: a task already stored with the same body is a
duplicate, not a second task. So 429 and 503 answers (after their
Retry-After), timeouts and dropped connections are retried, with exponential
backoff and jitter between attempts that gave no hint.

Receivers of result callbacks check them with :func:`verify_callback`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson

from batchd import jsonl
from batchd.backoff import equal_jitter, exponential, retry_after
from batchd.errors import BatchdError
from batchd.signing import (
    DEFAULT_TOLERANCE_SECONDS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    verify,
)

__all__ = [
    "BatchdClient",
    "BatchdClientError",
    "JobNotFinished",
    "SignatureError",
    "SubmitError",
    "SubmitSummary",
    "SyncBatchdClient",
    "TaskNotFound",
    "verify_callback",
]

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_CHUNK = 1000
_RETRY_STATUS = frozenset({429, 502, 503, 504})

T = TypeVar("T")


def verify_callback(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
) -> dict[str, Any]:
    """The payload of a batchd callback, once its signature checks out.

    ``headers`` are the request's headers (any case-insensitive mapping, such
    as aiohttp's or Flask's ``request.headers``) and ``body`` the raw bytes
    received. Raises SignatureError when the signature is missing, wrong, or
    more than ``tolerance`` seconds old.
    """
    verify(
        secret,
        body,
        headers.get(TIMESTAMP_HEADER),
        headers.get(SIGNATURE_HEADER),
        tolerance=tolerance,
    )
    doc: dict[str, Any] = orjson.loads(body)
    return doc


class BatchdClientError(BatchdError):
    """batchd refused a request; ``status``, ``code`` and ``details`` come from its reply."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}


class TaskNotFound(BatchdClientError):
    """batchd has no task (or job) of yours with that name."""


class JobNotFinished(BatchdError, TimeoutError):
    """The job still had tasks queued or submitted when the wait ran out;
    ``job`` is its last status."""

    def __init__(self, message: str, job: dict[str, Any]) -> None:
        super().__init__(message)
        self.job = job


class SubmitError(BatchdClientError):
    """A chunk of tasks was refused. ``stored`` tasks before it were accepted;
    ``task_index`` is the refused task's position among all submitted tasks
    when batchd named one."""

    def __init__(self, cause: BatchdClientError, *, stored: int, chunk_start: int) -> None:
        super().__init__(cause.status, cause.code, cause.message, cause.details)
        self.stored = stored
        self.task_index_base = chunk_start
        index = cause.details.get("index")
        self.task_index = chunk_start + index if isinstance(index, int) else None


@dataclass(slots=True)
class SubmitSummary:
    tasks: int = 0
    accepted: int = 0
    duplicates: int = 0
    requests: int = 0
    retries: int = 0
    states: dict[str, str] = field(default_factory=dict)  # filled only when asked for

    def add(self, other: SubmitSummary) -> None:
        self.tasks += other.tasks
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.requests += other.requests
        self.retries += other.retries
        self.states.update(other.states)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class BatchdClient:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 8,
        backoff: float = 0.5,
        max_wait: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.retries = retries
        self.backoff = backoff
        self.max_wait = max_wait
        self.retried = 0  # requests sent again (429/5xx/network), over the client's life
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchdClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers, timeout=self.timeout)
        return self._session

    @property
    def connected(self) -> bool:
        """Whether a connection pool is open (``close`` releases it)."""
        return self._session is not None

    def _delay(self, attempt: int, hint: float | None) -> float:
        if hint is not None:
            return min(hint, self.max_wait)
        return equal_jitter(exponential(attempt, self.backoff, self.max_wait), random.random())

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; 429/502/503/504, timeouts and dropped connections are
        retried (Retry-After first, else exponential backoff with jitter)."""
        attempt = 0
        while True:
            hint: float | None = None
            try:
                async with self.session.request(method, self.base_url + path, **kwargs) as resp:
                    body = await resp.read()
                    if resp.status not in _RETRY_STATUS or attempt >= self.retries:
                        return self._decode(resp.status, body)
                    hint = retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientConnectionError, TimeoutError):
                if attempt >= self.retries:
                    raise
            await asyncio.sleep(self._delay(attempt, hint))
            attempt += 1
            self.retried += 1

    @staticmethod
    def _decode(status: int, body: bytes) -> Any:
        try:
            data = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            data = None
        if status < 400:
            return data
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict):
            raise BatchdClientError(status, "error", body.decode(errors="replace")[:500])
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        cls = TaskNotFound if status == 404 else BatchdClientError
        raise cls(status, str(err.get("code", "error")), str(err.get("message", "")), details)

    # ------------------------------------------------------------ submitting

    async def submit_one(self, task: dict[str, Any]) -> dict[str, Any]:
        """Store one task; returns its ``{"custom_id", "state"}``."""
        summary = await self.submit([task], keep_states=True)
        return {
            "custom_id": task.get("custom_id"),
            "state": summary.states.get(str(task.get("custom_id")), "queued"),
        }

    async def submit(
        self,
        tasks: Iterable[dict[str, Any]],
        *,
        chunk: int = DEFAULT_CHUNK,
        progress: Callable[[int], None] | None = None,
        keep_states: bool = False,
        job: str | None = None,
        concurrency: int = 1,
    ) -> SubmitSummary:
        """Store any number of tasks, ``chunk`` per request.

        ``job`` puts every task that names no job of its own into that job.
        ``concurrency`` requests are in flight at once (the daemon writes one
        while it decodes the next); with 1 the tasks are stored in order.
        ``progress`` is called with the number of tasks sent so far after each
        request. A refused chunk raises SubmitError saying how many tasks were
        stored (sending the same tasks again is harmless).
        """

        def lines(part: list[dict[str, Any]]) -> list[bytes]:
            return [
                orjson.dumps({**t, "job": job} if job is not None and "job" not in t else t)
                for t in part
            ]

        return await self.submit_lines(
            (lines(part) for part in _chunks(tasks, chunk)),
            progress=progress,
            keep_states=keep_states,
            concurrency=concurrency,
        )

    async def submit_lines(
        self,
        chunks: Iterable[list[bytes]],
        *,
        progress: Callable[[int], None] | None = None,
        keep_states: bool = False,
        concurrency: int = 1,
    ) -> SubmitSummary:
        """Store tasks already serialised as JSON, one request per chunk of
        lines, ``concurrency`` requests in flight (see ``submit``)."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        total = SubmitSummary()
        failure: SubmitError | None = None
        sent = 0  # tasks handed to requests so far: where the next chunk starts
        feed = iter(chunks)

        async def send(part: list[bytes], start: int) -> None:
            nonlocal failure
            before = self.retried
            try:
                reply = await self._request(
                    "POST",
                    "/v1/tasks",
                    data=b"\n".join(part),
                    headers={"Content-Type": "application/x-ndjson"},
                )
            except BatchdClientError as exc:
                if failure is None or start < failure.task_index_base:
                    failure = SubmitError(exc, stored=0, chunk_start=start)
                return
            states = {t["custom_id"]: t["state"] for t in reply["tasks"]} if keep_states else {}
            total.add(
                SubmitSummary(
                    len(part),
                    reply["accepted"],
                    reply["duplicates"],
                    1,
                    self.retried - before,
                    states,
                )
            )
            if progress is not None:
                progress(total.tasks)

        async def worker() -> None:
            nonlocal sent
            while failure is None:
                part = next(feed, None)  # one reader at a time: the loop is single-threaded
                if part is None:
                    return
                start = sent
                sent += len(part)
                await send(part, start)

        if concurrency == 1:
            await worker()
        else:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        if failure is not None:
            failure.stored = total.tasks
            raise failure
        return total

    # --------------------------------------------------------------- reading

    async def get_task(self, custom_id: str) -> dict[str, Any]:
        """State, attempts, timestamps, last error, and the response once
        succeeded; TaskNotFound when batchd has no such task."""
        result: dict[str, Any] = await self._request("GET", f"/v1/tasks/{quote(custom_id, '')}")
        return result

    async def results(
        self, after: str | int = 0, limit: int = 500
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Every stored result once, in completion order, from cursor ``after``.
        Each row's ``seq`` is the cursor to resume from."""
        cursor = str(after)
        while True:
            page = await self._request(
                "GET", "/v1/results", params={"after": cursor, "limit": str(limit)}
            )
            for row in page["results"]:
                yield row
            cursor = page["next"]
            if not page["has_more"]:
                return

    # A timeout argument (not asyncio.timeout) so the sync wrapper has one too.
    async def wait(
        self,
        custom_ids: Iterable[str],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        interval: float = 1.0,
        max_interval: float = 15.0,
        concurrency: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Each task's view once all reached ``succeeded`` or ``failed``.

        Polls only the tasks not yet finished, ``concurrency`` at a time, less
        often as time goes by; raises TimeoutError after ``timeout`` seconds.
        ``progress`` gets the number of finished tasks after each round.
        """
        pending = list(dict.fromkeys(custom_ids))
        done: dict[str, dict[str, Any]] = {}
        gate = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        async def look(cid: str) -> None:
            async with gate:
                view = await self.get_task(cid)
            if view["state"] in TERMINAL_STATES:
                done[cid] = view

        while True:
            await asyncio.gather(*(look(cid) for cid in pending))
            pending = [cid for cid in pending if cid not in done]
            if progress is not None:
                progress(len(done))
            if not pending:
                return done
            if deadline is not None and loop.time() + interval > deadline:
                raise TimeoutError(f"{len(pending)} task(s) not finished within {timeout:g}s")
            await asyncio.sleep(interval)
            interval = min(max_interval, interval * 1.5)

    # ------------------------------------------------------------------- jobs

    def _job_path(self, job: str, tail: str = "") -> str:
        return f"/v1/jobs/{quote(job, '')}{tail}"

    async def get_job(self, job: str) -> dict[str, Any]:
        """The job's counts and money (one cheap call whatever its size);
        TaskNotFound when you have no job of that name."""
        view: dict[str, Any] = await self._request("GET", self._job_path(job))
        return view

    async def jobs(self, limit: int = 100) -> AsyncGenerator[dict[str, Any], None]:
        """Your jobs, newest first."""
        after: str | None = None
        while True:
            params = {"limit": str(limit), **({"after": after} if after else {})}
            page = await self._request("GET", "/v1/jobs", params=params)
            for row in page["jobs"]:
                yield row
            after = page["next"]
            if not page["has_more"] or after is None:
                return

    async def cancel_job(self, job: str) -> dict[str, Any]:
        """Cancel the job's queued tasks (tasks at the provider finish); the
        job's counts after it, with ``cancelled_now``. Harmless twice."""
        # A JSON body, empty: with no tokens configured batchd takes only
        # JSON POSTs (no cross-site form can cancel a job).
        view: dict[str, Any] = await self._request("POST", self._job_path(job, "/cancel"), json={})
        return view

    async def set_job_callback(self, job: str, url: str | None) -> dict[str, Any]:
        """Where the job's counts are POSTed when it finishes (None: nowhere)."""
        view: dict[str, Any] = await self._request(
            "PUT", self._job_path(job), json={"callback_url": url}
        )
        return view

    async def wait_job(
        self,
        job: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        interval: float = 0.25,
        min_tasks: int = 0,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """The job's status once no task of it is queued or submitted (and it
        holds at least ``min_tasks`` tasks): one GET per ``interval``, however
        big the job. ``progress`` gets each status. Raises JobNotFinished
        after ``timeout`` seconds."""
        # A quarter second: the status is one row and its unfolded deltas,
        # whatever the job's size, so four calls a second cost the daemon
        # little, and the caller learns of the end an eighth of a second
        # after it on average (half a second at one call a second).
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            view = await self.get_job(job)
            if progress is not None:
                progress(view)
            if view["finished_at"] is not None and view["tasks"] >= min_tasks:
                return view
            if deadline is not None and loop.time() + interval > deadline:
                left = view["queued"] + view["submitted"]
                raise JobNotFinished(
                    f"job {job!r}: {left} task(s) not finished within {timeout:g}s", view
                )
            await asyncio.sleep(interval)

    async def job_result_chunks(
        self,
        job: str,
        *,
        state: str | None = None,
        after: str | None = None,
        stop_at_open: bool = False,
    ) -> AsyncGenerator[bytes, None]:
        """The job's results stream as raw NDJSON bytes, whole lines only,
        resumed after the last complete line if the connection drops. With
        ``stop_at_open`` it ends before the first task not finished yet."""
        async for whole, _ in self._result_stream(job, state, after, stop_at_open):
            yield whole

    async def _result_stream(
        self, job: str, state: str | None, after: str | None, stop_at_open: bool
    ) -> AsyncGenerator[tuple[bytes, str], None]:
        """job_result_chunks, each chunk with the custom_id of its last line
        (the cursor to resume after)."""
        cursor = after
        attempt = 0
        while True:
            params = {
                **({"state": state} if state else {}),
                **({"after": cursor} if cursor else {}),
                **({"stop_at_open": "true"} if stop_at_open else {}),
            }
            tail = b""
            try:
                async with self.session.get(
                    self.base_url + self._job_path(job, "/results"),
                    params=params,
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout.total),
                ) as resp:
                    if resp.status != 200:
                        self._decode(resp.status, await resp.read())
                    # Big reads: the lines are copied whole, and the cursor is
                    # decoded from the last line of each read only.
                    async for data in resp.content.iter_chunked(1 << 20):
                        data = tail + data
                        end = data.rfind(b"\n") + 1
                        tail = data[end:]
                        if end:
                            whole = data[:end]
                            last = whole[whole.rfind(b"\n", 0, end - 1) + 1 :]
                            cursor = orjson.loads(last)["custom_id"]
                            attempt = 0
                            yield whole, cursor
                return
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                if attempt >= self.retries:
                    raise
            await asyncio.sleep(self._delay(attempt, None))
            attempt += 1
            self.retried += 1

    async def job_results(
        self, job: str, *, state: str | None = None, after: str | None = None
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Each finished task of the job once, in the order the tasks were
        accepted: ``{"custom_id", "state", "attempts", "response" | "error"}``.
        Memory stays flat whatever the job's size."""
        async for chunk in self.job_result_chunks(job, state=state, after=after):
            for line in chunk.splitlines():
                doc: dict[str, Any] = orjson.loads(line)
                yield doc

    async def write_job_results(self, job: str, out: Path, *, state: str | None = None) -> int:
        """Write the job's results to ``out`` as NDJSON (through a temporary
        file, renamed when complete); returns the number of lines."""
        tmp = out.with_name(out.name + ".part")
        lines = 0
        with tmp.open("wb") as f:
            async for chunk in self.job_result_chunks(job, state=state):
                f.write(chunk)
                lines += chunk.count(b"\n")
        tmp.replace(out)
        return lines

    async def wait_job_results(
        self,
        job: str,
        out: Path,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        interval: float = 0.25,
        min_tasks: int = 0,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[dict[str, Any], int]:
        """wait_job, writing the job's results to ``out`` while it runs: each
        time the status shows more tasks finished, the lines finished since
        the last one written are appended (GET .../results?stop_at_open=true
        from that line), so once the job is finished only its last lines are
        left to read. ``out`` ends as write_job_results writes it (same lines,
        same order; through a temporary file renamed when complete). Returns
        the final status and the number of lines. On JobNotFinished nothing
        is left behind."""
        tmp = out.with_name(out.name + ".part")
        cursor: str | None = None
        lines = 0
        finished = -1  # finished tasks at the last status that showed more
        more = asyncio.Event()
        done = False

        def status(view: dict[str, Any]) -> None:
            nonlocal finished
            now = view["succeeded"] + view["failed"] + view["cancelled"]
            if now > finished:
                finished = now
                more.set()
            if progress is not None:
                progress(view)

        async def copy(f: Any, stop_at_open: bool) -> None:
            nonlocal cursor, lines
            async for whole, last in self._result_stream(job, None, cursor, stop_at_open):
                f.write(whole)  # the line and its cursor together: a cancel lands between
                f.flush()  # what the file holds so far is on disk as it comes
                lines += whole.count(b"\n")
                cursor = last

        async def follow(f: Any) -> None:
            while not done:
                await more.wait()
                more.clear()
                await copy(f, True)

        try:
            with tmp.open("wb") as f:
                reader = asyncio.create_task(follow(f))
                try:
                    view = await self.wait_job(
                        job,
                        timeout=timeout,
                        interval=interval,
                        min_tasks=min_tasks,
                        progress=status,
                    )
                    done = True
                    more.set()
                    await reader
                except BaseException:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
                    raise
                # What the last read (begun before the job's last tasks were
                # stored, maybe) stopped short of.
                await copy(f, False)
                if lines != view["tasks"]:
                    # Not one line a task: a daemon from before stop_at_open
                    # (it skips open tasks instead of stopping at them), or
                    # tasks that joined since. Read it all again.
                    f.seek(0)
                    f.truncate()
                    cursor, lines = None, 0
                    await copy(f, False)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(out)
        return view, lines

    # -------------------------------------------------------------- callbacks

    async def failed_callbacks(self, client: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Callback deliveries that used up their attempts."""
        after = "0"
        while True:
            params = {"after": after, "limit": "500", **({"client": client} if client else {})}
            page = await self._request("GET", "/v1/callbacks/failed", params=params)
            for row in page["failed"]:
                yield row
            after = page["next"]
            if not page["has_more"]:
                return

    async def replay_callbacks(
        self, ids: Iterable[int] | None = None, custom_ids: Iterable[str] | None = None
    ) -> list[int]:
        """Deliver failed callbacks again (the named ones, or all when neither is given)."""
        doc: dict[str, Any] = {}
        if ids is not None:
            doc["ids"] = list(ids)
        if custom_ids is not None:
            doc["custom_ids"] = list(custom_ids)
        reply = await self._request("POST", "/v1/callbacks/replay", json=doc or {"all": True})
        replayed: list[int] = reply["ids"]
        return replayed


class SyncBatchdClient:
    """BatchdClient for code without an event loop: each call runs on a
    private loop the client keeps until ``close``. Not for use inside a
    running event loop (use BatchdClient there)."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8080", token: str | None = None, **options: Any
    ) -> None:
        self._runner = asyncio.Runner()
        self._client = BatchdClient(base_url, token, **options)

    def __enter__(self) -> SyncBatchdClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._client.connected:
            self._runner.run(self._client.close())
        self._runner.close()

    def _run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._runner.run(coro)
        coro.close()
        raise RuntimeError(
            "SyncBatchdClient was called inside a running event loop; "
            "use BatchdClient (async) there"
        )

    def submit(self, tasks: Iterable[dict[str, Any]], **options: Any) -> SubmitSummary:
        summary: SubmitSummary = self._run(self._client.submit(tasks, **options))
        return summary

    def submit_one(self, task: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = self._run(self._client.submit_one(task))
        return reply

    def get_task(self, custom_id: str) -> dict[str, Any]:
        view: dict[str, Any] = self._run(self._client.get_task(custom_id))
        return view

    def wait(self, custom_ids: Iterable[str], **options: Any) -> dict[str, dict[str, Any]]:
        done: dict[str, dict[str, Any]] = self._run(self._client.wait(custom_ids, **options))
        return done

    def results(self, after: str | int = 0, limit: int = 500) -> Iterator[dict[str, Any]]:
        pages = self._client.results(after, limit)
        try:
            while True:
                try:
                    yield self._run(pages.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(pages.aclose())

    def replay_callbacks(
        self, ids: Iterable[int] | None = None, custom_ids: Iterable[str] | None = None
    ) -> list[int]:
        replayed: list[int] = self._run(self._client.replay_callbacks(ids, custom_ids))
        return replayed

    def _iterate(self, gen: AsyncGenerator[T, None]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(gen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(gen.aclose())

    def get_job(self, job: str) -> dict[str, Any]:
        view: dict[str, Any] = self._run(self._client.get_job(job))
        return view

    def jobs(self, limit: int = 100) -> Iterator[dict[str, Any]]:
        return self._iterate(self._client.jobs(limit))

    def cancel_job(self, job: str) -> dict[str, Any]:
        view: dict[str, Any] = self._run(self._client.cancel_job(job))
        return view

    def set_job_callback(self, job: str, url: str | None) -> dict[str, Any]:
        view: dict[str, Any] = self._run(self._client.set_job_callback(job, url))
        return view

    def wait_job(self, job: str, **options: Any) -> dict[str, Any]:
        view: dict[str, Any] = self._run(self._client.wait_job(job, **options))
        return view

    def job_results(
        self, job: str, *, state: str | None = None, after: str | None = None
    ) -> Iterator[dict[str, Any]]:
        return self._iterate(self._client.job_results(job, state=state, after=after))

    def write_job_results(self, job: str, out: Path, *, state: str | None = None) -> int:
        lines: int = self._run(self._client.write_job_results(job, out, state=state))
        return lines

    def wait_job_results(self, job: str, out: Path, **options: Any) -> tuple[dict[str, Any], int]:
        done: tuple[dict[str, Any], int] = self._run(
            self._client.wait_job_results(job, out, **options)
        )
        return done


# ----------------------------------------------------------- JSONL files


class FileError(BatchdClientError):
    """A line of the tasks file is not a JSON object; nothing was sent."""


def scan_file(path: Path) -> int:
    """Count the tasks of a JSONL file and check every line parses, so a
    broken file is refused before anything is sent."""
    return scan_file_jobs(path)[0]


def scan_file_jobs(path: Path) -> tuple[int, bool]:
    """scan_file, and whether any task names a job of its own."""
    count = 0
    own_job = False
    try:
        for _, doc in jsonl.objects(path):
            own_job = own_job or "job" in doc
            count += 1
    except jsonl.JsonlError as exc:
        raise FileError(400, "invalid_json", f"{exc}; a task is one JSON object a line") from None
    return count, own_job


def file_chunks(
    path: Path, chunk: int, job: str | None = None, *, own_job: bool = True
) -> Iterator[list[bytes]]:
    """The tasks of a JSONL file as lists of ``chunk`` JSON lines, read as a
    stream. With ``job``, each task that names no job of its own gets it;
    when ``own_job`` is False (scan_file_jobs found none) the field is added
    to the line's bytes, without decoding and encoding the task again."""
    tail = b',"job":' + orjson.dumps(job) + b"}" if job is not None else b""
    part: list[bytes] = []
    with path.open("rb") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            if job is not None:
                if own_job:
                    task = orjson.loads(line)
                    task.setdefault("job", job)
                    line = orjson.dumps(task)
                else:
                    line = line[:-1] + tail if line != b"{}" else b'{"job":' + tail[7:]
            part.append(line)
            if len(part) == chunk:
                yield part
                part = []
    if part:
        yield part


def iter_file(path: Path) -> Iterator[dict[str, Any]]:
    """The tasks of a JSONL file, read as a stream."""
    for _, task in jsonl.objects(path):
        yield task


def line_of_task(path: Path, index: int) -> int | None:
    """The 1-based line number of the ``index``-th task (blank lines skipped)."""
    seen = -1
    with path.open("rb") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return n
    return None


async def submit_file(
    path: Path,
    url: str,
    *,
    token: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> SubmitSummary:
    """POST a JSONL file of tasks in chunks of ``chunk`` lines."""
    async with BatchdClient(url, token) as client:
        return await client.submit(iter_file(path), chunk=chunk, progress=progress)
