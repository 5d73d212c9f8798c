"""HTTP payloads → validated tasks → the store, all or nothing."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd import logs, metrics, tokens
from batchd.clients import LOCAL_CLIENT, Client, Clients
from batchd.config import Settings
from batchd.contract import Accepted, State, TaskRequest, TaskState, admit, contract_for
from batchd.domain import (
    DEFAULT_LIMITS,
    InvalidTask,
    Limits,
    Routing,
    TaskIn,
    callback_url_problem,
    file_byte_budget,
    place,
)
from batchd.errors import BatchdError
from batchd.store.tasks import IngestResult, TaskKey, insert_tasks, limit_lock_wait

log = logs.get("batchd.ingest")


# Seconds a caller is told to wait when the database is too slow to take more.
OVERLOADED_RETRY_AFTER = 2


class IngestError(BatchdError):
    """A request the API refuses; ``status`` and ``code`` go into the reply."""

    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or {}


# Tasks validated between two turns of the event loop. A 1,000-task request
# takes milliseconds to validate; in one go, the round trips of the commits
# in flight wait all that while and the database sits idle.
VALIDATE_SLICE = 250


# A request's tasks as decoded (decode.BodyPieces): the contract's type, or
# where one was not, the InvalidTask that says why.
Decoded = TaskRequest | InvalidTask


async def validate(
    items: list[Decoded], limits: Limits, max_line_bytes: int, routing: Routing | None = None
) -> list[TaskIn]:
    """Check and route every task; the first invalid one refuses the whole request."""
    if not items:
        raise IngestError(400, "invalid_request", "the request holds no tasks")
    if len(items) > limits.tasks_per_request:
        raise IngestError(
            413,
            "too_many_tasks",
            f"a request may hold at most {limits.tasks_per_request} tasks; split it",
        )
    return await validate_piece(items, limits, max_line_bytes, 0, {}, routing)


async def validate_piece(
    items: list[Decoded],
    limits: Limits,
    max_line_bytes: int,
    start: int,
    seen: dict[str, str],
    routing: Routing | None = None,
) -> list[TaskIn]:
    """Check a piece of a request whose first task is number ``start``.
    ``seen`` maps the custom_ids of the request's earlier pieces to their
    digests: one repeated with the same body is dropped (a duplicate), with
    another body it is a 409."""
    tasks: list[TaskIn] = []
    for offset, item in enumerate(items):
        if offset and not offset % VALIDATE_SLICE:
            await asyncio.sleep(0)
        index = start + offset
        try:
            if isinstance(item, InvalidTask):
                raise item
            task = admit(item, index, limits)
            if routing is not None:
                task.provider = routing.route(task, index)
        except InvalidTask as exc:
            code = "task_too_large" if exc.status == 413 else "invalid_task"
            raise IngestError(
                exc.status,
                code,
                str(exc),
                {"index": exc.index, "custom_id": exc.custom_id, "field": exc.field},
            ) from None
        if task.line_bytes > max_line_bytes:
            raise IngestError(
                413,
                "task_too_large",
                f"task {index} ({task.custom_id!r}) is {task.line_bytes} bytes, "
                f"more than a provider input file may hold ({max_line_bytes})",
            )
        digest = seen.setdefault(task.custom_id, task.digest)
        if digest is task.digest:  # this very task's: the id is new to the request
            tasks.append(task)
        elif digest != task.digest:
            raise IngestError(
                409,
                "conflict",
                f"custom_id {task.custom_id!r} appears twice with different bodies",
                {"custom_ids": [task.custom_id]},
            )
    return tasks


# Tasks counted between yields to the event loop (a 4,000-character prompt
# takes about 0.1 ms to count).
COUNT_SLICE = 100


async def count_input_tokens(tasks: list[TaskIn]) -> None:
    """Replace the byte rule's input estimate by the tokenizer's count where
    the model has a tokenizer (the budget's margin is added when reserving)."""
    for index, task in enumerate(tasks):
        if index and not index % COUNT_SLICE:
            await asyncio.sleep(0)
        counted = tokens.count_input_tokens(task.endpoint, task.model, task.body)
        if counted is not None:
            task.est_input_tokens = counted


@dataclass(slots=True)
class _Pending:
    tasks: list[TaskIn]
    done: asyncio.Future[IngestResult]
    # Set when a transaction takes the request: from then on its caller waits
    # for the commit however long it takes, since only the commit can say
    # whether the tasks are stored.
    started: bool = False
    # Set when the caller stopped waiting for a transaction (and was told
    # 503): no writer may store it after that.
    abandoned: bool = False


def overloaded(message: str) -> IngestError:
    return IngestError(503, "overloaded", message, {"retry_after": OVERLOADED_RETRY_AFTER})


# lock_not_available (lock_timeout) and query_canceled: the database was too
# slow for us, and the transaction was rolled back, so nothing was stored.
_SLOW_SQLSTATES = frozenset({"55P03", "57014"})


# Classes of SQLSTATE that blame the data, not the database: data exception
# (22), integrity constraint (23), program limit (54: an index row too large).
_VALUE_SQLSTATE_CLASSES = ("22", "23", "54")


def _refused_value(exc: BaseException) -> bool:
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None) or ""
    return sqlstate[:2] in _VALUE_SQLSTATE_CLASSES


def _too_slow(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in _SLOW_SQLSTATES


def _job_cancelled(jobs: list[tuple[str, str]]) -> IngestError:
    names = ", ".join(repr(job) for _client, job in jobs[:5])
    return IngestError(
        409,
        "job_cancelled",
        f"job {names} was cancelled; nothing of this "
        "request was stored. Send the tasks in a new job",
        {"jobs": [job for _client, job in jobs[:100]]},
    )


def _conflict(keys: list[TaskKey]) -> IngestError:
    # Only the caller's own tasks can conflict: the key holds its client.
    custom_ids = [cid for _, cid in keys]
    return IngestError(
        409,
        "conflict",
        f"{len(custom_ids)} custom_id(s) already exist with a different body: "
        f"{', '.join(custom_ids[:5])}",
        {"custom_ids": custom_ids[:100]},
    )


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """The settings ingest reads (the defaults are Settings' own)."""

    limits: Limits = DEFAULT_LIMITS
    max_line_bytes: int = 200 * 1024 * 1024  # a task's input line in a provider file
    window_seconds: float = 900
    batch_share: int = 100
    callback_hosts: tuple[str, ...] = ()
    client_profiles: dict[str, str] = dataclasses.field(default_factory=dict)
    timeout: float = 10.0
    max_pending: int = 20_000
    count_tokens: bool = False  # a budget to keep: count input tokens with the tokenizer
    group_tasks: int = 2000  # tasks one group commit takes
    writers: int = 2

    @classmethod
    def from_settings(cls, s: Settings) -> IngestConfig:
        return cls(
            limits=s.limits,
            max_line_bytes=file_byte_budget(s.max_file_bytes),
            window_seconds=s.window_seconds,
            batch_share=s.batch_share,
            callback_hosts=s.callback_hosts,
            client_profiles=s.profiles_by_client,
            timeout=s.ingest_timeout_seconds,
            max_pending=s.max_pending_tasks,
            count_tokens=s.any_budget,
        )


class Ingest:
    """Stores validated tasks, many requests per transaction (group commit).

    Small requests queue up while a transaction is in flight and the next
    one takes them all, so 64 clients posting one task each cost a handful
    of commits, not 64; each request is still answered only after the
    commit that holds its tasks. A group in which any request conflicts is
    rolled back and its requests are stored one by one, so one caller's 409
    never touches another caller's tasks.

    Backpressure instead of a pile-up when the database is slow: past
    ``max_pending`` tasks waiting for a commit a request is refused at once;
    a request no transaction has taken within ``timeout`` seconds is
    withdrawn; a lock held longer than ``timeout`` rolls the transaction
    back. Each is a 503 ``overloaded`` with Retry-After, and in each case
    nothing of the request was stored.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        config: IngestConfig | None = None,
        *,
        clients: Clients | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_sync: Callable[[], None] | None = None,
        model_problem: Callable[[str], str | None] | None = None,
        routing: Routing | None = None,
    ) -> None:
        c = config or IngestConfig()
        self.engine = engine
        # Which provider each task goes to, and which are configured here.
        self.routing = routing or Routing()
        # With a budget to keep, each task's input tokens are counted with
        # the model's tokenizer (batchd.tokens) instead of the byte rule.
        self.count_tokens = c.count_tokens
        # Why a model may not have a window of its own (None: it may); a
        # model it refuses makes the request a 400.
        self.model_problem = model_problem
        self.timeout = c.timeout
        self.max_pending = c.max_pending
        self._pending = 0  # tasks of requests waiting for their commit
        # Called after a commit that stored sync-lane tasks (wakes the lane).
        self.on_sync = on_sync
        self.client_profiles = c.client_profiles
        self.clients = clients or Clients([])
        self.callback_hosts = c.callback_hosts
        self.window_seconds = c.window_seconds
        self.batch_share = c.batch_share
        self.clock = clock
        self.limits = c.limits
        # The request types of these limits, built once.
        self.contract = contract_for(c.limits)
        self.max_line_bytes = c.max_line_bytes
        self.group_tasks = c.group_tasks
        self.writers = c.writers
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        # Requests streamed in pieces, each holding a connection and an open
        # transaction while its body arrives.
        self._streams = asyncio.Semaphore(max(2, c.writers * 2))
        self._writer_tasks: list[asyncio.Task[None]] = []

    async def prepare(self, items: list[Decoded], client: Client = LOCAL_CLIENT) -> list[TaskIn]:
        """Validate and place a request's tasks for ``client``, without I/O:
        the 400/409/413 verdicts."""
        checked = await validate(items, self.limits, self.max_line_bytes, self.routing)
        if self.model_problem is not None:
            self._check_models(checked)
        tasks = self._placed(self._with_callbacks(checked, items, client))
        if self.count_tokens:
            await count_input_tokens(tasks)
        return tasks

    def _check_models(self, tasks: list[TaskIn]) -> None:
        verdicts: dict[str, str | None] = {}
        for index, t in enumerate(tasks):
            if t.model not in verdicts:
                assert self.model_problem is not None
                verdicts[t.model] = self.model_problem(t.model)
            problem = verdicts[t.model]
            if problem is not None:
                raise IngestError(
                    400,
                    "invalid_task",
                    f"task {index} ({t.custom_id!r}): body.model {problem}",
                    {"index": index, "custom_id": t.custom_id, "field": "body.model"},
                )

    async def prepare_piece(
        self, items: list[Decoded], start: int, seen: dict[str, str], client: Client = LOCAL_CLIENT
    ) -> list[TaskIn]:
        """``prepare`` for one piece of a request streamed in pieces."""
        tasks = self._placed(
            self._with_callbacks(
                await validate_piece(
                    items, self.limits, self.max_line_bytes, start, seen, self.routing
                ),
                items,
                client,
                start,
            )
        )
        if self.count_tokens:
            await count_input_tokens(tasks)
        return tasks

    async def store_stream(
        self,
        first: list[TaskIn],
        rest: AsyncIterator[list[TaskIn]],
        n_items: Callable[[], int],
        client: Client = LOCAL_CLIENT,
    ) -> Accepted:
        """Store a request's pieces in one transaction, inserting each while
        the next is read and validated (``n_items()``: the tasks the request
        held, repeats within it included, once all is read). All or nothing: an error in
        any piece (``rest`` raising), a conflict or a database error rolls
        back everything, and only the commit at the end makes it durable.

        A slot of ``streams`` is held throughout, so a few slow streaming
        callers cannot take the connection pool from everyone else (and the
        decoder refuses a body that stalls).
        """
        try:
            await asyncio.wait_for(self._streams.acquire(), self.timeout)
        except TimeoutError:
            raise overloaded(
                "too many large requests are being stored now; nothing was stored, retry later"
            ) from None
        inserted: list[TaskKey] = []
        duplicates: dict[TaskKey, str] = {}
        lanes: dict[str, str] = {}
        counted = 0
        try:
            async with self.engine.connect() as conn:
                async with conn.begin() as tx:
                    await limit_lock_wait(conn, self.timeout)
                    tasks: list[TaskIn] | None = first
                    while tasks is not None:
                        if self._pending + len(tasks) > self.max_pending:
                            raise overloaded(
                                f"{self._pending} tasks are already waiting for "
                                "the database; retry later"
                            )
                        self._pending += len(tasks)
                        counted += len(tasks)
                        insert = asyncio.ensure_future(insert_tasks(conn, tasks))
                        try:
                            # The next piece is read and validated while this
                            # one is in the database's hands.
                            following = await anext(rest, None)
                        except BaseException:
                            await asyncio.gather(insert, return_exceptions=True)
                            raise
                        result = await insert
                        if result.cancelled_jobs:
                            await tx.rollback()
                            raise _job_cancelled(result.cancelled_jobs)
                        if result.conflicts:
                            await tx.rollback()
                            raise _conflict(result.conflicts)
                        inserted += result.inserted
                        duplicates.update(result.duplicates)
                        lanes.update((t.custom_id, t.lane) for t in tasks)
                        tasks = following
        except DBAPIError as exc:
            raise self._database_error(exc, counted) from None
        finally:
            self._pending -= counted
            self._streams.release()
        return self._accepted(IngestResult(inserted, duplicates, []), lanes, n_items(), client)

    async def submit(self, items: list[Decoded], client: Client = LOCAL_CLIENT) -> Accepted:
        return await self.store(await self.prepare(items, client), len(items), client)

    async def store(
        self, tasks: list[TaskIn], n_items: int, client: Client = LOCAL_CLIENT
    ) -> Accepted:
        """Commit prepared tasks; answers only once they are durable."""
        n_tasks = len(tasks)
        if self._pending + n_tasks > self.max_pending:
            raise overloaded(
                f"{self._pending} tasks are already waiting for the database; retry later"
            )
        self._pending += n_tasks
        try:
            if n_tasks >= self.group_tasks:
                result = await self._store_alone(tasks)
            else:
                result = await self._store_grouped(tasks)
        except DBAPIError as exc:
            raise self._database_error(exc, n_tasks) from None
        finally:
            self._pending -= n_tasks
        if result.cancelled_jobs:
            raise _job_cancelled(result.cancelled_jobs)
        if result.conflicts:
            raise _conflict(result.conflicts)
        return self._accepted(result, {t.custom_id: t.lane for t in tasks}, n_items, client)

    def _database_error(self, exc: DBAPIError, n_tasks: int) -> BaseException:
        """What the caller is told when the transaction failed (nothing stored)."""
        if _refused_value(exc):
            log.warning(
                "ingest.value_refused", tasks=n_tasks, sqlstate=getattr(exc.orig, "sqlstate", "")
            )
            return IngestError(
                400,
                "invalid_task",
                "the database refused a value in this request; nothing of it was stored",
            )
        if not _too_slow(exc):
            return exc
        log.warning(
            "ingest.database_slow", tasks=n_tasks, sqlstate=getattr(exc.orig, "sqlstate", "")
        )
        return overloaded(
            "the task store is too slow to take this now; nothing was stored, retry later"
        )

    def _accepted(
        self, result: IngestResult, lanes: dict[str, str], n_items: int, client: Client
    ) -> Accepted:
        """The reply for stored tasks (``lanes``: each task's lane; ``n_items``:
        the tasks the request held, repeats within it included)."""
        if self.on_sync is not None and result.inserted and "sync" in lanes.values():
            self.on_sync()
        by_lane = Counter(lanes[cid] for _, cid in result.inserted)
        for lane, n in by_lane.items():
            metrics.TASKS_RECEIVED.labels(client=self.clients.label(client.name), lane=lane).inc(n)
        states = [TaskState(cid, "queued") for _, cid in result.inserted]
        states += [TaskState(cid, cast(State, st)) for (_, cid), st in result.duplicates.items()]
        n_dupes = len(result.duplicates) + (n_items - len(lanes))
        return Accepted(len(result.inserted), n_dupes, states)

    def _with_callbacks(
        self, tasks: list[TaskIn], items: list[Decoded], client: Client, start: int = 0
    ) -> list[TaskIn]:
        """Stamp the client on each task and give it its token's default
        callback_url; refuse a URL the allow-list or missing secret rules out."""
        name = client.name
        default = client.callback_url
        out = []
        for t in tasks:
            url = t.callback_url or default
            for field, value in (("callback_url", url), ("job_callback_url", t.job_callback_url)):
                problem = self.callback_problem(value, name)
                if problem:
                    index = start + next(
                        (
                            i
                            for i, item in enumerate(items)
                            if isinstance(item, TaskRequest) and item.custom_id == t.custom_id
                        ),
                        0,
                    )
                    raise IngestError(
                        400,
                        "invalid_task",
                        f"task {index} ({t.custom_id!r}): {field} {problem}",
                        {"index": index, "custom_id": t.custom_id, "field": field},
                    )
            out.append(
                t
                if url == t.callback_url and name == t.client
                else replace(t, callback_url=url, client=name)
            )
        return out

    def callback_problem(self, url: str | None, client: str | None) -> str | None:
        """Why ``url`` cannot receive ``client``'s callbacks (the allow-list,
        no secret to sign with), or None."""
        if url is None:
            return None
        problem = callback_url_problem(url, self.callback_hosts)
        if problem is None and self.clients.secret_for(client) is None:
            problem = (
                f"cannot be used: no callback secret for client "
                f"{client or LOCAL_CLIENT.name!r} (callback_secret in "
                "BATCHD_INGEST_TOKENS_FILE, or BATCHD_CALLBACK_SECRET)"
            )
        return problem

    def _placed(self, tasks: list[TaskIn]) -> list[TaskIn]:
        """Decide each task's lane (domain.place) before it is stored."""
        now = self.clock()
        placed = []
        for t in tasks:
            # The task's own metadata.latency_profile wins over its client's.
            profile = t.profile or self.client_profiles.get(t.client)
            if profile != t.profile:  # dataclasses.replace costs microseconds a task
                t = replace(t, profile=profile)
            p = place(t, now, self.window_seconds, self.batch_share)
            if (p.lane, p.backdate_seconds, p.fallback_at, p.fallback_action) != (
                t.lane,
                t.backdate_seconds,
                t.fallback_at,
                t.fallback_action,
            ):
                t = replace(
                    t,
                    lane=p.lane,
                    backdate_seconds=p.backdate_seconds,
                    fallback_at=p.fallback_at,
                    fallback_action=p.fallback_action,
                )
            placed.append(t)
        return placed

    async def close(self) -> None:
        for task in self._writer_tasks:
            task.cancel()
        await asyncio.gather(*self._writer_tasks, return_exceptions=True)
        self._writer_tasks.clear()

    async def _store_alone(self, tasks: list[TaskIn]) -> IngestResult:
        """One request, one transaction; rolled back whole on a conflict."""
        async with self.engine.connect() as conn:
            async with conn.begin() as tx:
                await limit_lock_wait(conn, self.timeout)
                result = await insert_tasks(conn, tasks)
                if result.conflicts or result.cancelled_jobs:
                    await tx.rollback()
        return result

    async def _store_grouped(self, tasks: list[TaskIn]) -> IngestResult:
        if not self._writer_tasks:
            self._writer_tasks = [
                asyncio.create_task(self._writer(), name=f"ingest-writer-{i}")
                for i in range(self.writers)
            ]
        done: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(tasks, done)
        self._queue.put_nowait(pending)
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.timeout)
        except TimeoutError:
            if pending.started:
                return await done
            pending.abandoned = True
            log.warning("ingest.queue_timeout", tasks=len(tasks), waiting=self._queue.qsize())
            raise overloaded(
                "the task store is too slow to take this now; nothing was stored, retry later"
            ) from None

    async def _writer(self) -> None:
        while True:
            group = self._group(await self._queue.get())
            try:
                # One connection for as long as requests keep coming: each
                # checkout pings the server first (three round trips), and
                # a bulk load would pay that for every group.
                async with self.engine.connect() as conn:
                    while True:
                        await self._write_group(conn, group)
                        if self._queue.empty():
                            break
                        group = self._group(self._queue.get_nowait())
            except Exception as exc:
                for p in group:
                    if p.abandoned:
                        p.done.cancel()
                    elif not p.done.done():
                        p.done.set_exception(exc)

    def _group(self, first: _Pending) -> list[_Pending]:
        """``first`` and the requests queued behind it, up to group_tasks tasks."""
        group = [first]
        size = len(first.tasks)
        while size < self.group_tasks and not self._queue.empty():
            nxt = self._queue.get_nowait()
            group.append(nxt)
            size += len(nxt.tasks)
        return group

    def _take(self, group: list[_Pending]) -> list[_Pending]:
        """The requests of ``group`` whose callers still wait, now started."""
        live = []
        for p in group:
            if p.abandoned:
                p.done.cancel()
            else:
                p.started = True
                live.append(p)
        return live

    async def _write_group(self, conn: AsyncConnection, group: list[_Pending]) -> None:
        result = IngestResult([], {}, [])
        live: list[_Pending] = []
        split = False
        try:
            async with conn.begin() as tx:
                await limit_lock_wait(conn, self.timeout)
                live = self._take(group)
                everything = [t for p in live for t in p.tasks]
                split = len({(t.client, t.custom_id) for t in everything}) != len(everything)
                if everything and not split:
                    result = await insert_tasks(conn, everything)
                    if result.conflicts or result.cancelled_jobs:
                        await tx.rollback()
                        split = len(live) > 1
        except DBAPIError as exc:
            if len(live) <= 1 or not _refused_value(exc):
                raise
            # A value validation let through that the database refuses: the
            # group was rolled back, and each request is tried on its own
            # below, so only the one that holds it fails.
            log.warning(
                "ingest.group_refused",
                requests=len(live),
                sqlstate=getattr(exc.orig, "sqlstate", ""),
            )
            split = True
        if not live:
            return
        if len(live) == 1 and not split:
            live[0].done.set_result(result)  # a conflict in it rolled back the whole request
            return
        if split:
            # Rare: settle each request on its own so verdicts stay per caller.
            log.debug("ingest.group_split", requests=len(live))
            for p in live:
                try:
                    p.done.set_result(await self._store_alone(p.tasks))
                except Exception as exc:
                    p.done.set_exception(exc)
            return
        inserted = set(result.inserted)
        for p in live:
            mine = [(t.client, t.custom_id) for t in p.tasks]
            fresh = [key for key in mine if key in inserted]
            dupes = {key: result.duplicates[key] for key in mine if key not in inserted}
            p.done.set_result(IngestResult(fresh, dupes, []))
