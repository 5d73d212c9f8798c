"""Provider outcomes → the store.

A terminal batch's lines are classified (domain.classify_line) and settled
from its output and error files: the success lines first, streamed by COPY
into a temporary table and settled by one statement, ROUTE_CHUNK_LINES
lines a transaction, so results become readable (and a job's results
streamable) while the rest of the batch is still being routed; then, in one
last transaction, the failure lines, the tasks no line mentioned (treated as
retryable), and the batch with its cost (see prices.py for the rounding
rule): the tokens the provider billed, from the batch's ``usage`` when it
reports one, cross-checked against the lines. A success line no task takes
(its task left for the sync lane, or a duplicate) is still billed: its cost
is the batch's unattributed cost, counted in spend, the report and the
budget.

A crash mid-way keeps the chunks already committed; the next poll routes the
batch again from the files, and a line whose task is no longer submitted in
the batch settles nothing, so a success is stored exactly once. The last
transaction takes the batch's attributed cost from its results rows, whoever
stored them, so results plus unattributed still equal the batch. A task with
both kinds of line succeeds (that is what was paid for): every success is
settled before any failure."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import chain, islice
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd import logs, metrics
from batchd.clients import Clients
from batchd.domain import (
    MISSING_ERROR,
    Outcome,
    classify_batch_failure,
    classify_line,
    line_task_id,
)
from batchd.estimates import Calibration
from batchd.faults import crash_point
from batchd.prices import (
    ModelPrice,
    PriceTable,
    ScaledRate,
    Tokens,
    cost,
    tokens_from_usage,
    usage_of,
)
from batchd.provider.base import RemoteBatch
from batchd.store.batches import NOW, batch_owns_line_ids
from batchd.store.routing import (
    Backoff,
    batch_results,
    lock_unrouted_batch,
    requeue_remaining,
    resolve_legacy_lines,
    settle_batch,
    stage_lines,
    store_failures,
    store_staged_failures,
    store_staged_successes,
    tasks_at_lines,
    unsettled_in_batch,
)
from batchd.store.spend import settle_client_spend

log = logs.get("batchd.router")

CHUNK_LINES = 2000  # tasks settled as missing per statement
# Success lines settled per transaction. A transaction stamps its tasks'
# finished_at when it begins and shows them when it commits: the smaller it
# is, the sooner each result is readable after the time it carries (a whole
# 50,000-line batch took 3.5-11 s on the benchmark's machine), for a few
# milliseconds of temporary table and commit per chunk.
ROUTE_CHUNK_LINES = 5000


@dataclass(slots=True)
class RouteSummary:
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    requeued: int = 0
    malformed: int = 0
    token_limited: bool = False
    tokens: Tokens = field(default_factory=Tokens)  # of the lines results were stored for
    # Success lines no task took: billed all the same.
    orphan_lines: int = 0
    orphan_tokens: Tokens = field(default_factory=Tokens)
    billed: Tokens = field(default_factory=Tokens)
    unpriced: bool = False
    # Exact (prices.py): spend = the results' costs + unattributed.
    spend: Decimal = Decimal(0)
    sync_spend: Decimal = Decimal(0)
    unattributed: Decimal = Decimal(0)
    # The stored results' exact costs (batch and sync prices).
    attributed: Decimal = Decimal(0)
    attributed_sync: Decimal = Decimal(0)
    waited: list[float] = field(default_factory=list)  # ingest to result, per stored task
    # The stored results' exact costs by client (client caps).
    cost_by_client: dict[str, Decimal] = field(default_factory=dict)
    # Another replica routed the batch first (its claim outlived ours).
    already_routed: bool = False
    # (outcome, client) -> tasks, for the client-labelled completion metric.
    by_client: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, counts: dict[tuple[str, str], int]) -> None:
        for (outcome, client), n in counts.items():
            if outcome == "retried":
                self.retried += n
            elif outcome == "failed":
                self.failed += n
            self.count(outcome, client, n)

    def count(self, outcome: str, client: str, n: int = 1) -> None:
        self.by_client[outcome, client] = self.by_client.get((outcome, client), 0) + n


@dataclass(slots=True)
class _LineTally:
    """Success lines read, and their tokens."""

    ok: int = 0
    tokens: Tokens = field(default_factory=Tokens)

    def add(self, t: Tokens) -> None:
        self.ok += 1
        self.tokens += t


def iter_lines(path: Path) -> Iterator[dict[str, Any] | None]:
    """Parsed lines of a JSONL file, read as a stream; None for a bad line."""
    with path.open("rb") as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                yield None
                continue
            yield obj if isinstance(obj, dict) else None


class Router:
    def __init__(
        self,
        engine: AsyncEngine,
        prices: PriceTable,
        backoff: Backoff,
        clients: Clients,
        calibration: Calibration | None = None,
    ) -> None:
        self.engine = engine
        self.calibration = calibration or Calibration()
        self.clients = clients
        self.prices = prices
        self.backoff = backoff
        self.chunk_lines = ROUTE_CHUNK_LINES

    async def route(
        self,
        batch_id: str,
        model: str,
        remote: RemoteBatch,
        files: list[Path],
        provider: str = "openai",
    ) -> RouteSummary:
        summary = RouteSummary()
        price = self.prices.lookup(model)
        summary.unpriced = not price.known
        if summary.unpriced:
            self.prices.warn_unpriced(model, "batch")
        failures: list[tuple[Any, ...]] = []
        lines = _LineTally()
        own_ids = True
        if remote.status != "failed":
            async with self.engine.connect() as conn:
                own_ids = await batch_owns_line_ids(conn, batch_id)
            if not await self._route_successes(
                batch_id, model, price, files, own_ids, lines, failures, summary
            ):
                return self._already_routed(batch_id, remote, summary)
        async with self.engine.begin() as conn:
            # The row lock makes a second router (a replica whose lease lapsed
            # mid-route under load) wait for the first one's commit and then
            # see the batch routed, instead of settling it again.
            if not await lock_unrouted_batch(conn, batch_id):
                return self._already_routed(batch_id, remote, summary)
            if remote.status == "failed":
                await self._route_failed(conn, batch_id, remote, summary)
            else:
                if failures:
                    await stage_lines(conn, failures)
                    if not own_ids:
                        await resolve_legacy_lines(conn, batch_id)
                    summary.add(await store_staged_failures(conn, batch_id, self.backoff))
                missing = {**MISSING_ERROR, "batch_status": remote.status}
                await self._fail_remaining(conn, batch_id, missing, summary)
                stored = await batch_results(conn, batch_id)
                summary.attributed, summary.attributed_sync = stored.cost, stored.sync_cost
                summary.cost_by_client = stored.cost_by_client
                # Billed, but no task of this batch took them: the task left
                # for the sync lane or had already succeeded, or the line is
                # a duplicate.
                summary.orphan_lines = lines.ok - stored.stored
                summary.orphan_tokens = lines.tokens - summary.tokens
            self._settle_cost(batch_id, price, remote, summary)
            await settle_client_spend(conn, batch_id, summary.cost_by_client)
            await settle_batch(
                conn,
                batch_id,
                provider_status=remote.status,
                output_file_id=remote.output_file_id,
                error_file_id=remote.error_file_id,
                request_counts=remote.request_counts,
                usage=remote.usage,
                errors=remote.errors or None,
                finished_at=NOW,
                token_limited=summary.token_limited,
                cost_usd=summary.spend,
                sync_cost_usd=summary.sync_spend,
                unattributed_cost_usd=summary.unattributed,
                unattributed_lines=summary.orphan_lines + summary.malformed,
                unpriced=summary.unpriced,
            )
        crash_point("after_route")
        self._record_metrics(provider, model, remote.status, summary)
        log.info(
            "batch.routed",
            batch_id=batch_id,
            provider_batch_id=remote.id,
            status=remote.status,
            succeeded=summary.succeeded,
            retried=summary.retried,
            failed=summary.failed,
            requeued=summary.requeued,
            malformed=summary.malformed,
            orphan_lines=summary.orphan_lines,
            cost_usd=str(summary.spend),
            unattributed_usd=str(summary.unattributed),
            unpriced=summary.unpriced,
        )
        return summary

    @staticmethod
    def _already_routed(batch_id: str, remote: RemoteBatch, summary: RouteSummary) -> RouteSummary:
        summary.already_routed = True
        log.warning("batch.already_routed", batch_id=batch_id, provider_batch_id=remote.id)
        return summary

    def _settle_cost(
        self, batch_id: str, price: ModelPrice, remote: RemoteBatch, summary: RouteSummary
    ) -> None:
        """The batch's exact cost from what was billed; its results are its
        share, the rest is unattributed."""
        attributed, attributed_sync = summary.attributed, summary.attributed_sync
        lines = summary.tokens + summary.orphan_tokens
        billed = lines
        if remote.usage:
            reported = tokens_from_usage(remote.usage)
            # Unreadable lines are billed but carry no usage we can read, so the
            # batch may report more than its lines; anything else is a surprise.
            if reported != lines and not (
                summary.malformed and reported.at_least(lines) == reported
            ):
                log.warning(
                    "batch.usage_mismatch",
                    batch_id=batch_id,
                    reported=_tokens(reported),
                    lines=_tokens(lines),
                    rule="billed as the larger count of each kind",
                )
            billed = reported.at_least(lines)
        total = max(cost(billed, price.batch), attributed)
        summary.billed = billed
        summary.spend, summary.sync_spend = total, attributed_sync
        summary.unattributed = total - attributed

    async def _route_successes(
        self,
        batch_id: str,
        model: str,
        price: ModelPrice,
        files: list[Path],
        own_ids: bool,
        lines: _LineTally,
        failures: list[tuple[Any, ...]],
        summary: RouteSummary,
    ) -> bool:
        """Settle the files' success lines, ROUTE_CHUNK_LINES a transaction
        (staged, then settled by one statement), keeping the failure lines in
        ``failures`` for the last transaction (a few hundred bytes each, held
        in memory: failures are the exception, and a batch has at most
        BATCHD_MAX_BATCH_ITEMS lines). False: another router has routed the
        batch meanwhile."""
        rate, sync_rate = ScaledRate.of(price.batch), ScaledRate.of(price.sync)
        rows = self._stage_rows(files, rate, sync_rate, lines, summary, own_ids, failures)
        # A batch built before line ids resolves its lines by custom_id over
        # all its tasks: once, in one transaction.
        size = self.chunk_lines if own_ids else None
        estimated = 0
        while (first := next(rows, None)) is not None:
            async with self.engine.begin() as conn:
                if not await lock_unrouted_batch(conn, batch_id):
                    return False
                await stage_lines(conn, chain([first], islice(rows, size - 1 if size else None)))
                if not own_ids:
                    await resolve_legacy_lines(conn, batch_id)
                stored = await store_staged_successes(conn, batch_id, unpriced=not price.known)
            crash_point("mid_route")
            for client, n in stored.by_client.items():
                summary.count("succeeded", client, n)
            summary.succeeded += stored.stored
            summary.tokens += stored.tokens
            summary.waited.extend(stored.waited)
            estimated += stored.estimated_input
        self.calibration.observe(model, summary.tokens.input, estimated)
        return True

    @staticmethod
    def _stage_rows(
        files: list[Path],
        rate: ScaledRate,
        sync_rate: ScaledRate,
        lines: _LineTally,
        summary: RouteSummary,
        own_ids: bool,
        failures: list[tuple[Any, ...]],
    ) -> Iterator[tuple[Any, ...]]:
        """STAGE_COLUMNS rows of the files' success lines, read as a stream;
        the failure lines' rows go to ``failures``. A line names its task by
        batchd's line id (or, in a batch built before them, by the caller's
        custom_id: ``tid`` is filled in by SQL); a line that names none
        settles nothing (billed if it is a success)."""
        number = 0
        for path in files:
            for line in iter_lines(path):
                number += 1
                cid = line.get("custom_id") if line else None
                if line is None or not isinstance(cid, str):
                    summary.malformed += 1  # its task stays unsettled: retried as missing
                    continue
                tid = line_task_id(cid) if own_ids else None
                result = classify_line(line)
                if result.outcome is not Outcome.SUCCESS:
                    failures.append(
                        (
                            number,
                            tid,
                            cid,
                            False,
                            None,
                            None,
                            None,
                            None,
                            None,
                            None,
                            None,
                            None,
                            None,
                            result.outcome is Outcome.FINAL,
                            orjson.dumps(result.error or {}).decode(),
                            random.random(),
                        )
                    )
                    continue
                body = line["response"].get("body") or {}
                usage = usage_of(body)
                tokens = tokens_from_usage(usage)
                lines.add(tokens)
                yield (
                    number,
                    tid,
                    cid,
                    True,
                    result.status_code or 200,
                    orjson.dumps(body).decode(),
                    orjson.dumps(usage).decode() if usage is not None else None,
                    tokens.input,
                    tokens.cached,
                    tokens.output,
                    tokens.cache_write,
                    rate.usd(rate.cost(tokens)),
                    sync_rate.usd(sync_rate.cost(tokens)),
                    None,
                    None,
                    None,
                )

    async def _flush_bad(
        self,
        conn: AsyncConnection,
        batch_id: str,
        ids: list[int],
        finals: list[bool],
        errors: list[dict[str, Any]],
        summary: RouteSummary,
    ) -> None:
        jitters = [random.random() for _ in ids]
        summary.add(
            await store_failures(conn, batch_id, ids, finals, errors, jitters, self.backoff)
        )

    async def _fail_remaining(
        self, conn: AsyncConnection, batch_id: str, error: dict[str, Any], summary: RouteSummary
    ) -> None:
        """Tasks of the batch no line settled: retryable (they never ran)."""
        while ids := await unsettled_in_batch(conn, batch_id, CHUNK_LINES):
            await self._flush_bad(
                conn, batch_id, ids, [False] * len(ids), [error] * len(ids), summary
            )

    async def _route_failed(
        self, conn: AsyncConnection, batch_id: str, remote: RemoteBatch, summary: RouteSummary
    ) -> None:
        verdict = classify_batch_failure(remote.errors)
        if verdict.token_limited:
            # Not the tasks' fault: back to the queue, attempt taken back.
            summary.token_limited = True
            requeued = await requeue_remaining(
                conn, batch_id, verdict.other_error, count_attempt=False
            )
            summary.requeued = sum(requeued.values())
            for client, n in requeued.items():
                summary.count("retried", client, n)
            return
        if verdict.final_lines:
            by_line = await tasks_at_lines(conn, batch_id, list(verdict.final_lines))
            ids = list(by_line.values())
            errors = [verdict.final_lines[line] for line in by_line]
            summary.add(
                await store_failures(
                    conn, batch_id, ids, [True] * len(ids), errors, [0.0] * len(ids), self.backoff
                )
            )
        await self._fail_remaining(conn, batch_id, verdict.other_error, summary)

    def _record_metrics(self, provider: str, model: str, status: str, s: RouteSummary) -> None:
        metrics.BATCHES_FINISHED.labels(provider=provider, status=status).inc()
        latency = metrics.TASK_LATENCY.labels(lane="batch")
        for seconds in s.waited:
            latency.observe(seconds)
        for (outcome, client), n in s.by_client.items():
            metrics.TASKS_COMPLETED.labels(
                outcome=outcome, client=self.clients.label(client), lane="batch"
            ).inc(n)
        # A priced model's table entry, else "other": bounded by the prices file.
        label = self.prices.metric_label(model)
        metrics.SPEND.add(s.spend, provider=provider, model=label, lane="batch")
        metrics.SAVINGS.add(s.sync_spend - s.spend, provider=provider, model=label, lane="batch")
        for client, usd in s.cost_by_client.items():
            metrics.CLIENT_SPEND.add(usd, client=self.clients.label(client), lane="batch")
        if s.unpriced:
            metrics.UNPRICED_RESULTS.labels(lane="batch").inc(s.succeeded)
        for kind, n in (
            ("input", s.billed.input),
            ("cached_input", s.billed.cached),
            ("cache_write_input", s.billed.cache_write),
            ("output", s.billed.output),
        ):
            metrics.TOKENS.labels(provider=provider, model=label, kind=kind, lane="batch").inc(n)


def _tokens(t: Tokens) -> dict[str, int]:
    return {
        "input": t.input,
        "cached_input": t.cached,
        "output": t.output,
        "cache_write_input": t.cache_write,
    }
