"""Windows → batches.

Each tick: pick up batches a crashed or failed submission left behind, then
flush every window that is due. A flush is two steps with a commit between:

1. one transaction claims the tasks (SKIP LOCKED), counts their attempt,
   reserves the budget and inserts the batch row in ``building``;
2. outside it, the input file is streamed from the database to the spool,
   uploaded, and the provider batch created with our id in its metadata.

A crash between or inside step 2 leaves a batch in building/uploading whose
lease lapses; the next tick of any replica finds it, looks for it at the
provider (our id is in the metadata) and adopts it, or sends it again. So a
set of tasks is never paid for twice and never forgotten.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.archive import Archive
from batchd.backoff import exponential
from batchd.config import Settings
from batchd.domain import FlushReason, file_byte_budget, flush_reason, input_line, line_id
from batchd.errors import BatchdError, ProviderError
from batchd.estimates import Calibration
from batchd.faults import crash_point
from batchd.health import AUTH_STATUSES, auth_backoff
from batchd.loops import run_ticks
from batchd.prices import PriceTable
from batchd.provider.base import Provider, RemoteBatch
from batchd.store import repo
from batchd.store.repo import NOW

log = logs.get("batchd.scheduler")

Clock = Callable[[], datetime]
# How far back to page the provider's batch list when looking for one of ours.
_ADOPT_LOOKBACK = timedelta(hours=2)
_SEND_CONCURRENCY = 4
_MAX_FLUSHES_PER_TICK = 50
# Provider statuses that mean a create call never produced a batch.
_UNRECOVERABLE_CREATE = frozenset({400, 404, 409, 422})


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_batch_id() -> str:
    return f"bd_{secrets.token_hex(12)}"


class BudgetHold(BatchdError):
    """The daily budget would be passed; the window waits."""


@dataclass(frozen=True, slots=True)
class Pending:
    batch_id: str
    endpoint: str
    model: str
    spend_day: date
    created_at: datetime
    submit_attempts: int


class Scheduler:
    def __init__(
        self, engine: AsyncEngine, provider: Provider, settings: Settings, prices: PriceTable,
        archive: Archive, owner: str, clock: Clock = utc_now,
        calibration: Calibration | None = None,
    ) -> None:
        self.engine = engine
        self.provider = provider
        self.settings = settings
        self.prices = prices
        self.archive = archive
        self.owner = owner
        self.clock = clock
        self._held: dict[tuple[str, str], datetime] = {}
        # While the provider refuses our key (401/403) nothing is flushed:
        # every send would fail the same way. Backs off, doubling.
        self._auth_refusals = 0
        self._auth_hold_until: datetime | None = None
        self.calibration = calibration or Calibration()
        self._sends: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(_SEND_CONCURRENCY)

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.settings.scheduler_interval_seconds
        await run_ticks(stop, self.tick, logger=log, event="scheduler.tick_failed",
                        interval=lambda _started: interval)
        await self.wait_sends()

    async def wait_sends(self) -> None:
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    async def tick(self, *, drain: bool = False) -> int:
        """One pass; returns how many batches it started sending."""
        started = 0
        async with self.engine.begin() as conn:
            leftovers = await repo.claim_unsent_batches(
                conn, self.owner, self.settings.lease_seconds)
        for row in leftovers:
            self._spawn(self._pending(row))
            started += 1
        for _ in range(_MAX_FLUSHES_PER_TICK):
            pending = await self._flush_one(drain)
            if pending is None:
                break
            self._spawn(pending)
            started += 1
        return started

    # ------------------------------------------------------------- flushing

    async def _flush_one(self, drain: bool) -> Pending | None:
        s = self.settings
        if self._auth_hold_until is not None and self._auth_hold_until > self.clock():
            return None
        async with self.engine.connect() as conn:
            windows = await repo.queued_windows(conn, s.max_batch_items)
            held_models = await repo.token_held_models(conn) if windows else set()
        for w in windows:
            age = (w.now - w.oldest).total_seconds()
            reason = FlushReason.DRAIN if drain else flush_reason(
                w.count, age, s.window_seconds, s.max_batch_items,
                w.input_bytes, file_byte_budget(s.max_file_bytes))
            if reason is None or w.model in held_models:
                continue
            held_until = self._held.get((w.endpoint, w.model))
            if held_until is not None and held_until > self.clock():
                continue
            pending = await self._claim(w.endpoint, w.model, reason)
            if pending is not None:
                return pending
        return None

    async def _claim(self, endpoint: str, model: str, reason: FlushReason) -> Pending | None:
        s = self.settings
        batch_id = new_batch_id()
        today = self.clock().date()
        max_bytes = file_byte_budget(s.max_file_bytes)
        pin, pout = self.prices.pico_rates(model, sync=False)
        factor = self.calibration.factor(model)
        try:
            async with self.engine.begin() as conn:
                left: int | None = None
                client_left: dict[str, int] | None = None
                if s.any_budget:
                    await repo.lock_budget(conn)
                if s.daily_budget_usd is not None:
                    spent = await repo.day_spend(conn, today)
                    left = int((s.daily_budget_usd - spent).scaleb(12))
                caps = s.budgets_by_client
                if caps:
                    by_client = await repo.client_day_spend(conn, today)
                    client_left = {c: int((cap - by_client.get(c, Decimal(0))).scaleb(12))
                                   for c, cap in caps.items()}
                claim = await repo.claim_window(
                    conn, batch_id=batch_id, endpoint=endpoint, model=model,
                    limit=s.max_batch_items, max_bytes=max_bytes,
                    reserve=repo.Reserve(factor, pin, pout, left, client_left))
                if claim.count == 0:
                    if claim.budget_cut:
                        raise BudgetHold("the oldest task's reservation passes what is left "
                                         "today of the daily budget or its client's own")
                    return None
                if claim.budget_cut:
                    # The part of the window that fits goes now (the flush
                    # keeps its reason: the window was due); the rest waits.
                    log.info("budget.partial", endpoint=endpoint, model=model,
                             sent=claim.count, held=claim.picked - claim.count,
                             left_usd=str(Decimal(left or 0).scaleb(-12)))
                elif claim.count < claim.picked:
                    reason = FlushReason.LIMIT
                reserved = Decimal(claim.reserved_pico).scaleb(-12)
                if caps:
                    await repo.reserve_client_spend(conn, today, batch_id, {
                        c: Decimal(v).scaleb(-12) for c, v in (claim.by_client or {}).items()
                        if c is not None})
                await repo.insert_batch(
                    conn, batch_id=batch_id, endpoint=endpoint, model=model, reason=reason,
                    claim=claim, spend_day=today, reserved_usd=reserved, owner=self.owner,
                    lease_seconds=s.lease_seconds)
        except BudgetHold as hold:
            # Look again in a minute: the day may turn or the cap be raised.
            self._held[(endpoint, model)] = self.clock() + timedelta(seconds=60)
            log.warning("budget.hold", endpoint=endpoint, model=model, detail=str(hold),
                        budget_usd=str(s.daily_budget_usd))
            return None
        metrics.FLUSHES.labels(reason=reason.value).inc()
        metrics.BATCH_TASKS.observe(claim.count)
        metrics.BATCH_INPUT_BYTES.observe(claim.input_bytes)
        log.info("batch.flushed", batch_id=batch_id, endpoint=endpoint, model=model,
                 reason=reason.value, tasks=claim.count, input_bytes=claim.input_bytes,
                 reserved_usd=str(reserved))
        return Pending(batch_id, endpoint, model, today, self.clock(), 0)


    # -------------------------------------------------------------- sending

    def _spawn(self, pending: Pending) -> None:
        task = asyncio.create_task(self._send_guarded(pending))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send_guarded(self, pending: Pending) -> None:
        async with self._slots:
            try:
                await self.send(pending)
            except Exception:
                log.exception("batch.send_crashed", batch_id=pending.batch_id)
                await self._retry_later(pending, 30.0)

    async def send(self, p: Pending) -> None:
        """Upload and create the provider batch for a claimed batch row."""
        async with self.engine.begin() as conn:
            await repo.set_batch(conn, p.batch_id, state="uploading",
                                 submit_attempts=p.submit_attempts + 1)
        crash_point("after_claim")
        try:
            if p.submit_attempts > 0:
                found = await self._find_remote(p)
                if found is not None:
                    if await self._record_submitted(p, found, adopted=True):
                        await self._archive_adopted(p, found)
                    return
            # Whoever writes the file to upload decides its ids: a batch an
            # older version claimed (own_line_ids false) and this one sends
            # carries batchd's line ids, and the router must know.
            async with self.engine.begin() as conn:
                await repo.set_batch(conn, p.batch_id, own_line_ids=True)
            path = await self._write_input(p)
            remote_file = await self.provider.upload_file(path, f"batchd-{p.batch_id}.jsonl")
            async with self.engine.begin() as conn:
                await repo.set_batch(conn, p.batch_id, input_file_id=remote_file.id)
                # The create below must happen under a claim that outlives it.
                ours = await repo.renew_claim(conn, p.batch_id, self.owner,
                                              self.settings.lease_seconds)
            if not ours:
                # The spool may be shared: the file is the new owner's now.
                log.warning("batch.claim_lost", batch_id=p.batch_id, step="create")
                return
            crash_point("after_upload")
            remote = await self._create(p, remote_file.id)
            crash_point("after_create")
        except ProviderError as exc:
            await self._send_failed(p, exc)
            return
        self._auth_refusals, self._auth_hold_until = 0, None
        if await self._record_submitted(p, remote, adopted=False):
            await self.archive.keep(path, p.spend_day, p.batch_id, "input",
                                    {"provider_file_id": remote_file.id,
                                     "provider_batch_id": remote.id})
            await self._archive_ids(p)
        path.unlink(missing_ok=True)

    async def _archive_ids(self, p: Pending) -> None:
        """The input's line ids beside the callers' keys, for audits."""
        ids = self.archive.spool_path(p.batch_id, "ids")
        if ids.exists():
            await self.archive.keep(ids, p.spend_day, p.batch_id, "ids",
                                    {"columns": ["line_id", "client", "custom_id"]})
            ids.unlink(missing_ok=True)

    async def _archive_adopted(self, p: Pending, remote: RemoteBatch) -> None:
        """An adopted batch's input is the file an earlier attempt wrote and
        uploaded; if the spool lost it, the same lines are written again from
        its tasks (still assigned to it, in file order)."""
        path = self.archive.spool_path(p.batch_id, "input")
        rebuilt = not path.exists()
        if rebuilt:
            async with self.engine.connect() as conn:
                own_ids = await repo.batch_owns_line_ids(conn, p.batch_id)
            path = await self._write_input(p, own_ids=own_ids)
        await self.archive.keep(path, p.spend_day, p.batch_id, "input",
                                {"provider_file_id": remote.input_file_id,
                                 "provider_batch_id": remote.id, "adopted": True,
                                 "rebuilt": rebuilt})
        await self._archive_ids(p)
        path.unlink(missing_ok=True)

    async def _create(self, p: Pending, input_file_id: str) -> RemoteBatch:
        # Abandon a create that has not answered within half the claim: were it
        # still landing when the claim lapsed, another replica would find no
        # batch and create a second one. An abandoned create is looked up by
        # our id before anyone creates again.
        try:
            async with asyncio.timeout(self.settings.lease_seconds / 2):
                return await self.provider.create_batch(
                    input_file_id, p.endpoint, self.settings.completion_window,
                    {"batchd_batch_id": p.batch_id, "batchd_model": p.model[:512]})
        except TimeoutError:
            raise ProviderError(
                "create_batch: no answer within half the claim; the batch is looked up at "
                "the provider before it is created again", operation="create_batch") from None

    async def _write_input(self, p: Pending, *, own_ids: bool = True) -> Path:
        """The input file, each line under batchd's id for this attempt of its
        task (domain.line_id), and beside it (kind ``ids``) one JSON line per
        task, [line id, client, custom_id], that the archive keeps so an audit
        joins a provider line to the caller's task without the database.
        ``own_ids`` false rebuilds, for the archive, the file of a batch an
        older version uploaded: its lines carry the callers' custom_ids."""
        path = self.archive.spool_path(p.batch_id, "input")
        ids_path = self.archive.spool_path(p.batch_id, "ids")
        tmp = path.with_suffix(".tmp")
        ids_tmp = ids_path.with_suffix(".tmp")
        # Line numbers were fixed at claim time; a task that left the batch
        # since (a latency fallback) closes up the file, so the tasks after
        # it take their new numbers before the file can be named in errors.
        moved_ids: list[int] = []
        moved_lines: list[int] = []
        line_no = 0
        async with self.engine.connect() as conn, aclosing(
                repo.stream_batch_lines(conn, p.batch_id)) as pages:
            with tmp.open("wb") as out, ids_tmp.open("wb") as ids_out:
                async for rows in pages:
                    lids = [line_id(tid, replays, attempt) if own_ids else cid
                            for tid, _, _, _, replays, attempt, _, cid in rows]
                    out.write(b"".join([input_line(lid, r[1], orjson.loads(r[2]))
                                        for lid, r in zip(lids, rows, strict=True)]))
                    ids_out.write(b"".join([orjson.dumps([lid, r[6], r[7]]) + b"\n"
                                            for lid, r in zip(lids, rows, strict=True)]))
                    for task_id, _, _, stored_line, _, _, _, _ in rows:
                        line_no += 1
                        if stored_line != line_no:
                            moved_ids.append(task_id)
                            moved_lines.append(line_no)
        if moved_ids:
            async with self.engine.begin() as conn:
                await repo.renumber_batch_lines(conn, moved_ids, moved_lines)
        ids_tmp.replace(ids_path)
        tmp.replace(path)
        return path

    async def _find_remote(self, p: Pending) -> RemoteBatch | None:
        """A batch of ours the provider may have created before we heard back."""
        horizon = int((p.created_at - _ADOPT_LOOKBACK).timestamp())
        matches: list[RemoteBatch] = []
        async for remote in self.provider.list_batches():
            if remote.created_at < horizon:
                break
            if (remote.metadata or {}).get("batchd_batch_id") == p.batch_id:
                matches.append(remote)
        if not matches:
            return None
        # Duplicates can only come from retried creates: keep the oldest one
        # still standing, cancel the rest before they run and cost money twice.
        standing = [b for b in matches if b.status not in ("cancelling", "cancelled")]
        keep, *extra = sorted(standing or matches, key=lambda b: (b.created_at, b.id))
        for dup in extra:
            log.warning("batch.duplicate_cancelled", batch_id=p.batch_id, provider_batch_id=dup.id)
            await self.provider.cancel_batch(dup.id)
        return keep

    async def _record_submitted(self, p: Pending, remote: RemoteBatch, *, adopted: bool) -> bool:
        """Record the provider batch, unless another replica recorded one first
        (our claim lapsed mid-send); a different one of ours is then cancelled."""
        async with self.engine.begin() as conn:
            earlier = await repo.record_submitted(
                conn, p.batch_id, provider_batch_id=remote.id, provider_status=remote.status,
                input_file_id=remote.input_file_id)
        if earlier is None:
            log.info("batch.submitted", batch_id=p.batch_id, provider_batch_id=remote.id,
                     adopted=adopted, endpoint=p.endpoint, model=p.model)
            return True
        if earlier != remote.id:
            log.warning("batch.duplicate_cancelled", batch_id=p.batch_id,
                        provider_batch_id=remote.id, kept=earlier)
            try:
                await self.provider.cancel_batch(remote.id)
            except ProviderError as exc:
                log.error("batch.duplicate_cancel_failed", batch_id=p.batch_id,
                          provider_batch_id=remote.id, status=exc.status, code=exc.code)
        return False

    async def _send_failed(self, p: Pending, exc: ProviderError) -> None:
        if exc.status in AUTH_STATUSES:
            await self._credentials_refused(p, exc)
            return
        unrecoverable = (
            not exc.retryable and exc.status in _UNRECOVERABLE_CREATE
            and exc.code != "insufficient_quota"
        )
        if unrecoverable:
            # The provider refused: no batch exists, so the tasks go back to
            # the queue and the attempt that never happened is taken back.
            error = {"code": exc.code or "submit_rejected", "message": str(exc),
                     "status": exc.status, "operation": exc.operation}
            async with self.engine.begin() as conn:
                requeued = await repo.release_unsent_tasks(conn, p.batch_id, error)
                await repo.settle_batch(conn, p.batch_id, provider_status="not_submitted",
                                        errors=[error], finished_at=NOW,
                                        cost_usd=Decimal(0), sync_cost_usd=Decimal(0))
                await repo.settle_client_spend(conn, p.batch_id, {})
            log.error("batch.rejected", batch_id=p.batch_id, operation=exc.operation,
                      status=exc.status, code=exc.code, requeued=requeued)
            return
        # The provider's retry-after wins; else five scheduler ticks, doubling.
        first = 5.0 * self.settings.scheduler_interval_seconds
        delay = exc.retry_after or exponential(p.submit_attempts, first, 300.0)
        delay *= 1 + random.random() * 0.2
        log.warning("batch.send_failed", batch_id=p.batch_id, operation=exc.operation,
                    status=exc.status, code=exc.code, retry_in=round(delay, 1),
                    submit_attempts=p.submit_attempts + 1)
        await self._retry_later(p, delay)

    async def _credentials_refused(self, p: Pending, exc: ProviderError) -> None:
        """The provider refused our key: a configuration error (batchd.health
        logs it once, with what to fix). Nothing reached the provider, so the
        tasks go back to the queue with their attempt given back and the
        batch is closed unsent; flushing pauses, doubling, until a send gets
        through."""
        self._auth_refusals += 1
        delay = auth_backoff(self._auth_refusals)
        self._auth_hold_until = self.clock() + timedelta(seconds=delay)
        error = {"code": exc.code or "provider_credentials_rejected",
                 "message": "the provider refused batchd's credentials (HTTP "
                            f"{exc.status}); the task waits until the key is fixed",
                 "status": exc.status, "operation": exc.operation}
        async with self.engine.begin() as conn:
            requeued = await repo.release_unsent_tasks(conn, p.batch_id, error)
            await repo.settle_batch(conn, p.batch_id, provider_status="not_submitted",
                                    errors=[error], finished_at=NOW,
                                    cost_usd=Decimal(0), sync_cost_usd=Decimal(0))
            await repo.settle_client_spend(conn, p.batch_id, {})
        log.warning("batch.credentials_rejected", batch_id=p.batch_id, status=exc.status,
                    operation=exc.operation, requeued=requeued, retry_in=delay)

    async def _retry_later(self, p: Pending, delay: float) -> None:
        async with self.engine.begin() as conn:
            await repo.release_batch(conn, p.batch_id, self.owner, delay)

    @staticmethod
    def _pending(row: dict[str, Any]) -> Pending:
        return Pending(row["id"], row["endpoint"], row["model"], row["spend_day"],
                       row["created_at"], row["submit_attempts"])
