"""Provider outcomes → the store.

A terminal batch is routed in one transaction: every line of its output and
error files is classified (domain.classify_line) and written in chunks;
tasks no line mentioned are treated as retryable; the batch is settled with
its cost (see prices.py for the rounding rule): the tokens the provider
billed, from the batch's ``usage`` when it reports one, cross-checked
against the lines. A success line no task takes (its task left for the sync
lane, or a duplicate) is still billed: its cost is the batch's unattributed
cost, counted in spend, the report and the budget. A crash mid-way rolls
everything back and the next poll routes the batch again from the files, so
a success is stored exactly once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd import logs, metrics
from batchd.clients import Clients
from batchd.domain import MISSING_ERROR, Outcome, classify_batch_failure, classify_line
from batchd.faults import crash_point
from batchd.prices import ModelPrice, PriceTable, Tokens, cost, round_usd, tokens_from_usage
from batchd.provider.base import RemoteBatch
from batchd.store import repo
from batchd.store.repo import NOW, Backoff

log = logs.get("batchd.router")

CHUNK_LINES = 2000


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
    # Rounded (prices.py): spend = the results' costs + unattributed.
    spend: Decimal = Decimal(0)
    sync_spend: Decimal = Decimal(0)
    unattributed: Decimal = Decimal(0)
    # (outcome, client) -> tasks, for the client-labelled completion metric.
    by_client: dict[tuple[str, str | None], int] = field(default_factory=dict)

    def add(self, counts: dict[tuple[str, str | None], int]) -> None:
        for (outcome, client), n in counts.items():
            if outcome == "retried":
                self.retried += n
            elif outcome == "failed":
                self.failed += n
            self.count(outcome, client, n)

    def count(self, outcome: str, client: str | None, n: int = 1) -> None:
        self.by_client[outcome, client] = self.by_client.get((outcome, client), 0) + n


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
    def __init__(self, engine: AsyncEngine, prices: PriceTable, backoff: Backoff,
                 clients: Clients) -> None:
        self.engine = engine
        self.clients = clients
        self.prices = prices
        self.backoff = backoff

    async def route(self, batch_id: str, model: str, remote: RemoteBatch,
                    files: list[Path]) -> RouteSummary:
        summary = RouteSummary()
        price = self.prices.lookup(model)
        summary.unpriced = not price.known
        if summary.unpriced:
            self.prices.warn_unpriced(model, "batch")
        async with self.engine.begin() as conn:
            if remote.status == "failed":
                await self._route_failed(conn, batch_id, remote, summary)
            else:
                for path in files:
                    await self._route_file(conn, batch_id, price, path, summary)
                missing = {**MISSING_ERROR, "batch_status": remote.status}
                await self._fail_remaining(conn, batch_id, missing, summary)
            await self._settle_cost(conn, batch_id, price, remote, summary)
            await repo.settle_batch(
                conn, batch_id, provider_status=remote.status,
                output_file_id=remote.output_file_id, error_file_id=remote.error_file_id,
                request_counts=remote.request_counts, usage=remote.usage,
                errors=remote.errors or None, finished_at=NOW,
                token_limited=summary.token_limited, cost_usd=summary.spend,
                sync_cost_usd=summary.sync_spend, unattributed_cost_usd=summary.unattributed,
                unattributed_lines=summary.orphan_lines + summary.malformed,
                unpriced=summary.unpriced)
            latencies = await conn.execute(text("""
                SELECT extract(epoch FROM now() - created_at) FROM tasks
                WHERE batch_id = :bid AND state = 'succeeded'"""), {"bid": batch_id})
            for (seconds,) in latencies:
                metrics.TASK_LATENCY.labels(lane="batch").observe(float(seconds))
        crash_point("after_route")
        self._record_metrics(model, remote.status, summary)
        log.info("batch.routed", batch_id=batch_id, provider_batch_id=remote.id,
                 status=remote.status, succeeded=summary.succeeded, retried=summary.retried,
                 failed=summary.failed, requeued=summary.requeued, malformed=summary.malformed,
                 orphan_lines=summary.orphan_lines, cost_usd=str(summary.spend),
                 unattributed_usd=str(summary.unattributed), unpriced=summary.unpriced)
        return summary

    async def _settle_cost(self, conn: AsyncConnection, batch_id: str, price: ModelPrice,
                           remote: RemoteBatch, summary: RouteSummary) -> None:
        """The batch's cost from what was billed; its results rounded to add up to
        their share, the rest unattributed."""
        attributed, attributed_sync = await repo.allocate_result_costs(conn, batch_id)
        lines = summary.tokens + summary.orphan_tokens
        billed = lines
        if remote.usage:
            reported = tokens_from_usage(remote.usage)
            # Unreadable lines are billed but carry no usage we can read, so the
            # batch may report more than its lines; anything else is a surprise.
            if reported != lines and not (summary.malformed and reported.at_least(lines)
                                          == reported):
                log.warning("batch.usage_mismatch", batch_id=batch_id,
                            reported=_tokens(reported), lines=_tokens(lines),
                            rule="billed as the larger count of each kind")
            billed = reported.at_least(lines)
        total = max(round_usd(cost(billed, price.batch)), attributed)
        summary.billed = billed
        summary.spend, summary.sync_spend = round_usd(total), round_usd(attributed_sync)
        summary.unattributed = round_usd(total - attributed)

    async def _route_file(self, conn: AsyncConnection, batch_id: str, price: ModelPrice,
                          path: Path, summary: RouteSummary) -> None:
        ok = repo.SuccessRows.empty()
        ok_tokens: list[Tokens] = []
        bad_ids: list[str] = []
        bad_final: list[bool] = []
        bad_errors: list[dict[str, Any]] = []
        for line in iter_lines(path):
            cid = line.get("custom_id") if line else None
            if line is None or not isinstance(cid, str):
                summary.malformed += 1  # its task stays unsettled and is retried as missing
                continue
            result = classify_line(line)
            if result.outcome is Outcome.SUCCESS:
                body = line["response"].get("body") or {}
                usage = body.get("usage") if isinstance(body, dict) else None
                tokens = tokens_from_usage(usage)
                ok.custom_ids.append(cid)
                ok.status.append(result.status_code or 200)
                ok.responses.append(orjson.dumps(body).decode())
                ok.usages.append(orjson.dumps(usage).decode() if usage is not None else None)
                ok.costs.append(cost(tokens, price.batch))
                ok.sync_costs.append(cost(tokens, price.sync))
                ok.unpriced.append(not price.known)
                ok_tokens.append(tokens)
            else:
                bad_ids.append(cid)
                bad_final.append(result.outcome is Outcome.FINAL)
                bad_errors.append(result.error or {})
            if len(ok.custom_ids) >= CHUNK_LINES:
                await self._flush_ok(conn, batch_id, ok, ok_tokens, summary)
                ok, ok_tokens = repo.SuccessRows.empty(), []
            if len(bad_ids) >= CHUNK_LINES:
                await self._flush_bad(conn, batch_id, bad_ids, bad_final, bad_errors, summary)
                bad_ids, bad_final, bad_errors = [], [], []
        await self._flush_ok(conn, batch_id, ok, ok_tokens, summary)
        await self._flush_bad(conn, batch_id, bad_ids, bad_final, bad_errors, summary)

    async def _flush_ok(self, conn: AsyncConnection, batch_id: str, ok: repo.SuccessRows,
                        tokens: list[Tokens], summary: RouteSummary) -> None:
        if not ok.custom_ids:
            return
        stored = await repo.store_successes(conn, batch_id, ok)
        crash_point("mid_route")
        for i, cid in enumerate(ok.custom_ids):
            if cid in stored:
                # A duplicate line in the same chunk counts once.
                summary.count("succeeded", stored.pop(cid))
                summary.succeeded += 1
                summary.tokens += tokens[i]
            else:
                # Billed, but no task of this batch took it: the task left for
                # the sync lane, already succeeded, or the line is a duplicate.
                summary.orphan_lines += 1
                summary.orphan_tokens += tokens[i]

    async def _flush_bad(self, conn: AsyncConnection, batch_id: str, ids: list[str],
                         finals: list[bool], errors: list[dict[str, Any]],
                         summary: RouteSummary) -> None:
        jitters = [random.random() for _ in ids]
        summary.add(await repo.store_failures(conn, batch_id, ids, finals, errors, jitters,
                                              self.backoff))

    async def _fail_remaining(self, conn: AsyncConnection, batch_id: str,
                              error: dict[str, Any], summary: RouteSummary) -> None:
        """Tasks of the batch no line settled: retryable (they never ran)."""
        while ids := await repo.unsettled_in_batch(conn, batch_id, CHUNK_LINES):
            await self._flush_bad(conn, batch_id, ids, [False] * len(ids),
                                  [error] * len(ids), summary)

    async def _route_failed(self, conn: AsyncConnection, batch_id: str, remote: RemoteBatch,
                            summary: RouteSummary) -> None:
        verdict = classify_batch_failure(remote.errors)
        if verdict.token_limited:
            # Not the tasks' fault: back to the queue, attempt taken back.
            summary.token_limited = True
            requeued = await repo.requeue_remaining(
                conn, batch_id, verdict.other_error, count_attempt=False)
            summary.requeued = sum(requeued.values())
            for client, n in requeued.items():
                summary.count("retried", client, n)
            return
        if verdict.final_lines:
            by_line = await repo.custom_ids_at_lines(conn, batch_id, list(verdict.final_lines))
            ids = list(by_line.values())
            errors = [verdict.final_lines[line] for line in by_line]
            summary.add(await repo.store_failures(
                conn, batch_id, ids, [True] * len(ids), errors, [0.0] * len(ids), self.backoff))
        await self._fail_remaining(conn, batch_id, verdict.other_error, summary)

    def _record_metrics(self, model: str, status: str, s: RouteSummary) -> None:
        metrics.BATCHES_FINISHED.labels(status=status).inc()
        for (outcome, client), n in s.by_client.items():
            metrics.TASKS_COMPLETED.labels(outcome=outcome, client=self.clients.label(client),
                                           lane="batch").inc(n)
        metrics.SPEND.labels(model=model, lane="batch").inc(float(s.spend))
        metrics.SAVINGS.labels(model=model, lane="batch").inc(float(s.sync_spend - s.spend))
        if s.unpriced:
            metrics.UNPRICED_RESULTS.labels(lane="batch").inc(s.succeeded)
        for kind, n in (("input", s.billed.input), ("cached_input", s.billed.cached),
                        ("output", s.billed.output)):
            metrics.TOKENS.labels(model=model, kind=kind, lane="batch").inc(n)


def _tokens(t: Tokens) -> dict[str, int]:
    return {"input": t.input, "cached_input": t.cached, "output": t.output}
