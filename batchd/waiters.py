"""``POST /v1/tasks?wait``: callers waiting for their tasks to finish.

Each waiting request used to poll the database on its own, one query per
task per tick, so a few hundred waiters held the connection pool and every
other caller's POST queued behind them. Here all waiters of a replica share
one poller: each tick asks, in one query per client waiting, which of their
tasks are finished, and each waiter is woken when all of its own are. The number waiting at once
is capped (``BATCHD_MAX_WAITERS``: past it a ?wait request is a 429 before
anything is stored), and a waiter whose caller hung up is dropped at the next
tick, so nothing lingers after the callers leave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.store.tasks import finished_custom_ids

log = logs.get("batchd.waiters")

# The first look comes soon (a sync-lane task can finish in well under a
# second); then the tick grows, so long waits cost a query every half second.
_FIRST_DELAY = 0.05
_MAX_DELAY = 0.5


@dataclass(eq=False, slots=True)
class _Waiter:
    client: str  # whose custom_ids these are
    pending: set[str]
    gone: Callable[[], bool]
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Waiters:
    """The replica's waiting requests and the one poller they share."""

    def __init__(self, engine: AsyncEngine, max_waiters: int) -> None:
        self.engine = engine
        self.max_waiters = max_waiters
        self._waiting: set[_Waiter] = set()
        self._reserved = 0
        self._poller: asyncio.Task[None] | None = None
        self._joined = asyncio.Event()

    @property
    def count(self) -> int:
        return len(self._waiting) + self._reserved

    def reserve(self) -> bool:
        """Hold a place for a request about to wait (before its tasks are
        stored, so a refusal stores nothing); False when all are taken."""
        if self.count >= self.max_waiters:
            return False
        self._reserved += 1
        metrics.WAITERS.set(self.count)
        return True

    def release(self) -> None:
        """Give back a place reserved and not waited on."""
        self._reserved -= 1
        metrics.WAITERS.set(self.count)

    async def wait(
        self, client: str, custom_ids: list[str], seconds: float, gone: Callable[[], bool]
    ) -> bool:
        """Wait (on a place reserved) until every one of ``client``'s tasks is
        finished: True, or False on timeout or once ``gone()`` says the caller
        hung up."""
        self._reserved -= 1
        waiter = _Waiter(client, set(custom_ids), gone)
        self._waiting.add(waiter)
        metrics.WAITERS.set(self.count)
        self._joined.set()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="waiters")
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.done), seconds)
        except TimeoutError:
            return False
        finally:
            self._waiting.discard(waiter)
            metrics.WAITERS.set(self.count)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None

    async def _poll(self) -> None:
        delay = _FIRST_DELAY
        while self._waiting:
            try:
                # A newcomer cuts the sleep short ...
                await asyncio.wait_for(self._joined.wait(), delay)
            except TimeoutError:
                delay = min(delay * 1.5, _MAX_DELAY)
            if self._joined.is_set():
                # ... but the ticks stay at least this far apart, however
                # many join: one query serves all who came meanwhile.
                self._joined.clear()
                delay = _FIRST_DELAY
                await asyncio.sleep(_FIRST_DELAY)
            try:
                await self._tick()
            except Exception as exc:
                # The waiters stay; the next tick asks again.
                log.warning(
                    "waiters.tick_failed", error=type(exc).__name__, waiters=len(self._waiting)
                )

    async def _tick(self) -> None:
        live = []
        for waiter in list(self._waiting):
            if waiter.gone():
                if not waiter.done.done():
                    waiter.done.set_result(False)
            elif not waiter.done.done():
                live.append(waiter)
        wanted: dict[str, set[str]] = {}
        for waiter in live:
            wanted.setdefault(waiter.client, set()).update(waiter.pending)
        if not wanted:
            return
        finished: dict[str, set[str]] = {}
        # One query per client waiting (custom_ids are a client's own).
        async with self.engine.connect() as conn:
            for client, ids in wanted.items():
                finished[client] = await finished_custom_ids(conn, client, sorted(ids))
        for waiter in live:
            waiter.pending -= finished[waiter.client]
            if not waiter.pending and not waiter.done.done():
                waiter.done.set_result(True)
