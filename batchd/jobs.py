"""Jobs (DESIGN section 13): a submission tracked as one thing.

The counters are kept by the statements that move tasks (store/jobs.py);
this module folds their deltas into the job rows, cancels jobs, and streams
a job's results. Every replica runs the fold loop; one folds at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.clients import Clients
from batchd.loops import run_ticks
from batchd.store import jobs as store
from batchd.store.jobs import FINISHED_STATES, OPEN_STATES, JobView

log = logs.get("batchd.jobs")

_TICK_SECONDS = 1.0
FOLD_STEP = 10_000
CANCEL_STEP = 5_000
RESULTS_PAGE = 1_000


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What a cancel did: tasks it cancelled now, and the job after it."""

    cancelled_now: int
    job: JobView


class Jobs:
    def __init__(self, engine: AsyncEngine, clients: Clients | None = None) -> None:
        self.engine = engine
        self.clients = clients or Clients([])

    async def run(self, stop: asyncio.Event) -> None:
        await run_ticks(
            stop,
            self.tick,
            logger=log,
            event="jobs.tick_failed",
            interval=lambda done: 0 if done >= FOLD_STEP else _TICK_SECONDS,
        )

    async def tick(self) -> int:
        """Fold a step of deltas, cancel what came back to cancelled jobs'
        queues, refresh the gauge. Returns the deltas folded."""
        # One checkout a tick: an idle daemon runs this every second.
        async with self.engine.begin() as conn:
            fold = await store.fold_deltas(conn, FOLD_STEP)
            again = await store.cancelled_with_queued(conn)
            metrics.JOBS_OPEN.set(await store.open_job_count(conn))
        for client, job in fold.finished:
            log.info("job.finished", client=client, job=job)
        for client, job in again:
            n = await self._cancel_queued(client, job)
            log.info("job.retries_cancelled", client=client, job=job, tasks=n)
        return fold.deltas

    async def fold_all(self) -> None:
        """Fold every delta there is (tests, and a read that wants no lag)."""
        while True:
            async with self.engine.begin() as conn:
                fold = await store.fold_deltas(conn, FOLD_STEP)
            if fold.deltas < FOLD_STEP:
                return

    async def get(self, client: str, job: str) -> JobView | None:
        async with self.engine.connect() as conn:
            return await store.get_job(conn, client, job)

    async def page(self, client: str, after: str | None, limit: int) -> list[JobView]:
        async with self.engine.connect() as conn:
            return await store.list_jobs(conn, client, after, limit)

    async def page_all(self, after: tuple[str, str] | None, limit: int) -> list[JobView]:
        """Every client's jobs, newest first (an admin's view)."""
        async with self.engine.connect() as conn:
            return await store.list_all_jobs(conn, after, limit)

    async def cancel(self, client: str, job: str) -> Cancelled | None:
        """Mark the job cancelled and cancel its queued tasks, a bounded step
        per transaction; tasks at the provider finish. None: no such job.
        Cancelling again cancels what has come back to the queue, if anything."""
        async with self.engine.begin() as conn:
            if not await store.lock_for_cancel(conn, client, job):
                return None
        n = await self._cancel_queued(client, job)
        log.info("job.cancelled", client=client, job=job, tasks=n)
        view = await self.get(client, job)
        assert view is not None
        return Cancelled(n, view)

    async def _cancel_queued(self, client: str, job: str) -> int:
        after, total = 0, 0
        while True:
            async with self.engine.begin() as conn:
                step = await store.cancel_queued(conn, client, job, after, CANCEL_STEP)
            total += step.cancelled
            for who, n in step.by_client.items():
                metrics.TASKS_CANCELLED.labels(client=self.clients.label(who)).inc(n)
            if step.last_id is None:
                return total
            after = step.last_id

    async def set_callback(self, client: str, job: str, url: str | None) -> bool:
        async with self.engine.begin() as conn:
            return await store.set_callback(conn, client, job, url)

    async def results(
        self,
        client: str,
        job: str,
        *,
        after: int = 0,
        states: Sequence[str] = FINISHED_STATES,
        page: int = RESULTS_PAGE,
        stop_at_open: bool = False,
    ) -> AsyncIterator[bytes]:
        """The job's finished tasks as NDJSON lines, in task id order (the
        order they were accepted), a page at a time: memory stays flat
        whatever the job's size. Each page is its own short read, so a slow
        reader holds no snapshot or connection between pages.

        ``stop_at_open`` ends the stream before the first task still queued
        or submitted: what it gave is then exactly the start of what a read
        after the job finished gives, so a reader can take a running job's
        results as they come and resume after its last line."""
        read = [*FINISHED_STATES, *OPEN_STATES] if stop_at_open else states
        while True:
            async with self.engine.begin() as conn:
                rows = await store.results_page(conn, client, job, after, read, page)
            full = len(rows) == page
            if stop_at_open:
                cut = next((i for i, r in enumerate(rows) if r[2] in OPEN_STATES), None)
                if cut is not None:
                    rows, full = rows[:cut], False
                if rows:
                    after = rows[-1][0]
                rows = [r for r in rows if r[2] in states]
            elif rows:
                after = rows[-1][0]
            if rows:
                yield b"".join(result_line(r) for r in rows)
            if not full:
                return


def result_line(row: Sequence[Any]) -> bytes:
    """One NDJSON line: custom_id, state, attempts, and the response (when
    succeeded) or the error, copied as the JSON text the database holds."""
    custom_id: str = row[1]
    state: str = row[2]
    attempts: int = row[3]
    head = (
        b'{"custom_id":'
        + orjson.dumps(custom_id)
        + b',"state":"'
        + state.encode()
        + b'","attempts":'
        + str(attempts).encode()
    )
    if state == "succeeded":
        response: str | None = row[5]
        return head + b',"response":' + (response or "null").encode() + b"}\n"
    error: str | None = row[4]
    return head + b',"error":' + (error or "null").encode() + b"}\n"


def view_json(view: JobView) -> dict[str, Any]:
    """The job as GET /v1/jobs/{job} answers it; money rounded to 1e-6 USD."""
    spend = round(view.spend_usd, 6)
    sync = round(view.sync_equivalent_usd, 6)
    return {
        "job": view.job,
        "tasks": view.tasks,
        "queued": view.queued,
        "submitted": view.submitted,
        "succeeded": view.succeeded,
        "failed": view.failed,
        "cancelled": view.cancelled,
        "spend_usd": str(spend),
        "sync_equivalent_usd": str(sync),
        "savings_usd": str(sync - spend),
        "created_at": view.created_at.isoformat(),
        "finished_at": view.finished_at.isoformat() if view.finished_at else None,
        "cancelled_at": view.cancelled_at.isoformat() if view.cancelled_at else None,
        "callback_url": view.callback_url,
    }
