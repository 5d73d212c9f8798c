"""The crash-safety invariants, checked from batchd's tables and each
emulator's record of what it received (``Emulator.record()`` or
``GET /_emulator/record``; the Anthropic and Gemini emulators' too, by
provider name). What the database alone shows is batchd's own
checker (``batchd check``, batchd/check.py); this adds what needs the
provider's record.

What must hold after any crash, kill, database outage or provider fault:

* every accepted task is stored, and the counts by state add up to them;
  once ``settled``, every task is in exactly one terminal state;
* no task is live in two batches (ours or the provider's);
* results are a subset of the succeeded tasks, and each success is stored once;
* ``attempts`` equals the submissions the provider saw for that task (a
  token-limited batch gives its attempt back; replays reset the count);
* no set of tasks was created twice at the provider: one provider batch per
  batchd batch id, and every provider batch is the one recorded for it (a
  duplicate is tolerated only if it was cancelled before any line ran);
* isolation: results, events and callbacks are stored under their own task's
  (client, custom_id), and provider files carry batchd's line ids, never a
  caller's custom_id.
* every job's counters (its row plus the deltas not folded yet) equal its
  tasks counted by state, and its money the sum of its results' costs; a
  cancelled task is in no batch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd.check import check as batchd_check
from batchd.domain import line_task_id

# Live at the provider, in each emulator's words (OpenAI's, Anthropic's, Gemini's).
LIVE_PROVIDER = frozenset(
    {
        "validating",
        "in_progress",
        "finalizing",
        "cancelling",
        "canceling",
        "BATCH_STATE_PENDING",
        "BATCH_STATE_RUNNING",
    }
)
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


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
        return (
            f"tasks={self.tasks} {states} provider_batches={self.provider_batches} "
            f"lost={self.lost} duplicated={self.duplicated} "
            f"violations={len(self.violations)}"
        )


async def _rows(engine: AsyncEngine, sql: str) -> list[Any]:
    async with engine.connect() as conn:
        return list(await conn.execute(text(sql)))


def _ours(provider: str, b: dict[str, Any], by_remote: dict[str, str]) -> str | None:
    """The batchd batch id a provider batch was created for: its metadata
    (OpenAI family), its display name (Gemini), or, where a batch carries
    neither (Anthropic), the batch row that recorded it."""
    if provider == "gemini":
        name = str(b.get("display_name") or "")
        return name.removeprefix("batchd-") if name.startswith("batchd-") else None
    if provider == "anthropic":
        return by_remote.get(b["id"])
    return (b.get("metadata") or {}).get("batchd_batch_id")


def _ran_nothing(b: dict[str, Any]) -> bool:
    if "billed" in b:
        return not b["billed"]
    return bool(b["request_counts"].get("completed", 0) == 0)


def _cancelled(b: dict[str, Any]) -> bool:
    status = str(b["status"])
    return bool(b.get("cancel_requested")) and (
        status in ("cancelling", "cancelled", "canceling", "ended", "BATCH_STATE_CANCELLED")
    )


Key = tuple[str, str]  # (client, custom_id): a task as its caller names it


def _key(item: str | Key) -> Key:
    return ("local", item) if isinstance(item, str) else item


async def check(
    engine: AsyncEngine,
    record: dict[str, Any],
    *,
    accepted: Iterable[str | Key] | None = None,
    settled: bool = True,
) -> Report:
    """Every invariant above; ``accepted`` is what callers got a 202 for: custom_ids
    (client ``local``) or (client, custom_id) keys. ``record`` is one OpenAI
    emulator's record, or records by provider name."""
    records: dict[str, dict[str, Any]] = {"openai": record} if "batches" in record else record
    r = Report()
    by_id = {
        row.id: row
        for row in await _rows(
            engine,
            """
        SELECT id, client, custom_id, state, attempts, batch_id, replay_count, lane
        FROM tasks""",
        )
    }
    tasks = {(t.client, t.custom_id): t for t in by_id.values()}
    r.tasks = len(tasks)
    r.by_state = dict(collections.Counter(t.state for t in tasks.values()))

    def task_of(provider_id: str) -> int | None:
        """The task a provider line names: batchd's line id, or (a batch sent
        before line ids) the one task with that custom_id."""
        tid = line_task_id(provider_id)
        if tid is not None:
            return tid if tid in by_id else None
        found = [t.id for t in by_id.values() if t.custom_id == provider_id]
        return found[0] if len(found) == 1 else None

    # 1. Nothing accepted is missing; states add up; terminal once settled.
    if accepted is not None:
        missing = {_key(a) for a in accepted} - tasks.keys()
        r.lost += len(missing)
        if missing:
            r.fail(f"{len(missing)} accepted task(s) are not stored", sorted(missing))
    if sum(r.by_state.values()) != r.tasks:
        r.fail("task counts by state do not add up")
    if settled:
        open_ = [key for key, t in tasks.items() if t.state not in TERMINAL]
        r.lost += len(open_)
        if open_:
            r.fail(f"{len(open_)} task(s) never reached a terminal state", open_)

    # 2, 3 and the database's own invariants (one live batch per submitted
    #    task, the ledger, results = successes stored once, no orphans, the
    #    daily counters): what `batchd check` verifies on a live database.
    for breach in await batchd_check(engine, retention_days=36_500):
        if breach.code == "success_stored_twice":
            r.duplicated += breach.count
        r.fail(breach.line())
    batches = {
        row.id: row
        for row in await _rows(
            engine,
            """
        SELECT id, state, provider_batch_id FROM batches""",
        )
    }
    by_remote = {row.provider_batch_id: row.id for row in batches.values() if row.provider_batch_id}
    provider_batches = [(provider, b) for provider, rec in records.items() for b in rec["batches"]]

    # No task in two live provider batches (only the providers' records show it).
    live_at_provider: collections.Counter[int | str] = collections.Counter()
    for _, b in provider_batches:
        if b["status"] in LIVE_PROVIDER:
            live_at_provider.update({task_of(c) or c for c in b["custom_ids"]})
    twice_live = [k for k, n in live_at_provider.items() if n > 1]
    if twice_live:
        r.fail(f"{len(twice_live)} task(s) live in two provider batches", twice_live)

    # 5. (before 4: it decides which provider batches count) One provider
    #    batch per batchd batch, and it is the recorded one.
    r.provider_batches = len(provider_batches)
    by_ours: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    ours_of: dict[str, str | None] = {}
    for provider, b in provider_batches:
        ours_of[b["id"]] = _ours(provider, b, by_remote)
        by_ours[str(ours_of[b["id"]])].append(b)
    counted: list[dict[str, Any]] = []
    for ours, group in by_ours.items():
        row = batches.get(ours)
        recorded = row.provider_batch_id if row is not None else None
        for b in group:
            if b["id"] == recorded:
                counted.append(b)
                continue
            if (row is None or recorded is None) and _cancelled(b) and _ran_nothing(b):
                continue  # an orphan cancelled before any line ran costs nothing
            if row is None or recorded is None:
                # Created at the provider, never adopted: its tasks were sent again.
                r.duplicated += 1
                r.fail(f"provider batch {b['id']} ({ours}) is not recorded in batches")
                counted.append(b)
            elif _cancelled(b) and _ran_nothing(b):
                continue  # a duplicate cancelled before any line ran costs nothing
            else:
                r.duplicated += 1
                r.fail(
                    f"provider batch {b['id']} duplicates {recorded} for {ours} "
                    f"(status {b['status']})"
                )
                counted.append(b)

    # 4. attempts == submissions the provider saw (token-limited batches give
    #    the attempt back; a replay resets the count, so it may only be lower).
    sent: collections.Counter[str] = collections.Counter()
    for rec in records.values():
        sent.update(rec.get("sync_submissions") or {})
    for b in counted:
        if "token_limit_exceeded" in (b.get("error_codes") or []):
            continue
        sent.update(b["custom_ids"])
    seen: collections.Counter[int] = collections.Counter()
    for cid, n in sent.items():
        tid = task_of(cid)
        if tid is None:
            r.fail(f"the provider saw {cid!r}, which names no task batchd stored")
        else:
            seen[tid] += n
    over: list[tuple[str, int, int]] = []
    under: list[tuple[str, int, int]] = []
    for tid, t in by_id.items():
        n = seen.get(tid, 0)
        if t.replay_count == 0 and t.attempts != n:
            (over if t.attempts > n else under).append((t.custom_id, t.attempts, n))
        elif t.replay_count > 0 and t.attempts > n:
            over.append((t.custom_id, t.attempts, n))
    if over:
        r.fail(
            f"{len(over)} task(s) count attempts the provider never saw "
            "(custom_id, attempts, submissions)",
            over,
        )
    if under:
        r.duplicated += sum(n - a for _, a, n in under)
        r.fail(
            f"{len(under)} task(s) were submitted more often than counted "
            "(custom_id, attempts, submissions)",
            under,
        )

    # 6. Isolation: whatever is stored about a task is under its own client
    #    and custom_id, so no client can read, replay or be called back with
    #    another's; and the provider never saw a caller's custom_id in a
    #    batch built with line ids.
    crossed = await _rows(
        engine,
        """
        SELECT 'result' AS what, r.task_id FROM results r JOIN tasks t ON t.id = r.task_id
        WHERE r.client <> t.client OR r.custom_id <> t.custom_id
        UNION ALL
        SELECT 'event', e.task_id FROM task_events e JOIN tasks t ON t.id = e.task_id
        WHERE e.client <> t.client OR e.custom_id <> t.custom_id
        UNION ALL
        SELECT 'callback', c.task_id FROM callbacks c JOIN tasks t ON t.id = c.task_id
        WHERE c.client IS DISTINCT FROM t.client OR c.custom_id <> t.custom_id
        UNION ALL
        SELECT 'unkeyed ' || x.what, NULL FROM (
            SELECT 'result' AS what FROM results WHERE task_id IS NULL
            UNION ALL SELECT 'event' FROM task_events WHERE task_id IS NULL
            UNION ALL SELECT 'callback' FROM callbacks WHERE task_id IS NULL AND job IS NULL
        ) x""",
    )
    if crossed:
        r.fail(
            f"{len(crossed)} row(s) stored under another task's client or custom_id",
            [(row.what, row.task_id) for row in crossed],
        )
    own = {row.id for row in await _rows(engine, "SELECT id FROM batches WHERE own_line_ids")}
    leaked = [
        c
        for _, b in provider_batches
        if ours_of[b["id"]] in own
        for c in b["custom_ids"]
        if line_task_id(c) is None
    ]
    if leaked:
        r.fail(f"{len(leaked)} provider line(s) carry an id that is not batchd's", leaked)
    # 6. Job counters.
    for problem in await job_counter_problems(engine):
        r.fail(problem)
    # Attempts equal submissions (4.), so a cancelled task was sent only for
    # attempts it made before it came back to the queue; it is in no batch.
    in_batch = [cid for cid, t in tasks.items() if t.state == "cancelled" and t.batch_id]
    if in_batch:
        r.fail(f"{len(in_batch)} cancelled task(s) sit in a batch", in_batch)
    return r


_JOB_COUNTS = ("tasks", "queued", "submitted", "succeeded", "failed", "cancelled")


async def job_counter_problems(engine: AsyncEngine) -> list[str]:
    """Each job whose kept counters differ from its tasks counted now."""
    kept = {
        (row.client, row.job): row
        for row in await _rows(
            engine,
            f"""
        SELECT j.client, j.job,
               {", ".join(f"j.{c} + coalesce(d.{c}, 0) AS {c}" for c in _JOB_COUNTS)},
               j.spend_usd + coalesce(d.spend, 0) AS spend,
               j.sync_equivalent_usd + coalesce(d.sync, 0) AS sync
        FROM jobs j LEFT JOIN (
            SELECT client, job, {", ".join(f"sum({c}) AS {c}" for c in _JOB_COUNTS)},
                   sum(spend_usd) AS spend, sum(sync_usd) AS sync
            FROM job_deltas GROUP BY client, job) d USING (client, job)""",
        )
    }
    counted = {
        (row.client, row.job): row
        for row in await _rows(
            engine,
            """
        SELECT coalesce(t.client, 'local') AS client, t.job, count(*) AS tasks,
               count(*) FILTER (WHERE t.state = 'queued') AS queued,
               count(*) FILTER (WHERE t.state = 'submitted') AS submitted,
               count(*) FILTER (WHERE t.state = 'succeeded') AS succeeded,
               count(*) FILTER (WHERE t.state IN ('failed', 'dismissed')) AS failed,
               count(*) FILTER (WHERE t.state = 'cancelled') AS cancelled,
               coalesce(sum(r.cost_usd), 0) AS spend, coalesce(sum(r.sync_cost_usd), 0) AS sync
        FROM tasks t LEFT JOIN results r ON t.state = 'succeeded' AND r.task_id = t.id
        WHERE t.job IS NOT NULL GROUP BY 1, 2""",
        )
    }
    problems = []
    for key in sorted(kept.keys() | counted.keys()):
        have, want = kept.get(key), counted.get(key)
        if want is None:
            if have is not None and any(getattr(have, c) for c in _JOB_COUNTS):
                problems.append(f"job {key} counts tasks it does not have")
            continue
        if have is None:
            problems.append(f"job {key} has tasks but no row")
            continue
        off = {
            c: (int(getattr(have, c)), int(getattr(want, c)))
            for c in (*_JOB_COUNTS, "spend", "sync")
            if getattr(have, c) != getattr(want, c)
        }
        if off:
            problems.append(f"job {key} counters (kept, counted) differ: {off}")
    return problems
