"""The daily report (DESIGN section 8): per UTC day, what came in, how it ended,
what it cost and what batching saved."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd.prices import round_usd

FIELDS = ("date", "tasks_in", "succeeded", "failed", "retried", "replayed", "failure_ratio",
          "post_replay_success_ratio", "manual_queue", "spend_usd", "sync_equivalent_usd",
          "savings_usd", "alert")

_DAY = text("""
WITH bounds AS (SELECT CAST(:start AS timestamptz) AS lo, CAST(:end AS timestamptz) AS hi),
ev AS (
    SELECT outcome, count(*) AS n FROM task_events, bounds
    WHERE created_at >= lo AND created_at < hi GROUP BY outcome
), money AS (
    SELECT coalesce(sum(cost_usd), 0) AS spend, coalesce(sum(sync_cost_usd), 0) AS sync
    FROM results, bounds WHERE created_at >= lo AND created_at < hi
)
SELECT
    (SELECT count(*) FROM tasks, bounds WHERE created_at >= lo AND created_at < hi) AS tasks_in,
    coalesce((SELECT n FROM ev WHERE outcome = 'succeeded'), 0) AS succeeded,
    coalesce((SELECT n FROM ev WHERE outcome = 'failed'), 0) AS failed,
    coalesce((SELECT n FROM ev WHERE outcome = 'retried'), 0) AS retried,
    coalesce((SELECT n FROM ev WHERE outcome = 'replayed'), 0) AS replayed,
    (SELECT count(*) FROM tasks, bounds WHERE state = 'failed'
        AND finished_at >= lo AND finished_at < hi) AS manual_queue,
    (SELECT spend FROM money) AS spend, (SELECT sync FROM money) AS sync
""")


def _ratio(num: int, den: int) -> float:
    return round(num / den, 6) if den else 0.0


class Reporter:
    def __init__(self, engine: AsyncEngine, alert_ratio: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.engine = engine
        self.alert_ratio = alert_ratio
        self.clock = clock

    async def day(self, day: date) -> dict[str, Any]:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        async with self.engine.connect() as conn:
            row = (await conn.execute(_DAY, {"start": start, "end": start + timedelta(days=1)})
                   ).mappings().one()
        succeeded, failed = int(row["succeeded"]), int(row["failed"])
        still_failed = int(row["manual_queue"])
        spend, sync = Decimal(row["spend"]), Decimal(row["sync"])
        failure_ratio = _ratio(failed, succeeded + failed)
        return {
            "date": day.isoformat(),
            "tasks_in": int(row["tasks_in"]),
            "succeeded": succeeded,
            "failed": failed,
            "retried": int(row["retried"]),
            "replayed": int(row["replayed"]),
            "failure_ratio": failure_ratio,
            # Of the tasks that failed this day, those since recovered by a
            # replay count as successes here.
            "post_replay_success_ratio": _ratio(succeeded + failed - still_failed,
                                                succeeded + failed) if succeeded + failed
            else 1.0,
            "manual_queue": still_failed,
            "spend_usd": str(round_usd(spend)),
            "sync_equivalent_usd": str(round_usd(sync)),
            "savings_usd": str(round_usd(sync - spend)),
            "alert": failure_ratio > self.alert_ratio,
        }

    async def daily(self, end: date | None = None, days: int = 1) -> list[dict[str, Any]]:
        last = end or self.clock().date()
        return [await self.day(last - timedelta(days=i)) for i in range(days - 1, -1, -1)]


def render_table(rows: list[dict[str, Any]]) -> str:
    heads = ["date", "in", "ok", "failed", "retried", "replayed", "fail%", "post-replay%",
             "manual", "spend $", "sync $", "saved $", ""]
    body = [[r["date"], r["tasks_in"], r["succeeded"], r["failed"], r["retried"], r["replayed"],
             f"{r['failure_ratio'] * 100:.2f}", f"{r['post_replay_success_ratio'] * 100:.2f}",
             r["manual_queue"], r["spend_usd"], r["sync_equivalent_usd"], r["savings_usd"],
             "ALERT" if r["alert"] else ""] for r in rows]
    cells = [heads] + [[str(c) for c in line] for line in body]
    widths = [max(len(line[i]) for line in cells) for i in range(len(heads))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths, strict=True))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
