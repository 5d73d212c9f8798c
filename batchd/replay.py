"""The manual queue: failed tasks, their export, and replay back into the queue."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs
from batchd.domain import input_line
from batchd.store import retention
from batchd.store.jobs import moved_deltas

log = logs.get("batchd.replay")

_WHY_NOT = {
    "succeeded": "already succeeded; its result is stored, replaying would pay twice",
    "queued": "already queued (replayed before, or retrying)",
    "submitted": "in a live batch now",
    "dismissed": "dismissed from the manual queue by an operator",
    "cancelled": "cancelled with its job; submit it again in a new job to run it",
}


@dataclass(slots=True)
class ReplayOutcome:
    replayed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def as_json(self, verb: str = "replayed") -> dict[str, Any]:
        return {verb: len(self.replayed), "custom_ids": self.replayed,
                "skipped": [{"custom_id": k, "reason": v} for k, v in self.skipped.items()]}


class Replayer:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def replay(self, custom_ids: list[str] | None) -> ReplayOutcome:
        """Re-queue failed tasks (all when ``custom_ids`` is None) with their
        attempts reset and ``replay_count + 1``. Tasks that are not failed are
        left alone and reported with the reason."""
        outcome = ReplayOutcome()
        async with self.engine.begin() as conn:
            rows = await conn.execute(text(f"""
                WITH upd AS (
                    UPDATE tasks SET state = 'queued', attempts = 0,
                           replay_count = replay_count + 1, not_before = now(),
                           batch_id = NULL, finished_at = NULL, updated_at = now()
                    WHERE state = 'failed'
                      AND (CAST(:ids AS text[]) IS NULL OR custom_id = ANY(CAST(:ids AS text[])))
                    RETURNING custom_id, replay_count, last_error, client, job
                ), jd AS ({moved_deltas("upd", "'failed'", "'queued'")}
                ), ev AS (
                    INSERT INTO task_events (custom_id, attempt, outcome, error)
                    SELECT custom_id, 0, 'replayed', last_error FROM upd
                )
                SELECT custom_id FROM upd"""), {"ids": custom_ids})
            outcome.replayed = [r[0] for r in rows]
            if custom_ids is not None:
                rest = sorted(set(custom_ids) - set(outcome.replayed))
                found = await conn.execute(text(
                    "SELECT custom_id, state FROM tasks WHERE custom_id = ANY(CAST(:ids AS text[]))"
                ), {"ids": rest})
                states: dict[str, str] = dict(found.all())
                outcome.skipped = {cid: _WHY_NOT.get(states.get(cid, ""), "unknown custom_id")
                                   for cid in rest}
        log.info("tasks.replayed", replayed=len(outcome.replayed), skipped=len(outcome.skipped))
        return outcome

    async def dismiss(self, custom_ids: list[str] | None) -> ReplayOutcome:
        """Take failed tasks (all when ``custom_ids`` is None) out of the
        manual queue, for good: they are kept until retention deletes them
        like any finished task, but never replayed. Export them first
        (``batchd failed export``): the export is then their only copy."""
        outcome = ReplayOutcome()
        async with self.engine.begin() as conn:
            outcome.replayed = await retention.dismiss_failed(conn, custom_ids)
            if custom_ids is not None:
                rest = sorted(set(custom_ids) - set(outcome.replayed))
                states = await retention.task_states(conn, rest)
                outcome.skipped = {cid: _WHY_NOT.get(states.get(cid, ""), "unknown custom_id")
                                   for cid in rest}
        log.info("tasks.dismissed", dismissed=len(outcome.replayed),
                 skipped=len(outcome.skipped))
        return outcome

    async def export_failed(self, out: Path) -> int:
        """Write the manual queue as JSONL: the original request and the last error."""
        n = 0
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("wb") as f:
            async for row in self._failed_rows():
                f.write(orjson.dumps(row) + b"\n")
                n += 1
        tmp.replace(out)
        return n

    async def _failed_rows(self) -> AsyncIterator[dict[str, Any]]:
        async with self.engine.connect() as conn:
            result = await conn.stream(text("""
                SELECT custom_id, endpoint, body, metadata, attempts, replay_count, batch_id,
                       last_error, finished_at FROM tasks WHERE state = 'failed' ORDER BY id"""))
            async for part in result.mappings().partitions(1000):
                for r in part:
                    yield export_line(r)


def export_line(r: Mapping[Any, Any]) -> dict[str, Any]:
    """One line of a failed export (``batchd failed export``, the console's
    export): the original request and how it failed."""
    return {"custom_id": r["custom_id"], "method": "POST", "url": r["endpoint"],
            "body": r["body"], "metadata": r["metadata"],
            "attempts": r["attempts"], "replay_count": r["replay_count"],
            "batch_id": r["batch_id"], "last_error": r["last_error"],
            "failed_at": r["finished_at"].isoformat() if r["finished_at"] else None}


def read_failed_export(path: Path) -> Iterable[dict[str, Any]]:
    """Lines of a ``failed export`` file; a bad line stops with its number."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ValueError(f"{path}:{n} is not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("custom_id"), str):
                raise ValueError(f"{path}:{n} has no custom_id; is this a failed export?")
            yield row


def write_input_file(rows: Iterable[dict[str, Any]], out: Path) -> int:
    """A fresh provider input file from exported failed lines, for inspection."""
    n = 0
    with out.open("wb") as f:
        for row in rows:
            f.write(input_line(row["custom_id"], row.get("url") or row.get("endpoint")
                               or "/v1/chat/completions", row["body"]))
            n += 1
    return n
