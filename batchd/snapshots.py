"""The gauges loop: queue depth, live batches, the day's spend, each capped
client's spend and queue, callback backlog, read every few seconds so a
scrape never touches the database; ingest's queue limits read the same
counts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.clients import Clients
from batchd.loops import run_ticks
from batchd.store import gauges
from batchd.store.callbacks import callback_backlog
from batchd.store.spend import client_day_spend
from batchd.store.tasks import queued_by_client
from batchd.web import ApiState

log = logs.get("batchd.snapshots")

SNAPSHOT_SECONDS = 5.0
# The snapshot counts the queue, so its cost grows with it: on a deep queue it
# runs less often, never taking more than 1/DUTY of the time.
DUTY = 20


class Snapshots:
    def __init__(
        self,
        engine: AsyncEngine,
        clients: Clients,
        api: ApiState,
        budgets_by_client: dict[str, Decimal],
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.clients = clients
        self.api = api
        self.budgets_by_client = budgets_by_client
        self.clock = clock
        self._client_labels: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        # run_ticks hands interval() what the tick returns: here the tick's
        # own milliseconds, so the pause keeps the duty cycle.
        await run_ticks(
            stop,
            self._timed_tick,
            logger=log,
            event="snapshot.failed",
            interval=lambda ms: max(SNAPSHOT_SECONDS, ms / 1000 * DUTY),
        )

    async def _timed_tick(self) -> int:
        started = time.monotonic()
        await self.tick()
        return int((time.monotonic() - started) * 1000)

    async def tick(self) -> None:
        today = self.clock().date()
        async with self.engine.connect() as conn:
            row = await gauges.queue_and_spend(conn, today)
        for state in ("queued", "submitted", "failed"):
            metrics.QUEUE_TASKS.labels(state=state).set(row[state])
        metrics.QUEUE_OLDEST.set(float(row["oldest"] or 0))
        metrics.BATCHES_IN_FLIGHT.set(row["in_flight"])
        metrics.BATCH_OLDEST_IN_FLIGHT.set(float(row["oldest_batch"] or 0))
        metrics.BUDGET_SPENT.set(float(row["spent"]))
        if self.budgets_by_client:
            async with self.engine.connect() as conn:
                by_client = await client_day_spend(conn, today)
            for client in self.budgets_by_client:
                metrics.CLIENT_BUDGET_SPENT.labels(client=client).set(
                    float(by_client.get(client, 0))
                )
        self.api.queued_estimate = int(row["queued"])
        async with self.engine.connect() as conn:
            backlog = await callback_backlog(conn)
            queued_of = await queued_by_client(conn)
        self.api.client_queued = {c: queued_of.get(c, 0) for c in self.api.client_max_queued}
        labelled: dict[str, int] = dict.fromkeys(self._client_labels, 0)
        for name, n in queued_of.items():
            label = self.clients.label(name)
            labelled[label] = labelled.get(label, 0) + n
        for label, n in labelled.items():
            metrics.CLIENT_QUEUE_TASKS.labels(client=label).set(n)
        self._client_labels = set(labelled)
        metrics.CALLBACKS_PENDING.set(backlog["pending"])
        metrics.CALLBACKS_FAILED.set(backlog["failed"])
