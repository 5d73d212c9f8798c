"""The daily report (DESIGN section 8): per UTC day, what came in, how it ended,
what it cost and what batching saved.

Counts come from ``task_events`` (one row per attempt outcome), so a day's
numbers do not change when its tasks move on later. Money is summed from
exact amounts (prices.py) and each column rounded once, when shown: savings
is the exact sync equivalent less the exact spend, rounded, so it may differ
by 1e-6 from the difference of the two rounded columns. Each closed day is
stored once per (client, provider, model, lane) in ``daily_rollups`` (store/
rollups.py) and answered from there ever after, so the report of a day
outlives the rows retention deletes, and ``--days 366`` reads one small
table; ``post_replay_success_ratio`` is as of that roll-up. Money
is summed from amounts already rounded to 1e-6 (prices.py), so the columns
add up exactly: savings = sync equivalent - spend. README "Daily report"
defines every column.
"""

from __future__ import annotations

import collections
import csv
import io
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs
from batchd.prices import round_usd
from batchd.store import rollups

log = logs.get("batchd.report")

FIELDS = (
    "date",
    "tasks_in",
    "succeeded",
    "failed",
    "cancelled",
    "retried",
    "replayed",
    "failure_ratio",
    "post_replay_success_ratio",
    "manual_queue",
    "spend_usd",
    "sync_equivalent_usd",
    "savings_usd",
    "unattributed_usd",
    "unpriced_models",
    "alert",
)

# Rows of a day still being written to are not rolled up: a transaction that
# began before midnight may commit an event stamped before it a little after.
ROLLUP_GRACE = timedelta(minutes=10)
# Latency histogram resolution: buckets per doubling from 10 ms, so a
# percentile read from it is within about 4% of the exact one.
LATENCY_BUCKETS_PER_DOUBLING = 8


def _ratio(num: int, den: int) -> float:
    return round(num / den, 6) if den else 0.0


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


class Reporter:
    """The report of a closed day comes from its stored rollup (computed once,
    the first time the day is asked for or by the retention loop, whichever
    comes first); today, and yesterday during the grace, come from the live
    tables through the same computation, so a day reads the same before and
    after it is rolled up and pruned (post_replay_success_ratio is as of the
    roll-up: later replays of a closed day's tasks do not change it)."""

    def __init__(
        self,
        engine: AsyncEngine,
        alert_ratio: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.alert_ratio = alert_ratio
        self.clock = clock

    def last_closed_day(self) -> date:
        """The newest day that may be rolled up now."""
        return (self.clock() - ROLLUP_GRACE).date() - timedelta(days=1)

    async def roll_up(self, through: date | None = None) -> list[date]:
        """Store every closed day not stored yet, oldest first, up to
        ``through`` (default the last closed day); returns the days stored."""
        last = min(through or self.last_closed_day(), self.last_closed_day())
        async with self.engine.connect() as conn:
            newest = await rollups.last_rolled_day(conn)
            if newest is None:
                first_seen = await rollups.first_activity(conn)
                if first_seen is None:
                    return []
                first = first_seen.astimezone(UTC).date()
            else:
                first = newest + timedelta(days=1)
        stored: list[date] = []
        day = first
        while day <= last:
            lo, hi = _day_bounds(day)
            async with self.engine.begin() as conn:
                await rollups.on_one_core(conn)
                rows = await rollups.compute_day(conn, lo, hi, LATENCY_BUCKETS_PER_DOUBLING)
                if await rollups.store_day(conn, day, rows):
                    stored.append(day)
            day += timedelta(days=1)
        if stored:
            log.info(
                "report.rolled_up",
                first=stored[0].isoformat(),
                last=stored[-1].isoformat(),
                days=len(stored),
            )
        return stored

    async def day(self, day: date, client: str | None = None) -> dict[str, Any]:
        return (await self.daily(day, 1, client))[0]

    async def daily(
        self, end: date | None = None, days: int = 1, client: str | None = None
    ) -> list[dict[str, Any]]:
        last = end or self.clock().date()
        first = last - timedelta(days=days - 1)
        await self.roll_up(last)
        closed = self.last_closed_day()
        by_day: dict[date, list[dict[str, Any]]] = collections.defaultdict(list)
        async with self.engine.connect() as conn:
            for row in await rollups.stored_rows(conn, first, min(last, closed), client):
                by_day[row["day"]].append(row)
            manual = await rollups.manual_queue_before(conn, first, client)
            # Days not rolled up yet (today; yesterday within the grace) are
            # read live, and so are such days before ``first`` for the queue.
            live_from = closed + timedelta(days=1)
            live: dict[date, list[dict[str, Any]]] = {}
            day = live_from
            # Nothing has happened after today: later days are empty, unread.
            while day <= min(last, self.clock().date()):
                lo, hi = _day_bounds(day)
                found = await rollups.compute_day(conn, lo, hi, LATENCY_BUCKETS_PER_DOUBLING)
                live[day] = [
                    {"client": k[0], "provider": k[1], "model": k[2], "lane": k[3], **v}
                    for k, v in found.items()
                    if client is None or k[0] == client
                ]
                day += timedelta(days=1)
        for day, rows in live.items():
            if day < first:  # not rolled up yet, before the range: the queue only
                _add_manual(manual, rows)
        out = []
        day = first
        while day <= last:
            rows = live.get(day, by_day.get(day, []))
            _add_manual(manual, rows)
            report = self._render(day, rows, sum(manual.values()))
            if client is None:
                # Every client's share; unattributed spend (client '') is no one's.
                report["clients"] = {
                    name: _client([r for r in rows if r["client"] == name], manual.get(name, 0))
                    for name in sorted({str(r["client"]) for r in rows} | set(manual))
                    if name and (manual.get(name) or any(r["client"] == name for r in rows))
                }
            else:
                report["client"] = client
            out.append(report)
            day += timedelta(days=1)
        return out

    def _render(self, day: date, rows: list[dict[str, Any]], manual: int) -> dict[str, Any]:
        total = {name: sum(int(r[name]) for r in rows) for name in rollups.COUNTS}
        money = {name: sum((Decimal(r[name]) for r in rows), Decimal(0)) for name in rollups.MONEY}
        succeeded, failed = total["succeeded"], total["failed"]
        unattributed = money["unattributed_usd"]
        # Exact amounts summed, each column rounded once when shown.
        spend = money["spend_usd"] + unattributed
        sync = money["sync_usd"]
        failure_ratio = _ratio(failed, succeeded + failed)
        lanes: dict[str, dict[str, Any]] = {}
        for lane in sorted({str(r["lane"]) for r in rows}):
            mine = [r for r in rows if r["lane"] == lane]
            done = sum(int(r["lane_succeeded"]) + int(r["lane_failed"]) for r in mine)
            if done:
                lanes[lane] = _lane(mine)
        return {
            "date": day.isoformat(),
            "tasks_in": total["tasks_in"],
            "succeeded": succeeded,
            "failed": failed,
            "cancelled": total["cancelled"],
            "retried": total["retried"],
            "replayed": total["replayed"],
            "failure_ratio": failure_ratio,
            "post_replay_success_ratio": (
                _ratio(total["finished_ok"], total["finished"]) if total["finished"] else 1.0
            ),
            "manual_queue": manual,
            "spend_usd": str(round_usd(spend)),
            "sync_equivalent_usd": str(round_usd(sync)),
            "savings_usd": str(round_usd(sync - spend)),
            "unattributed_usd": str(round_usd(unattributed)),
            "unpriced_models": sorted({str(r["model"]) for r in rows if r["unpriced"]}),
            "alert": failure_ratio > self.alert_ratio,
            "lanes": lanes,
            "providers": _providers(rows),
        }


def _add_manual(manual: dict[str, int], rows: list[dict[str, Any]]) -> None:
    """Move each client's manual queue by a day: failures in, replays and
    dismissals out."""
    for r in rows:
        moved = int(r["failed"]) - int(r["replayed"]) - int(r["dismissed"])
        if moved:
            manual[str(r["client"])] = manual.get(str(r["client"]), 0) + moved


def _client(rows: list[dict[str, Any]], manual: int) -> dict[str, Any]:
    """One client's share of a day. Its spend is its results' cost and its
    own sync calls paid for nothing; billed batch lines no task kept are
    no client's."""
    succeeded = sum(int(r["succeeded"]) for r in rows)
    failed = sum(int(r["failed"]) for r in rows)
    spend = round_usd(
        sum((Decimal(r["spend_usd"]) + Decimal(r["unattributed_usd"]) for r in rows), Decimal(0))
    )
    sync = round_usd(sum((Decimal(r["sync_usd"]) for r in rows), Decimal(0)))
    return {
        "tasks_in": sum(int(r["tasks_in"]) for r in rows),
        "succeeded": succeeded,
        "failed": failed,
        "retried": sum(int(r["retried"]) for r in rows),
        "replayed": sum(int(r["replayed"]) for r in rows),
        "failure_ratio": _ratio(failed, succeeded + failed),
        "manual_queue": manual,
        "spend_usd": str(spend),
        "sync_equivalent_usd": str(sync),
        "savings_usd": str(sync - spend),
    }


def render_clients(rows: list[dict[str, Any]]) -> str:
    """Each client's share of each day."""
    heads = [
        "date",
        "client",
        "in",
        "ok",
        "failed",
        "retried",
        "replayed",
        "fail%",
        "manual",
        "spend $",
        "saved $",
    ]
    body = [
        [
            r["date"],
            name,
            v["tasks_in"],
            v["succeeded"],
            v["failed"],
            v["retried"],
            v["replayed"],
            f"{v['failure_ratio'] * 100:.2f}",
            v["manual_queue"],
            v["spend_usd"],
            v["savings_usd"],
        ]
        for r in rows
        for name, v in sorted(r.get("clients", {}).items())
    ]
    return _grid(heads, body)


def _percentile(hist: dict[int, int], q: float) -> float | None:
    n = sum(hist.values())
    if not n:
        return None
    rank, seen = q * n, 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            # The bucket's geometric middle.
            return 0.01 * 2 ** ((bucket + 0.5) / LATENCY_BUCKETS_PER_DOUBLING)
    return None  # pragma: no cover - seen reaches n >= rank


def _lane(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = sum(int(r["lane_succeeded"]) for r in rows)
    failed = sum(int(r["lane_failed"]) for r in rows)
    done = ok + failed
    spend = sum((Decimal(r["lane_spend_usd"]) for r in rows), Decimal(0))
    hist: dict[int, int] = collections.Counter()
    for r in rows:
        for bucket, n in (r["latency"] or {}).items():
            hist[int(bucket)] += int(n)
    p50, p95 = _percentile(hist, 0.5), _percentile(hist, 0.95)
    return {
        "finished": done,
        "succeeded": ok,
        "failed": failed,
        "failure_ratio": _ratio(failed, done),
        "spend_usd": str(round_usd(spend)),
        "cost_per_task_usd": str(round_usd(spend / done)) if done else "0.000000",
        "latency_p50_seconds": round(p50, 3) if p50 is not None else None,
        "latency_p95_seconds": round(p95, 3) if p95 is not None else None,
    }


def _providers(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The day by provider: its results and failures, and its spend as the
    day's total counts it (results, billed lines no task kept, unkept sync
    calls), so the providers' exact spend adds up to spend_usd."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({str(r["provider"]) for r in rows}):
        mine = [r for r in rows if r["provider"] == name]
        succeeded = sum(int(r["succeeded"]) for r in mine)
        failed = sum(int(r["failed"]) for r in mine)
        spend = sum(
            (Decimal(r["spend_usd"]) + Decimal(r["unattributed_usd"]) for r in mine), Decimal(0)
        )
        sync = sum((Decimal(r["sync_usd"]) for r in mine), Decimal(0))
        if not (succeeded or failed or spend):
            continue  # tasks only arrived: nothing finished or paid there yet
        out[name] = {
            "succeeded": succeeded,
            "failed": failed,
            "spend_usd": str(round_usd(spend)),
            "sync_equivalent_usd": str(round_usd(sync)),
            "savings_usd": str(round_usd(sync - spend)),
        }
    return out


def render_providers(rows: list[dict[str, Any]]) -> str:
    """Each provider's share of each day."""
    heads = ["date", "provider", "ok", "failed", "spend $", "sync $", "saved $"]
    body = [
        [
            r["date"],
            name,
            v["succeeded"],
            v["failed"],
            v["spend_usd"],
            v["sync_equivalent_usd"],
            v["savings_usd"],
        ]
        for r in rows
        for name, v in sorted(r.get("providers", {}).items())
    ]
    return _grid(heads, body)


def render_lanes(rows: list[dict[str, Any]]) -> str:
    """Batch against sync, per day: the numbers a switch-over is decided on."""
    heads = ["date", "lane", "finished", "fail%", "$/task", "p50 s", "p95 s"]
    body = [
        [
            r["date"],
            lane,
            v["finished"],
            f"{v['failure_ratio'] * 100:.2f}",
            v["cost_per_task_usd"],
            v["latency_p50_seconds"],
            v["latency_p95_seconds"],
        ]
        for r in rows
        for lane, v in sorted(r.get("lanes", {}).items())
    ]
    return _grid(heads, body)


def render_table(rows: list[dict[str, Any]]) -> str:
    heads = [
        "date",
        "in",
        "ok",
        "failed",
        "cancelled",
        "retried",
        "replayed",
        "fail%",
        "post-replay%",
        "manual",
        "spend $",
        "sync $",
        "saved $",
        "alert",
    ]
    body = [
        [
            r["date"],
            r["tasks_in"],
            r["succeeded"],
            r["failed"],
            r.get("cancelled", 0),
            r["retried"],
            r["replayed"],
            f"{r['failure_ratio'] * 100:.2f}",
            f"{r['post_replay_success_ratio'] * 100:.2f}",
            r["manual_queue"],
            r["spend_usd"],
            r["sync_equivalent_usd"],
            r["savings_usd"],
            "ALERT" if r["alert"] else "",
        ]
        for r in rows
    ]
    table = _grid(heads, body)
    unpriced = sorted({m for r in rows for m in r.get("unpriced_models", [])})
    if unpriced:
        table += "\n\nunpriced models (priced as the table's most expensive entry): " + ", ".join(
            unpriced
        )
    wasted = [r for r in rows if Decimal(r.get("unattributed_usd", "0"))]
    if wasted:
        table += "\n\nbilled lines no task kept (in spend): " + ", ".join(
            f"{r['date']} ${r['unattributed_usd']}" for r in wasted
        )
    if any(len(r.get("lanes", {})) > 1 or "sync" in r.get("lanes", {}) for r in rows):
        table += "\n\n" + render_lanes(rows)
    # One client's share is the whole report; two or more say who sent what.
    if any(len(r.get("clients", {})) > 1 for r in rows):
        table += "\n\n" + render_clients(rows)
    if any(set(r.get("providers", {})) - {"openai"} for r in rows):
        table += "\n\n" + render_providers(rows)
    return table


def _grid(heads: list[str], body: list[list[Any]]) -> str:
    cells = [heads] + [[str(c) for c in line] for line in body]
    widths = [max(len(line[i]) for line in cells) for i in range(len(heads))]
    out = []
    for n, line in enumerate(cells):
        out.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "unpriced_models": ";".join(r.get("unpriced_models", []))} for r in rows)
    return buf.getvalue()
