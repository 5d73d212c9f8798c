"""The synchronous lane: work someone waits on, called at once.

Tasks with ``lane: "sync"``, with a deadline a batch cannot meet, outside the
canary's batch share, or past their latency profile's fallback time are called
one by one through the provider's synchronous API, at most
BATCHD_SYNC_CONCURRENCY at a time per replica. The outcome goes through the
same classification and the same store as a batch line, at the synchronous
price (so a sync call saves nothing).

The daily budget covers this lane too: each claimed call reserves a high-side
estimate at the sync price in the ``sync_spend`` ledger (in the same
transaction, under the same lock as a batch's reservation), settled to the
real cost when the call returns. Calls that would pass the cap stay queued.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.clients import Clients
from batchd.config import Settings
from batchd.domain import SYNC_MARGIN, Outcome, budget_fit, classify_line, client_fit, line_id
from batchd.errors import ProviderError
from batchd.estimates import Calibration
from batchd.health import AUTH_STATUSES, auth_backoff
from batchd.loops import run_ticks
from batchd.prices import PriceTable, Tokens, cost, tokens_from_usage, usage_of
from batchd.provider.base import Providers, pick
from batchd.store.routing import Backoff, SuccessRows, store_failures, store_successes
from batchd.store.spend import (
    client_day_spend,
    day_spend,
    lock_budget,
    reserve_client_spend,
    settle_client_call,
)
from batchd.store.sync import (
    claim_sync,
    fall_back,
    give_back_sync_call,
    reserve_sync_spend,
    settle_sync_spend,
    stale_sync_calls,
    sync_candidates,
)

log = logs.get("batchd.sync_lane")

_TICK_SECONDS = 0.2
# With nothing to call the lane looks less often (an idle replica should cost
# almost nothing); a sync task ingested here wakes it at once (``wake``), one
# ingested by another replica waits at most this long.
_IDLE_TICK_SECONDS = 1.0
_SWEEP_SECONDS = 5.0
# A sync call outliving this is presumed lost with its replica.
_STALE_AFTER_SECONDS = 900.0
# While the budget holds calls back, look again this often (a settled call
# gives back the difference between its estimate and its cost).
_HOLD_RECHECK_SECONDS = 1.0
_HOLD_LOG_SECONDS = 60.0
_LOST = {
    "code": "sync_call_lost",
    "message": "the replica making this synchronous call stopped before storing it",
}


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """The settings the synchronous lane reads."""

    concurrency: int
    daily_budget_usd: Decimal | None
    budgets_by_client: dict[str, Decimal]
    window_seconds: float
    backoff: Backoff

    @classmethod
    def from_settings(cls, s: Settings) -> SyncConfig:
        return cls(
            s.sync_concurrency,
            s.daily_budget_usd,
            s.budgets_by_client,
            s.window_seconds,
            Backoff(s.retry_backoff_seconds, s.max_attempts),
        )


class SyncLane:
    def __init__(
        self,
        engine: AsyncEngine,
        providers: Providers,
        config: SyncConfig,
        prices: PriceTable,
        clients: Clients,
        clock: Callable[[], datetime] = _utc_now,
        calibration: Calibration | None = None,
    ) -> None:
        self.calibration = calibration or Calibration()
        self.engine = engine
        self.clients = clients
        self.providers = providers
        self.prices = prices
        self.clock = clock
        self.concurrency = config.concurrency
        self.budget = config.daily_budget_usd
        self.client_caps = config.budgets_by_client
        self.window_seconds = config.window_seconds
        self.backoff = config.backoff
        self._running: set[asyncio.Task[None]] = set()
        self._last_sweep = 0.0
        self._hold_until = 0.0
        self._hold_logged = 0.0
        self._woken = asyncio.Event()
        # By provider: one provider refusing our key holds only its calls.
        self._auth_refusals: dict[str, int] = {}
        self._auth_hold_until: dict[str, datetime] = {}

    def wake(self) -> None:
        """Look for due sync tasks now (ingest calls it after storing some)."""
        self._woken.set()

    async def run(self, stop: asyncio.Event) -> None:
        await run_ticks(
            stop,
            self.tick,
            logger=log,
            event="sync_lane.tick_failed",
            interval=lambda started: (
                _TICK_SECONDS if started or self._running else _IDLE_TICK_SECONDS
            ),
            wake=self._woken,
        )
        await self.wait_calls()

    async def wait_calls(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def tick(self) -> int:
        """Move due fallbacks, then start calls for free slots; returns calls started."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_sweep > _SWEEP_SECONDS:
            self._last_sweep = loop.time()
            await self.sweep()
        free = self.concurrency - len(self._running)
        if free <= 0 or loop.time() < self._hold_until:
            return 0
        now = self.clock()
        ready = [
            p
            for p in self.providers
            if p not in self._auth_hold_until or self._auth_hold_until[p] <= now
        ]
        if not ready:
            return 0
        claim_id = f"sync_{secrets.token_hex(8)}"
        rows = await self._claim(claim_id, free, ready)
        for row in rows:
            task = asyncio.create_task(self._call(claim_id, row))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return len(rows)

    async def sweep(self) -> None:
        """Latency fallbacks and resubmissions, and calls lost with their replica.

        A lost call may have reached the provider, so its attempt stays
        counted: it is retried like a line that never came back, or fails
        once BATCHD_MAX_ATTEMPTS is used up. Its ledger row keeps the
        reservation (what it cost is unknown)."""
        lost: dict[tuple[str, str], int] = {}
        async with self.engine.begin() as conn:
            moved = await fall_back(conn, self.window_seconds, SYNC_MARGIN.total_seconds())
            stale = await stale_sync_calls(conn, _STALE_AFTER_SECONDS)
            for claim, ids in stale.items():
                counts = await store_failures(
                    conn,
                    claim,
                    ids,
                    [False] * len(ids),
                    [_LOST] * len(ids),
                    [random.random() for _ in ids],
                    self.backoff,
                )
                for key, n in counts.items():
                    lost[key] = lost.get(key, 0) + n
        for (outcome, client), n in lost.items():
            metrics.TASKS_COMPLETED.labels(
                outcome=outcome, client=self.clients.label(client), lane="sync"
            ).inc(n)
        if moved.to_sync or moved.resubmitted or lost:
            log.info(
                "sync_lane.swept",
                fell_back=len(moved.to_sync),
                resubmitted=len(moved.resubmitted),
                lost_calls=sum(lost.values()),
            )

    async def _claim(self, claim_id: str, limit: int, providers: list[str]) -> list[dict[str, Any]]:
        """Claim due calls at ``providers``, in order, as far as the daily
        budget allows, each with its reservation in the ledger; the rest stay
        queued."""
        today = self.clock().date()
        async with self.engine.begin() as conn:
            if self.budget is not None or self.client_caps:
                await lock_budget(conn)
            candidates = await sync_candidates(conn, limit, providers)
            if not candidates:
                return []
            estimates = [
                self.prices.reservation(
                    c["model"],
                    self.calibration.reserved_input(c["model"], c["est_input_tokens"]),
                    c["est_output_tokens"],
                    sync=True,
                )
                for c in candidates
            ]
            spent = await day_spend(conn, today) if self.budget is not None else Decimal(0)
            within = list(range(len(candidates)))
            if self.client_caps:
                used = await client_day_spend(conn, today)
                within = client_fit(
                    estimates,
                    [c["client"] for c in candidates],
                    {c: cap - used.get(c, Decimal(0)) for c, cap in self.client_caps.items()},
                )
            fit = budget_fit(spent, [estimates[n] for n in within], self.budget)
            taken = [candidates[n] for n in within[:fit]]
            reserved = [estimates[n] for n in within[:fit]]
            rows = await claim_sync(conn, claim_id, [c["id"] for c in taken])
            await reserve_sync_spend(
                conn,
                claim_id,
                today,
                [c["id"] for c in taken],
                [c["model"] for c in taken],
                reserved,
            )
            shares: dict[str, Decimal] = {}
            for c, est in zip(taken, reserved, strict=True):
                if c["client"] in self.client_caps:
                    shares[c["client"]] = shares.get(c["client"], Decimal(0)) + est
            await reserve_client_spend(conn, today, claim_id, shares)
        by_id = {c["id"]: (c["client"], est) for c, est in zip(taken, reserved, strict=True)}
        for row in rows:
            row["client"], row["reserved"] = by_id[row["id"]]
        if len(taken) < len(candidates):
            waiting = [n for n in range(len(candidates)) if n not in set(within[:fit])]
            self._held(len(waiting), spent, estimates[waiting[0]])
        return rows

    def _held(self, held: int, spent: Decimal, next_estimate: Decimal) -> None:
        loop = asyncio.get_running_loop()
        self._hold_until = loop.time() + _HOLD_RECHECK_SECONDS
        if loop.time() - self._hold_logged >= _HOLD_LOG_SECONDS:
            self._hold_logged = loop.time()
            log.warning(
                "budget.hold",
                lane="sync",
                held_tasks=held,
                spent_usd=str(spent),
                next_estimate_usd=str(next_estimate),
                budget_usd=str(self.budget),
            )

    async def _call(self, claim_id: str, row: dict[str, Any]) -> None:
        tid: int = row["id"]
        # The provider sees batchd's id for this attempt, as in a batch file.
        cid = line_id(tid, row["replay_count"], row["attempts"])
        answered = True
        try:
            provider = pick(self.providers, row["provider"], "sync_call")
            status, body = await provider.call_sync(row["endpoint"], row["body"], cid)
            line: dict[str, Any] = {
                "custom_id": cid,
                "response": {"status_code": status, "body": body},
            }
        except ProviderError as exc:
            answered, body = False, None
            line = {
                "custom_id": cid,
                "response": None,
                "error": {"code": exc.code or "provider_unreachable", "message": str(exc)},
            }
        if answered and status in AUTH_STATUSES:
            await self._credentials_refused(claim_id, row, status)
            return
        if answered:
            self._auth_refusals.pop(row["provider"], None)
            self._auth_hold_until.pop(row["provider"], None)
        result = classify_line(line)
        tokens = Tokens()
        paid = Decimal(0)
        unpriced = False
        try:
            async with self.engine.begin() as conn:
                if result.outcome is Outcome.SUCCESS:
                    usage = usage_of(body)
                    tokens = tokens_from_usage(usage)
                    price = self.prices.lookup(row["model"])
                    if not price.known:
                        self.prices.warn_unpriced(row["model"], "sync")
                    # Exact, as a batch's cost: rounded only where it is shown.
                    paid = cost(tokens, price.sync)
                    stored = await store_successes(
                        conn,
                        claim_id,
                        SuccessRows(
                            [tid],
                            [200],
                            [_dumps(body)],
                            [_dumps(usage) if usage else None],
                            [paid],
                            [paid],
                            [not price.known],
                        ),
                    )
                    unpriced = bool(stored) and not price.known
                    settled = [("succeeded", client) for client in stored.values()]
                else:
                    counts = await store_failures(
                        conn,
                        claim_id,
                        [tid],
                        [result.outcome is Outcome.FINAL],
                        [result.error or {}],
                        [random.random()],
                        self.backoff,
                    )
                    settled = list(counts)
                # An error the provider answered is not billed; a call that got
                # no answer may have been, so it keeps its reservation.
                if answered:
                    await settle_sync_spend(conn, claim_id, tid, paid)
                    if row["client"] in self.client_caps:
                        await settle_client_call(
                            conn, claim_id, row["client"], row["reserved"], paid
                        )
        except Exception:
            # The call happened but its outcome is not stored: the stale sweep
            # re-queues the task; log loudly, as it may be paid twice.
            log.exception("sync_lane.store_failed", task_id=tid)
            return
        if unpriced:
            metrics.UNPRICED_RESULTS.labels(lane="sync").inc()
        self._record_metrics(row, result.outcome, tokens, paid, settled)
        log.debug(
            "sync_lane.called",
            task_id=tid,
            status=result.status_code,
            outcome=settled[0][0] if settled else None,
        )

    async def _credentials_refused(self, claim_id: str, row: dict[str, Any], status: int) -> None:
        """A 401/403 is our configuration, not the task's fault (batchd.health
        logs it once): the task goes back to the queue with its attempt given
        back, the call costs nothing, and the lane pauses, doubling."""
        provider = row["provider"]
        refusals = self._auth_refusals[provider] = self._auth_refusals.get(provider, 0) + 1
        delay = auth_backoff(refusals)
        self._auth_hold_until[provider] = self.clock() + timedelta(seconds=delay)
        error = {
            "code": "provider_credentials_rejected",
            "status": status,
            "message": f"the provider refused batchd's credentials (HTTP {status}); "
            "the task waits until the key is fixed",
            "operation": "sync_call",
        }
        tid: int = row["id"]
        async with self.engine.begin() as conn:
            await give_back_sync_call(conn, claim_id, tid, error)
            await settle_sync_spend(conn, claim_id, tid, Decimal(0))
            if row["client"] in self.client_caps:
                await settle_client_call(conn, claim_id, row["client"], row["reserved"], Decimal(0))

    def _record_metrics(
        self,
        row: dict[str, Any],
        outcome: Outcome,
        tokens: Tokens,
        paid: Decimal,
        settled: list[tuple[str, str]],
    ) -> None:
        model = self.prices.metric_label(row["model"])  # bounded by the prices file
        provider = row["provider"]
        if outcome is Outcome.SUCCESS:
            # Paid whether or not the result was kept (a fallback may have
            # moved the task meanwhile): spend and tokens count every answer.
            metrics.SPEND.add(paid, provider=provider, model=model, lane="sync")
            metrics.SAVINGS.add(Decimal(0), provider=provider, model=model, lane="sync")
            for kind, n in (
                ("input", tokens.input),
                ("cached_input", tokens.cached),
                ("cache_write_input", tokens.cache_write),
                ("output", tokens.output),
            ):
                metrics.TOKENS.labels(provider=provider, model=model, kind=kind, lane="sync").inc(n)
        for name, client in settled:  # empty: a fallback moved the task meanwhile
            metrics.TASKS_COMPLETED.labels(
                outcome=name, client=self.clients.label(client), lane="sync"
            ).inc()
            if name == "succeeded":
                metrics.CLIENT_SPEND.add(paid, client=self.clients.label(client), lane="sync")
                metrics.TASK_LATENCY.labels(lane="sync").observe(
                    max(0.0, time.time() - row["created_at"].timestamp())
                )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()
