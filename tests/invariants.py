"""The crash-safety invariants, checked from batchd's tables and the
emulator's record of what it received (``Emulator.record()`` or
``GET /_emulator/record``).

What must hold after any crash, kill, database outage or provider fault:

* every accepted task is stored, and the counts by state add up to them;
  once ``settled``, every task is in exactly one terminal state;
* no custom_id is live in two batches (ours or the provider's);
* results are a subset of the succeeded tasks, and each success is stored once;
* ``attempts`` equals the submissions the provider saw for that task (a
  token-limited batch gives its attempt back; replays reset the count);
* no set of tasks was created twice at the provider: one provider batch per
  batchd batch id, and every provider batch is the one recorded for it (a
  duplicate is tolerated only if it was cancelled before any line ran).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

LIVE_PROVIDER = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL = frozenset({"succeeded", "failed"})


@dataclass
class Report:
    tasks: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    provider_batches: int = 0
    lost: int = 0  # accepted but absent, or not terminal when settled was asked
    duplicated: int = 0  # extra submissions, extra provider batches, extra stored successes
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def fail(self, what: str, items: Iterable[Any] = ()) -> None:
        shown = list(items)[:5]
        self.violations.append(f"{what}{': ' + repr(shown) if shown else ''}")

    def summary(self) -> str:
        states = " ".join(f"{k}={v}" for k, v in sorted(self.by_state.items()))
        return (f"tasks={self.tasks} {states} provider_batches={self.provider_batches} "
                f"lost={self.lost} duplicated={self.duplicated} "
                f"violations={len(self.violations)}")


async def _rows(engine: AsyncEngine, sql: str) -> list[Any]:
    async with engine.connect() as conn:
        return list(await conn.execute(text(sql)))


async def check(engine: AsyncEngine, record: dict[str, Any], *,
                accepted: Iterable[str] | None = None, settled: bool = True) -> Report:
    """Every invariant above; ``accepted`` is the custom_ids callers got a 202 for."""
    r = Report()
    tasks = {row.custom_id: row for row in await _rows(engine, """
        SELECT custom_id, state, attempts, batch_id, replay_count, lane FROM tasks""")}
    r.tasks = len(tasks)
    r.by_state = dict(collections.Counter(t.state for t in tasks.values()))

    # 1. Nothing accepted is missing; states add up; terminal once settled.
    if accepted is not None:
        missing = set(accepted) - tasks.keys()
        r.lost += len(missing)
        if missing:
            r.fail(f"{len(missing)} accepted task(s) are not stored", sorted(missing))
    if sum(r.by_state.values()) != r.tasks:
        r.fail("task counts by state do not add up")
    if settled:
        open_ = [cid for cid, t in tasks.items() if t.state not in TERMINAL]
        r.lost += len(open_)
        if open_:
            r.fail(f"{len(open_)} task(s) never reached a terminal state", open_)

    # 2. A submitted task sits in one live batch of ours; no custom_id in two
    #    live provider batches.
    batches = {row.id: row for row in await _rows(engine, """
        SELECT id, state, provider_batch_id FROM batches""")}
    stray = [cid for cid, t in tasks.items() if t.state == "submitted" and t.lane == "batch"
             and (t.batch_id not in batches or batches[t.batch_id].state == "routed")]
    if stray:
        r.fail(f"{len(stray)} submitted task(s) point at no live batch", stray)
    live_at_provider: collections.Counter[str] = collections.Counter()
    for b in record["batches"]:
        if b["status"] in LIVE_PROVIDER:
            live_at_provider.update(set(b["custom_ids"]))
    twice_live = [cid for cid, n in live_at_provider.items() if n > 1]
    if twice_live:
        r.fail(f"{len(twice_live)} custom_id(s) live in two provider batches", twice_live)

    # 3. Results ⊆ succeeded tasks; each success stored once.
    results = [row.custom_id for row in await _rows(engine, "SELECT custom_id FROM results")]
    not_succeeded = [cid for cid in results if cid not in tasks
                     or tasks[cid].state != "succeeded"]
    if not_succeeded:
        r.fail(f"{len(not_succeeded)} result(s) for tasks not succeeded", not_succeeded)
    without = {cid for cid, t in tasks.items() if t.state == "succeeded"} - set(results)
    if without:
        r.fail(f"{len(without)} succeeded task(s) without a result", sorted(without))
    twice_ok = [row.custom_id for row in await _rows(engine, """
        SELECT e.custom_id FROM task_events e JOIN tasks t USING (custom_id)
        WHERE e.outcome = 'succeeded' GROUP BY e.custom_id, t.replay_count
        HAVING count(*) > t.replay_count + 1""")]
    r.duplicated += len(twice_ok)
    if twice_ok:
        r.fail(f"{len(twice_ok)} success(es) stored more than once", twice_ok)

    # 5. (before 4: it decides which provider batches count) One provider
    #    batch per batchd batch, and it is the recorded one.
    r.provider_batches = len(record["batches"])
    by_ours: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for b in record["batches"]:
        ours = (b.get("metadata") or {}).get("batchd_batch_id")
        by_ours[str(ours)].append(b)
    counted: list[dict[str, Any]] = []
    for ours, group in by_ours.items():
        row = batches.get(ours)
        recorded = row.provider_batch_id if row is not None else None
        for b in group:
            if b["id"] == recorded:
                counted.append(b)
                continue
            if row is None or recorded is None:
                # Created at the provider, never adopted: its tasks were sent again.
                r.duplicated += 1
                r.fail(f"provider batch {b['id']} ({ours}) is not recorded in batches")
                counted.append(b)
            elif b["status"] in ("cancelling", "cancelled") and b["cancel_requested"] \
                    and b["request_counts"].get("completed", 0) == 0:
                continue  # a duplicate cancelled before any line ran costs nothing
            else:
                r.duplicated += 1
                r.fail(f"provider batch {b['id']} duplicates {recorded} for {ours} "
                       f"(status {b['status']})")
                counted.append(b)

    # 4. attempts == submissions the provider saw (token-limited batches give
    #    the attempt back; a replay resets the count, so it may only be lower).
    seen: collections.Counter[str] = collections.Counter(record.get("sync_submissions") or {})
    for b in counted:
        if "token_limit_exceeded" in (b.get("error_codes") or []):
            continue
        seen.update(b["custom_ids"])
    for cid in seen.keys() - tasks.keys():
        r.fail(f"the provider saw {cid!r}, which batchd never stored")
    over, under = [], []
    for cid, t in tasks.items():
        n = seen.get(cid, 0)
        if t.replay_count == 0 and t.attempts != n:
            (over if t.attempts > n else under).append((cid, t.attempts, n))
        elif t.replay_count > 0 and t.attempts > n:
            over.append((cid, t.attempts, n))
    if over:
        r.fail(f"{len(over)} task(s) count attempts the provider never saw "
               "(custom_id, attempts, submissions)", over)
    if under:
        r.duplicated += sum(n - a for _, a, n in under)
        r.fail(f"{len(under)} task(s) were submitted more often than counted "
               "(custom_id, attempts, submissions)", under)
    return r
