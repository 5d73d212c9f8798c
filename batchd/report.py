"""The daily report (DESIGN section 8): per UTC day, what came in, how it ended,
what it cost and what batching saved.

Counts come from ``task_events`` (one row per attempt outcome), so a day's
numbers do not change when its tasks move on later, except
``post_replay_success_ratio``, which by definition looks at them now. Money
is summed from exact amounts (prices.py) and each column rounded once, when
shown: savings is the exact sync equivalent less the exact spend, rounded, so
it may differ by 1e-6 from the difference of the two rounded columns.
README "Daily report" defines every column.
"""

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

FIELDS = ("date", "tasks_in", "succeeded", "failed", "cancelled", "retried", "replayed",
          "failure_ratio",
          "post_replay_success_ratio", "manual_queue", "spend_usd", "sync_equivalent_usd",
          "savings_usd", "unattributed_usd", "unpriced_models", "alert")

# :client narrows every count to one client's tasks (NULL: all clients).
# Unattributed spend (billed lines no task kept) belongs to no client, so a
# client's report shows none; the all-clients report carries it.
_DAY = text("""
WITH bounds AS (SELECT CAST(:start AS timestamptz) AS lo, CAST(:end AS timestamptz) AS hi,
                       CAST(:client AS text) AS who),
ev AS (
    SELECT outcome, count(*) AS n FROM task_events, bounds
    WHERE created_at >= lo AND created_at < hi AND (who IS NULL OR client = who)
    GROUP BY outcome
), money AS (
    SELECT coalesce(sum(cost_usd), 0) AS spend, coalesce(sum(sync_cost_usd), 0) AS sync
    FROM results, bounds
    WHERE created_at >= lo AND created_at < hi AND (who IS NULL OR client = who)
), unattributed AS (
    SELECT coalesce(sum(unattributed_cost_usd), 0) AS usd FROM batches, bounds
    WHERE routed_at >= lo AND routed_at < hi AND who IS NULL
), sync_unkept AS (
    -- Sync calls answered and paid whose task had moved on (no result kept).
    SELECT coalesce(sum(s.cost_usd), 0) AS usd FROM sync_spend s, bounds
    WHERE s.settled_at >= lo AND s.settled_at < hi AND s.cost_usd > 0 AND who IS NULL
      AND NOT EXISTS (SELECT 1 FROM results r
                      WHERE r.task_id = s.task_id AND r.batch_id = s.claim_id)
), finished AS (
    SELECT DISTINCT task_id FROM task_events, bounds
    WHERE created_at >= lo AND created_at < hi AND outcome IN ('succeeded', 'failed')
      AND (who IS NULL OR client = who)
), manual AS (
    -- Failed is left by a replay or a dismissal: a task is in the manual queue
    -- at the day's end when its last failure before then is newer than both.
    SELECT count(*) AS n FROM (
        SELECT max(id) FILTER (WHERE outcome = 'failed') AS f,
               max(id) FILTER (WHERE outcome IN ('replayed', 'dismissed')) AS r
        FROM task_events, bounds
        WHERE outcome IN ('failed', 'replayed', 'dismissed') AND created_at < hi
          AND (who IS NULL OR client = who)
        GROUP BY coalesce(task_id, -id)) s
    WHERE f IS NOT NULL AND (r IS NULL OR f > r)
)
SELECT
    (SELECT count(*) FROM tasks, bounds WHERE created_at >= lo AND created_at < hi
       AND (who IS NULL OR client = who)) AS tasks_in,
    coalesce((SELECT n FROM ev WHERE outcome = 'succeeded'), 0) AS succeeded,
    coalesce((SELECT n FROM ev WHERE outcome = 'failed'), 0) AS failed,
    coalesce((SELECT n FROM ev WHERE outcome = 'cancelled'), 0) AS cancelled,
    coalesce((SELECT n FROM ev WHERE outcome = 'retried'), 0) AS retried,
    coalesce((SELECT n FROM ev WHERE outcome = 'replayed'), 0) AS replayed,
    (SELECT count(*) FROM finished) AS finished,
    -- A probe per finished task by its id (a join could hash all of tasks).
    (SELECT count(*) FROM finished f
     WHERE (SELECT t.state FROM tasks t WHERE t.id = f.task_id) = 'succeeded'
    ) AS finished_ok_now,
    (SELECT n FROM manual) AS manual_queue,
    (SELECT spend FROM money) AS spend, (SELECT sync FROM money) AS sync,
    (SELECT usd FROM unattributed) + (SELECT usd FROM sync_unkept) AS unattributed
""")

_UNPRICED = text("""
SELECT DISTINCT model FROM (
    SELECT b.model FROM batches b
    WHERE b.unpriced AND b.routed_at >= CAST(:start AS timestamptz)
      AND b.routed_at < CAST(:end AS timestamptz) AND CAST(:client AS text) IS NULL
    UNION ALL
    SELECT t.model FROM results r JOIN tasks t ON t.id = r.task_id
    WHERE r.unpriced AND r.created_at >= CAST(:start AS timestamptz)
      AND r.created_at < CAST(:end AS timestamptz)
      AND (CAST(:client AS text) IS NULL OR r.client = :client)
) u ORDER BY model
""")


# Each client's numbers for the day (the all-clients report lists them).
_BY_CLIENT = text("""
WITH bounds AS (SELECT CAST(:start AS timestamptz) AS lo, CAST(:end AS timestamptz) AS hi),
ins AS (
    SELECT client, count(*) AS n FROM tasks, bounds
    WHERE created_at >= lo AND created_at < hi GROUP BY client
), ev AS (
    SELECT client, count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
           count(*) FILTER (WHERE outcome = 'failed') AS failed,
           count(*) FILTER (WHERE outcome = 'retried') AS retried,
           count(*) FILTER (WHERE outcome = 'replayed') AS replayed
    FROM task_events, bounds WHERE created_at >= lo AND created_at < hi GROUP BY client
), money AS (
    SELECT client, sum(cost_usd) AS spend, sum(sync_cost_usd) AS sync FROM results, bounds
    WHERE created_at >= lo AND created_at < hi GROUP BY client
), manual AS (
    SELECT client, count(*) AS n FROM (
        SELECT client, max(id) FILTER (WHERE outcome = 'failed') AS f,
               max(id) FILTER (WHERE outcome IN ('replayed', 'dismissed')) AS r
        FROM task_events, bounds
        WHERE outcome IN ('failed', 'replayed', 'dismissed') AND created_at < hi
        GROUP BY client, coalesce(task_id, -id)) s
    WHERE f IS NOT NULL AND (r IS NULL OR f > r) GROUP BY client
), named AS (
    SELECT client FROM ins UNION SELECT client FROM ev UNION SELECT client FROM money
    UNION SELECT client FROM manual
)
SELECT c.client, coalesce(ins.n, 0) AS tasks_in, coalesce(ev.succeeded, 0) AS succeeded,
       coalesce(ev.failed, 0) AS failed, coalesce(ev.retried, 0) AS retried,
       coalesce(ev.replayed, 0) AS replayed, coalesce(manual.n, 0) AS manual_queue,
       coalesce(money.spend, 0) AS spend, coalesce(money.sync, 0) AS sync
FROM named c LEFT JOIN ins USING (client) LEFT JOIN ev USING (client)
LEFT JOIN money USING (client) LEFT JOIN manual USING (client)
ORDER BY c.client
""")


# The two lanes side by side, for tasks that finished in the day: what a task
# cost, how often it failed, how long it took from ingest to its result.
_LANES = text("""
SELECT t.lane,
       count(*) FILTER (WHERE t.state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE t.state = 'failed') AS failed,
       coalesce(sum((SELECT r.cost_usd FROM results r WHERE r.task_id = t.id)), 0)
         AS spend,
       percentile_cont(0.5) WITHIN GROUP (
           ORDER BY extract(epoch FROM t.finished_at - t.created_at)) AS p50,
       percentile_cont(0.95) WITHIN GROUP (
           ORDER BY extract(epoch FROM t.finished_at - t.created_at)) AS p95
FROM tasks t
WHERE t.finished_at >= CAST(:start AS timestamptz) AND t.finished_at < CAST(:end AS timestamptz)
  AND t.state IN ('succeeded', 'failed')
  AND (CAST(:client AS text) IS NULL OR t.client = :client)
GROUP BY t.lane
""")


def _ratio(num: int, den: int) -> float:
    return round(num / den, 6) if den else 0.0


class Reporter:
    def __init__(self, engine: AsyncEngine, alert_ratio: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.engine = engine
        self.alert_ratio = alert_ratio
        self.clock = clock

    async def day(self, day: date, client: str | None = None) -> dict[str, Any]:
        """One day's report: ``client``'s numbers, or every client's (None)."""
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        bounds = {"start": start, "end": start + timedelta(days=1), "client": client}
        async with self.engine.connect() as conn:
            row = (await conn.execute(_DAY, bounds)).mappings().one()
            unpriced = [r[0] for r in await conn.execute(_UNPRICED, bounds)]
            lanes = {r["lane"]: _lane(r) for r in (await conn.execute(_LANES, bounds)).mappings()}
            clients = ({} if client is not None else
                       {r["client"]: _client(r) for r in
                        (await conn.execute(_BY_CLIENT, bounds)).mappings()})
        succeeded, failed = int(row["succeeded"]), int(row["failed"])
        finished = int(row["finished"])
        unattributed = Decimal(row["unattributed"])
        spend = Decimal(row["spend"]) + unattributed
        sync = Decimal(row["sync"])
        failure_ratio = _ratio(failed, succeeded + failed)
        return {
            "date": day.isoformat(),
            "tasks_in": int(row["tasks_in"]),
            "succeeded": succeeded,
            "failed": failed,
            "cancelled": int(row["cancelled"]),
            "retried": int(row["retried"]),
            "replayed": int(row["replayed"]),
            "failure_ratio": failure_ratio,
            "post_replay_success_ratio": (_ratio(int(row["finished_ok_now"]), finished)
                                          if finished else 1.0),
            "manual_queue": int(row["manual_queue"]),
            "spend_usd": str(round_usd(spend)),
            "sync_equivalent_usd": str(round_usd(sync)),
            "savings_usd": str(round_usd(sync - spend)),
            "unattributed_usd": str(round_usd(unattributed)),
            "unpriced_models": unpriced,
            "alert": failure_ratio > self.alert_ratio,
            "lanes": lanes,
            # Every client's share (the all-clients report only); a client's
            # spend is its results' cost: unattributed spend is no client's.
            **({"clients": clients} if client is None else {"client": client}),
        }

    async def daily(self, end: date | None = None, days: int = 1, client: str | None = None
                    ) -> list[dict[str, Any]]:
        last = end or self.clock().date()
        return [await self.day(last - timedelta(days=i), client)
                for i in range(days - 1, -1, -1)]


def _client(r: Any) -> dict[str, Any]:
    succeeded, failed = int(r["succeeded"]), int(r["failed"])
    spend, sync = round_usd(Decimal(r["spend"])), round_usd(Decimal(r["sync"]))
    return {"tasks_in": int(r["tasks_in"]), "succeeded": succeeded, "failed": failed,
            "retried": int(r["retried"]), "replayed": int(r["replayed"]),
            "failure_ratio": _ratio(failed, succeeded + failed),
            "manual_queue": int(r["manual_queue"]), "spend_usd": str(spend),
            "sync_equivalent_usd": str(sync), "savings_usd": str(sync - spend)}


def render_clients(rows: list[dict[str, Any]]) -> str:
    """Each client's share of each day."""
    heads = ["date", "client", "in", "ok", "failed", "retried", "replayed", "fail%", "manual",
             "spend $", "saved $"]
    body = [[r["date"], name, v["tasks_in"], v["succeeded"], v["failed"], v["retried"],
             v["replayed"], f"{v['failure_ratio'] * 100:.2f}", v["manual_queue"],
             v["spend_usd"], v["savings_usd"]]
            for r in rows for name, v in sorted(r.get("clients", {}).items())]
    return _grid(heads, body)


def _lane(r: Any) -> dict[str, Any]:
    done = int(r["succeeded"]) + int(r["failed"])
    spend = Decimal(r["spend"])
    return {
        "finished": done, "succeeded": int(r["succeeded"]), "failed": int(r["failed"]),
        "failure_ratio": _ratio(int(r["failed"]), done),
        "spend_usd": str(round_usd(spend)),
        "cost_per_task_usd": str(round_usd(spend / done)) if done else "0.000000",
        "latency_p50_seconds": round(float(r["p50"]), 3) if r["p50"] is not None else None,
        "latency_p95_seconds": round(float(r["p95"]), 3) if r["p95"] is not None else None,
    }


def render_lanes(rows: list[dict[str, Any]]) -> str:
    """Batch against sync, per day: the numbers a switch-over is decided on."""
    heads = ["date", "lane", "finished", "fail%", "$/task", "p50 s", "p95 s"]
    body = [[r["date"], lane, v["finished"], f"{v['failure_ratio'] * 100:.2f}",
             v["cost_per_task_usd"], v["latency_p50_seconds"], v["latency_p95_seconds"]]
            for r in rows for lane, v in sorted(r.get("lanes", {}).items())]
    return _grid(heads, body)


def render_table(rows: list[dict[str, Any]]) -> str:
    heads = ["date", "in", "ok", "failed", "cancelled", "retried", "replayed", "fail%",
             "post-replay%", "manual", "spend $", "sync $", "saved $", "alert"]
    body = [[r["date"], r["tasks_in"], r["succeeded"], r["failed"], r.get("cancelled", 0),
             r["retried"], r["replayed"],
             f"{r['failure_ratio'] * 100:.2f}", f"{r['post_replay_success_ratio'] * 100:.2f}",
             r["manual_queue"], r["spend_usd"], r["sync_equivalent_usd"], r["savings_usd"],
             "ALERT" if r["alert"] else ""] for r in rows]
    table = _grid(heads, body)
    unpriced = sorted({m for r in rows for m in r.get("unpriced_models", [])})
    if unpriced:
        table += ("\n\nunpriced models (priced as the table's most expensive entry): "
                  + ", ".join(unpriced))
    wasted = [r for r in rows if Decimal(r.get("unattributed_usd", "0"))]
    if wasted:
        table += "\n\nbilled lines no task kept (in spend): " + ", ".join(
            f"{r['date']} ${r['unattributed_usd']}" for r in wasted)
    if any(len(r.get("lanes", {})) > 1 or "sync" in r.get("lanes", {}) for r in rows):
        table += "\n\n" + render_lanes(rows)
    # One client's share is the whole report; two or more say who sent what.
    if any(len(r.get("clients", {})) > 1 for r in rows):
        table += "\n\n" + render_clients(rows)
    return table


def _grid(heads: list[str], body: list[list[Any]]) -> str:
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
    writer = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "unpriced_models": ";".join(r.get("unpriced_models", []))}
                     for r in rows)
    return buf.getvalue()
