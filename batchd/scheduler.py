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
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
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
from batchd.config import Settings, parse_provider_counts
from batchd.domain import FlushReason, file_byte_budget, flush_reason, input_line, line_id
from batchd.errors import BatchdError, ProviderError
from batchd.estimates import Calibration
from batchd.faults import crash_point
from batchd.health import AUTH_STATUSES, auth_backoff
from batchd.loops import run_ticks
from batchd.prices import PriceTable
from batchd.provider.base import Provider, Providers, RemoteBatch, pick
from batchd.store.batches import (
    NOW,
    batch_owns_line_ids,
    claim_unsent_batches,
    creation_owner,
    record_submitted,
    recorded_provider_batches,
    release_batch,
    renew_claim,
    session_unlock,
    set_batch,
    try_session_lock,
)
from batchd.store.routing import release_unsent_tasks, settle_batch
from batchd.store.spend import (
    client_day_spend,
    day_spend,
    lock_budget,
    reserve_client_spend,
    settle_client_spend,
)
from batchd.store.windows import (
    InFlight,
    Reserve,
    claim_window,
    in_flight,
    insert_batch,
    queued_windows,
    renumber_batch_lines,
    stream_batch_lines,
    token_held_models,
)

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


class QueueFull(BatchdError):
    """The window would pass the provider's queued-token cap; ``fits`` tasks would not."""

    def __init__(self, fits: int) -> None:
        super().__init__(f"{fits} tasks fit")
        self.fits = fits


@dataclass(frozen=True, slots=True)
class Pending:
    batch_id: str
    provider: str
    endpoint: str
    model: str
    spend_day: date
    created_at: datetime
    submit_attempts: int
    item_count: int


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """The settings the scheduler reads."""

    window_seconds: float
    max_batch_items: int
    max_file_bytes: int
    completion_window: str
    lease_seconds: float
    scheduler_interval_seconds: float
    daily_budget_usd: Decimal | None
    budgets_by_client: dict[str, Decimal]
    any_budget: bool
    queued_requests: str | None
    queued_tokens: str | None

    @classmethod
    def from_settings(cls, s: Settings) -> SchedulerConfig:
        return cls(
            s.window_seconds,
            s.max_batch_items,
            s.max_file_bytes,
            s.completion_window,
            s.lease_seconds,
            s.scheduler_interval_seconds,
            s.daily_budget_usd,
            s.budgets_by_client,
            s.any_budget,
            s.queued_requests,
            s.queued_tokens,
        )


class Scheduler:
    def __init__(
        self,
        engine: AsyncEngine,
        providers: Providers,
        config: SchedulerConfig,
        prices: PriceTable,
        archive: Archive,
        owner: str,
        clock: Clock = utc_now,
        calibration: Calibration | None = None,
    ) -> None:
        self.engine = engine
        self.providers = providers
        # Queued-work caps per provider (per model at it): settings over the
        # provider's documented default.
        self._queued_requests = parse_provider_counts(config.queued_requests)
        self._queued_tokens = parse_provider_counts(config.queued_tokens)
        self.config = config
        self.prices = prices
        self.archive = archive
        self.owner = owner
        self.clock = clock
        self._held: dict[tuple[str, str, str], datetime] = {}
        # While a provider refuses our key (401/403) nothing is flushed to it:
        # every send would fail the same way. Backs off, doubling; by provider,
        # so one provider's bad key holds none of the others' windows.
        self._auth_refusals: dict[str, int] = {}
        self._auth_hold_until: dict[str, datetime] = {}
        self.calibration = calibration or Calibration()
        self._sends: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(_SEND_CONCURRENCY)

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.config.scheduler_interval_seconds
        await run_ticks(
            stop,
            self.tick,
            logger=log,
            event="scheduler.tick_failed",
            interval=lambda _started: interval,
        )
        await self.wait_sends()

    async def wait_sends(self) -> None:
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    async def tick(self, *, drain: bool = False) -> int:
        """One pass; returns how many batches it started sending."""
        started = 0
        async with self.engine.begin() as conn:
            leftovers = await claim_unsent_batches(conn, self.owner, self.config.lease_seconds)
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

    def _caps(self, provider: str) -> tuple[int, int, int | None, int | None]:
        """A provider's (lines, bytes, queued requests, queued tokens) caps."""
        s = self.config
        limits = self.providers[provider].limits
        return (
            min(s.max_batch_items, limits.max_lines),
            min(file_byte_budget(s.max_file_bytes), file_byte_budget(limits.max_bytes)),
            self._queued_requests.get(provider, limits.queued_requests),
            self._queued_tokens.get(provider, limits.queued_tokens),
        )

    async def _flush_one(self, drain: bool) -> Pending | None:
        s = self.config
        now = self.clock()
        held_providers = {p for p, until in self._auth_hold_until.items() if until > now}
        if held_providers >= set(self.providers):
            return None
        async with self.engine.connect() as conn:
            windows = await queued_windows(conn, s.max_batch_items)
            held_models = await token_held_models(conn) if windows else set()
            inflight = await in_flight(conn) if windows else {}
        for w in windows:
            if w.provider not in self.providers or w.provider in held_providers:
                continue  # unconfigured since routed, or refusing our key: it waits
            max_items, max_bytes, max_requests, max_tokens = self._caps(w.provider)
            age = (w.now - w.oldest).total_seconds()
            reason = (
                FlushReason.DRAIN
                if drain
                else flush_reason(
                    w.count, age, s.window_seconds, max_items, w.input_bytes, max_bytes
                )
            )
            if reason is None or (w.provider, w.model) in held_models:
                continue
            held_until = self._held.get((w.provider, w.endpoint, w.model))
            if held_until is not None and held_until > self.clock():
                continue
            busy = inflight.get((w.provider, w.model), InFlight())
            room = (
                max_items if max_requests is None else min(max_items, max_requests - busy.requests)
            )
            if room < 1 or (max_tokens is not None and busy.input_tokens >= max_tokens):
                # The provider's queue for this model is full: wait for a batch
                # to finish rather than be refused for it.
                log.debug(
                    "window.queue_full",
                    provider=w.provider,
                    model=w.model,
                    queued_requests=busy.requests,
                    queued_tokens=busy.input_tokens,
                )
                continue
            token_room = None if max_tokens is None else max_tokens - busy.input_tokens
            pending = await self._claim(
                w.provider, w.endpoint, w.model, reason, room, max_bytes, token_room
            )
            if pending is not None:
                return pending
        return None

    async def _claim(
        self,
        provider: str,
        endpoint: str,
        model: str,
        reason: FlushReason,
        max_items: int,
        max_bytes: int,
        token_room: int | None,
    ) -> Pending | None:
        s = self.config
        batch_id = new_batch_id()
        today = self.clock().date()
        pin, pout = self.prices.pico_rates(model, sync=False)
        factor = self.calibration.factor(model)
        try:
            async with self.engine.begin() as conn:
                left: int | None = None
                client_left: dict[str, int] | None = None
                if s.any_budget:
                    await lock_budget(conn)
                if s.daily_budget_usd is not None:
                    spent = await day_spend(conn, today)
                    left = int((s.daily_budget_usd - spent).scaleb(12))
                caps = s.budgets_by_client
                if caps:
                    by_client = await client_day_spend(conn, today)
                    client_left = {
                        c: int((cap - by_client.get(c, Decimal(0))).scaleb(12))
                        for c, cap in caps.items()
                    }
                claim = await claim_window(
                    conn,
                    batch_id=batch_id,
                    provider=provider,
                    endpoint=endpoint,
                    model=model,
                    limit=max_items,
                    max_bytes=max_bytes,
                    reserve=Reserve(factor, pin, pout, left, client_left),
                )
                if claim.count == 0:
                    if claim.budget_cut:
                        raise BudgetHold(
                            "the oldest task's reservation passes what is left "
                            "today of the daily budget or its client's own"
                        )
                    return None
                if (
                    token_room is not None
                    and claim.est_input_tokens > token_room
                    and claim.count > 1
                ):
                    # Past the provider's queued-token cap: take nothing now
                    # (rolled back) and come back with a smaller window.
                    raise QueueFull(max(1, claim.count * token_room // claim.est_input_tokens))
                if claim.budget_cut:
                    # The part of the window that fits goes now (the flush
                    # keeps its reason: the window was due); the rest waits.
                    log.info(
                        "budget.partial",
                        endpoint=endpoint,
                        model=model,
                        sent=claim.count,
                        held=claim.picked - claim.count,
                        left_usd=str(Decimal(left or 0).scaleb(-12)),
                    )
                elif claim.count < claim.picked:
                    reason = FlushReason.LIMIT
                reserved = Decimal(claim.reserved_pico).scaleb(-12)
                if caps:
                    await reserve_client_spend(
                        conn,
                        today,
                        batch_id,
                        {
                            c: Decimal(v).scaleb(-12)
                            for c, v in (claim.by_client or {}).items()
                            if c is not None
                        },
                    )
                await insert_batch(
                    conn,
                    batch_id=batch_id,
                    provider=provider,
                    endpoint=endpoint,
                    model=model,
                    reason=reason,
                    claim=claim,
                    spend_day=today,
                    reserved_usd=reserved,
                    owner=self.owner,
                    lease_seconds=s.lease_seconds,
                )
        except QueueFull as full:
            if full.fits >= max_items:
                return None
            return await self._claim(
                provider, endpoint, model, FlushReason.LIMIT, full.fits, max_bytes, token_room
            )
        except BudgetHold as hold:
            # Look again in a minute: the day may turn or the cap be raised.
            self._held[(provider, endpoint, model)] = self.clock() + timedelta(seconds=60)
            log.warning(
                "budget.hold",
                provider=provider,
                endpoint=endpoint,
                model=model,
                detail=str(hold),
                budget_usd=str(s.daily_budget_usd),
            )
            return None
        metrics.FLUSHES.labels(reason=reason.value).inc()
        metrics.BATCH_TASKS.observe(claim.count)
        metrics.BATCH_INPUT_BYTES.observe(claim.input_bytes)
        log.info(
            "batch.flushed",
            batch_id=batch_id,
            provider=provider,
            endpoint=endpoint,
            model=model,
            reason=reason.value,
            tasks=claim.count,
            input_bytes=claim.input_bytes,
            reserved_usd=str(reserved),
        )
        return Pending(batch_id, provider, endpoint, model, today, self.clock(), 0, claim.count)

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

    def _provider(self, p: Pending) -> Provider:
        return pick(self.providers, p.provider, "create_batch")

    @asynccontextmanager
    async def _turn_to_create(self, p: Pending) -> AsyncIterator[bool]:
        """Whether this send may go on. At a provider whose batches carry no
        metadata (Anthropic), creates are one at a time across replicas (a
        session advisory lock, gone with the connection if we die), from the
        lookup through the record: so a batch created but not recorded was
        created by the one send whose recorded create start came last before
        it, and its row, not another one retrying, adopts it."""
        if self._provider(p).limits.batch_metadata:
            yield True
            return
        key = f"batchd.create.{p.provider}"
        async with self.engine.connect() as conn:
            if not await try_session_lock(conn, key):
                yield False
                return
            try:
                yield True
            finally:
                await session_unlock(conn, key)

    async def send(self, p: Pending) -> None:
        """Upload and create the provider batch for a claimed batch row."""
        async with self._turn_to_create(p) as turn:
            if not turn:
                # Another send is creating at this provider: look again soon.
                await self._retry_later(p, 0.5 + random.random())
                return
            await self._send(p)

    async def _send(self, p: Pending) -> None:
        async with self.engine.begin() as conn:
            await set_batch(
                conn, p.batch_id, state="uploading", submit_attempts=p.submit_attempts + 1
            )
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
                await set_batch(conn, p.batch_id, own_line_ids=True)
            provider = self._provider(p)
            path = await self._write_input(p)
            remote_file = await provider.upload_file(path, f"batchd-{p.batch_id}.jsonl")
            async with self.engine.begin() as conn:
                # create_started_at: which send a batch without metadata came from.
                await set_batch(
                    conn, p.batch_id, input_file_id=remote_file.id, create_started_at=NOW
                )
                # The create below must happen under a claim that outlives it.
                ours = await renew_claim(conn, p.batch_id, self.owner, self.config.lease_seconds)
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
        self._auth_refusals.pop(p.provider, None)
        self._auth_hold_until.pop(p.provider, None)
        if await self._record_submitted(p, remote, adopted=False):
            await self.archive.keep(
                path,
                p.spend_day,
                p.batch_id,
                "input",
                {"provider_file_id": remote_file.id, "provider_batch_id": remote.id},
            )
            await self._archive_ids(p)
        path.unlink(missing_ok=True)

    async def _archive_ids(self, p: Pending) -> None:
        """The input's line ids beside the callers' keys, for audits."""
        ids = self.archive.spool_path(p.batch_id, "ids")
        if ids.exists():
            await self.archive.keep(
                ids, p.spend_day, p.batch_id, "ids", {"columns": ["line_id", "client", "custom_id"]}
            )
            ids.unlink(missing_ok=True)

    async def _archive_adopted(self, p: Pending, remote: RemoteBatch) -> None:
        """An adopted batch's input is the file an earlier attempt wrote and
        uploaded; if the spool lost it, the same lines are written again from
        its tasks (still assigned to it, in file order)."""
        path = self.archive.spool_path(p.batch_id, "input")
        rebuilt = not path.exists()
        if rebuilt:
            async with self.engine.connect() as conn:
                own_ids = await batch_owns_line_ids(conn, p.batch_id)
            path = await self._write_input(p, own_ids=own_ids)
        await self.archive.keep(
            path,
            p.spend_day,
            p.batch_id,
            "input",
            {
                "provider_file_id": remote.input_file_id,
                "provider_batch_id": remote.id,
                "adopted": True,
                "rebuilt": rebuilt,
            },
        )
        await self._archive_ids(p)
        path.unlink(missing_ok=True)

    async def _create(self, p: Pending, input_file_id: str) -> RemoteBatch:
        # Abandon a create that has not answered within half the claim: were it
        # still landing when the claim lapsed, another replica would find no
        # batch and create a second one. An abandoned create is looked up by
        # our id before anyone creates again.
        try:
            async with asyncio.timeout(self.config.lease_seconds / 2):
                return await self._provider(p).create_batch(
                    input_file_id,
                    p.endpoint,
                    self.config.completion_window,
                    {"batchd_batch_id": p.batch_id, "batchd_model": p.model[:512]},
                )
        except TimeoutError:
            raise ProviderError(
                "create_batch: no answer within half the claim; the batch is looked up at "
                "the provider before it is created again",
                operation="create_batch",
            ) from None

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
        async with (
            self.engine.connect() as conn,
            aclosing(stream_batch_lines(conn, p.batch_id)) as pages,
        ):
            with tmp.open("wb") as out, ids_tmp.open("wb") as ids_out:
                async for rows in pages:
                    lids = [
                        line_id(tid, replays, attempt) if own_ids else cid
                        for tid, _, _, _, replays, attempt, _, cid in rows
                    ]
                    out.write(
                        b"".join(
                            [
                                input_line(lid, r[1], orjson.loads(r[2]))
                                for lid, r in zip(lids, rows, strict=True)
                            ]
                        )
                    )
                    ids_out.write(
                        b"".join(
                            [
                                orjson.dumps([lid, r[6], r[7]]) + b"\n"
                                for lid, r in zip(lids, rows, strict=True)
                            ]
                        )
                    )
                    for task_id, _, _, stored_line, _, _, _, _ in rows:
                        line_no += 1
                        if stored_line != line_no:
                            moved_ids.append(task_id)
                            moved_lines.append(line_no)
        if moved_ids:
            async with self.engine.begin() as conn:
                await renumber_batch_lines(conn, moved_ids, moved_lines)
        ids_tmp.replace(ids_path)
        tmp.replace(path)
        return path

    async def _find_remote(self, p: Pending) -> RemoteBatch | None:
        """A batch of ours the provider may have created before we heard back."""
        provider = self._provider(p)
        horizon = int((p.created_at - _ADOPT_LOOKBACK).timestamp())
        matches: list[RemoteBatch] = []
        unlabelled: list[RemoteBatch] = []
        async for remote in provider.list_batches():
            if remote.created_at < horizon:
                break
            if (remote.metadata or {}).get("batchd_batch_id") == p.batch_id:
                matches.append(remote)
            elif (
                not provider.limits.batch_metadata
                and _same_size(remote, p.item_count)
                and remote.created_at >= int(p.created_at.timestamp()) - 1
            ):
                unlabelled.append(remote)
        if not matches and unlabelled:
            # A provider whose batches carry no metadata (Anthropic): creates
            # there are serialised (_turn_to_create), so an unrecorded batch is
            # ours when our create was the last one started before it.
            async with self.engine.connect() as conn:
                known = await recorded_provider_batches(conn, [b.id for b in unlabelled])
                for b in sorted(unlabelled, key=lambda b: (b.created_at, b.id)):
                    if b.id in known:
                        continue
                    owner = await creation_owner(
                        conn,
                        p.provider,
                        b.created_exact if b.created_exact is not None else b.created_at,
                    )
                    if owner == p.batch_id:
                        matches.append(b)
        if not matches:
            return None
        # Duplicates can only come from retried creates: keep the oldest one
        # still standing, cancel the rest before they run and cost money twice.
        standing = [b for b in matches if b.status not in ("cancelling", "cancelled")]
        keep, *extra = sorted(standing or matches, key=lambda b: (b.created_at, b.id))
        for dup in extra:
            log.warning("batch.duplicate_cancelled", batch_id=p.batch_id, provider_batch_id=dup.id)
            await provider.cancel_batch(dup.id)
        return keep

    async def _record_submitted(self, p: Pending, remote: RemoteBatch, *, adopted: bool) -> bool:
        """Record the provider batch, unless another replica recorded one first
        (our claim lapsed mid-send); a different one of ours is then cancelled."""
        async with self.engine.begin() as conn:
            earlier = await record_submitted(
                conn,
                p.batch_id,
                provider_batch_id=remote.id,
                provider_status=remote.status,
                input_file_id=remote.input_file_id,
            )
        if earlier is None:
            log.info(
                "batch.submitted",
                batch_id=p.batch_id,
                provider_batch_id=remote.id,
                adopted=adopted,
                endpoint=p.endpoint,
                model=p.model,
            )
            return True
        if earlier != remote.id:
            log.warning(
                "batch.duplicate_cancelled",
                batch_id=p.batch_id,
                provider_batch_id=remote.id,
                kept=earlier,
            )
            try:
                await self._provider(p).cancel_batch(remote.id)
            except ProviderError as exc:
                log.error(
                    "batch.duplicate_cancel_failed",
                    batch_id=p.batch_id,
                    provider_batch_id=remote.id,
                    status=exc.status,
                    code=exc.code,
                )
        return False

    async def _send_failed(self, p: Pending, exc: ProviderError) -> None:
        if exc.status in AUTH_STATUSES:
            await self._credentials_refused(p, exc)
            return
        unrecoverable = (
            not exc.retryable
            and exc.status in _UNRECOVERABLE_CREATE
            and exc.code != "insufficient_quota"
        )
        if unrecoverable:
            # The provider refused: no batch exists, so the tasks go back to
            # the queue and the attempt that never happened is taken back.
            error = {
                "code": exc.code or "submit_rejected",
                "message": str(exc),
                "status": exc.status,
                "operation": exc.operation,
            }
            requeued = await self._close_unsent(p.batch_id, error)
            log.error(
                "batch.rejected",
                batch_id=p.batch_id,
                operation=exc.operation,
                status=exc.status,
                code=exc.code,
                requeued=requeued,
            )
            return
        # The provider's retry-after wins; else five scheduler ticks, doubling.
        first = 5.0 * self.config.scheduler_interval_seconds
        delay = exc.retry_after or exponential(p.submit_attempts, first, 300.0)
        delay *= 1 + random.random() * 0.2
        log.warning(
            "batch.send_failed",
            batch_id=p.batch_id,
            operation=exc.operation,
            status=exc.status,
            code=exc.code,
            retry_in=round(delay, 1),
            submit_attempts=p.submit_attempts + 1,
        )
        await self._retry_later(p, delay)

    async def _close_unsent(self, batch_id: str, error: dict[str, Any]) -> int:
        """Close a batch the provider never created: its tasks go back to the
        queue with their attempt given back, it costs nothing. Returns how
        many tasks went back."""
        async with self.engine.begin() as conn:
            requeued = await release_unsent_tasks(conn, batch_id, error)
            await settle_batch(
                conn,
                batch_id,
                provider_status="not_submitted",
                errors=[error],
                finished_at=NOW,
                cost_usd=Decimal(0),
                sync_cost_usd=Decimal(0),
            )
            await settle_client_spend(conn, batch_id, {})
        return requeued

    async def _credentials_refused(self, p: Pending, exc: ProviderError) -> None:
        """The provider refused our key: a configuration error (batchd.health
        logs it once, with what to fix). Nothing reached the provider, so the
        tasks go back to the queue with their attempt given back and the
        batch is closed unsent; flushing pauses, doubling, until a send gets
        through."""
        refusals = self._auth_refusals[p.provider] = self._auth_refusals.get(p.provider, 0) + 1
        delay = auth_backoff(refusals)
        self._auth_hold_until[p.provider] = self.clock() + timedelta(seconds=delay)
        error = {
            "code": exc.code or "provider_credentials_rejected",
            "message": "the provider refused batchd's credentials (HTTP "
            f"{exc.status}); the task waits until the key is fixed",
            "status": exc.status,
            "operation": exc.operation,
        }
        requeued = await self._close_unsent(p.batch_id, error)
        log.warning(
            "batch.credentials_rejected",
            batch_id=p.batch_id,
            provider=p.provider,
            status=exc.status,
            operation=exc.operation,
            requeued=requeued,
            retry_in=delay,
        )

    async def _retry_later(self, p: Pending, delay: float) -> None:
        async with self.engine.begin() as conn:
            await release_batch(conn, p.batch_id, self.owner, delay)

    @staticmethod
    def _pending(row: dict[str, Any]) -> Pending:
        return Pending(
            row["id"],
            row["provider"],
            row["endpoint"],
            row["model"],
            row["spend_day"],
            row["created_at"],
            row["submit_attempts"],
            row["item_count"],
        )


def _same_size(remote: RemoteBatch, items: int) -> bool:
    """Whether a batch could hold our row's tasks: as many, or fewer when some
    left the batch (a fallback) before its input was written."""
    total = (remote.request_counts or {}).get("total")
    return isinstance(total, int) and 1 <= total <= items
