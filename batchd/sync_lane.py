"""The synchronous lane: work someone waits on, called at once.

Tasks with ``lane: "sync"``, with a deadline a batch cannot meet, outside the
canary's batch share, or past their latency profile's fallback time are called
one by one through the provider's synchronous API, at most
BATCHD_SYNC_CONCURRENCY at a time per replica. The outcome goes through the
same classification and the same store as a batch line, at the synchronous
price (so a sync call saves nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.clients import Clients
from batchd.config import Settings
from batchd.domain import Outcome, classify_line
from batchd.errors import ProviderError
from batchd.prices import PriceTable, cost, tokens_from_usage
from batchd.provider.base import Provider
from batchd.store import repo
from batchd.store.repo import Backoff

log = logs.get("batchd.sync_lane")

_TICK_SECONDS = 0.2
# A sync call outliving this is presumed lost with its replica.
_STALE_AFTER_SECONDS = 900.0


class SyncLane:
    def __init__(self, engine: AsyncEngine, provider: Provider, settings: Settings,
                 prices: PriceTable, clients: Clients) -> None:
        self.engine = engine
        self.clients = clients
        self.provider = provider
        self.prices = prices
        self.concurrency = settings.sync_concurrency
        self.backoff = Backoff(settings.retry_backoff_seconds, settings.max_attempts)
        self._running: set[asyncio.Task[None]] = set()
        self._last_sweep = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("sync_lane.tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _TICK_SECONDS)
        await self.wait_calls()

    async def wait_calls(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def tick(self) -> int:
        """Move due fallbacks, then start calls for free slots; returns calls started."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_sweep > 5.0:
            self._last_sweep = loop.time()
            async with self.engine.begin() as conn:
                moved = await repo.fall_back_to_sync(conn)
                stale = await repo.requeue_stale_sync(conn, _STALE_AFTER_SECONDS)
            if moved or stale:
                log.info("sync_lane.swept", fell_back=len(moved), stale_requeued=stale)
        free = self.concurrency - len(self._running)
        if free <= 0:
            return 0
        claim_id = f"sync_{secrets.token_hex(8)}"
        async with self.engine.begin() as conn:
            rows = await repo.claim_sync(conn, claim_id, free)
        for row in rows:
            task = asyncio.create_task(self._call(claim_id, row))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return len(rows)

    async def _call(self, claim_id: str, row: dict[str, Any]) -> None:
        cid: str = row["custom_id"]
        try:
            status, body = await self.provider.call_sync(row["endpoint"], row["body"], cid)
            line: dict[str, Any] = {"custom_id": cid,
                                    "response": {"status_code": status, "body": body}}
        except ProviderError as exc:
            body = None
            line = {"custom_id": cid, "response": None,
                    "error": {"code": exc.code or "provider_unreachable", "message": str(exc)}}
        result = classify_line(line)
        try:
            async with self.engine.begin() as conn:
                if result.outcome is Outcome.SUCCESS:
                    usage = body.get("usage") if isinstance(body, dict) else None
                    price = self.prices.lookup(row["model"]).sync
                    paid = cost(tokens_from_usage(usage), price)
                    stored = await repo.store_successes(conn, claim_id, repo.SuccessRows(
                        [cid], [200], [_dumps(body)], [_dumps(usage) if usage else None],
                        [paid], [paid]))
                    settled = [("succeeded", client) for client in stored.values()]
                else:
                    counts = await repo.store_failures(
                        conn, claim_id, [cid], [result.outcome is Outcome.FINAL],
                        [result.error or {}], [random.random()], self.backoff)
                    settled = list(counts)
        except Exception:
            # The call happened but its outcome is not stored: the stale sweep
            # re-queues the task; log loudly, as it may be paid twice.
            log.exception("sync_lane.store_failed", custom_id=cid)
            return
        for outcome, client in settled:  # empty: a fallback moved the task meanwhile
            metrics.TASKS_COMPLETED.labels(outcome=outcome, client=self.clients.label(client)
                                           ).inc()
        log.debug("sync_lane.called", custom_id=cid, status=result.status_code,
                  outcome=settled[0][0] if settled else None)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
