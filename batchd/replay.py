"""The manual queue: failed tasks, their export, and replay back into the queue."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from batchd import jsonl, logs
from batchd.domain import input_line
from batchd.store import manual_queue

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
        return {
            verb: len(self.replayed),
            "custom_ids": self.replayed,
            "skipped": [{"custom_id": k, "reason": v} for k, v in self.skipped.items()],
        }


async def _settle(
    conn: AsyncConnection,
    outcome: ReplayOutcome,
    done: list[tuple[str, str]],
    keys: list[tuple[str, str]] | None,
    client: str | None,
) -> None:
    """Fill ``outcome``: the custom_ids acted on, and for each named task
    left alone the reason. Another client's custom_id reads as unknown."""
    outcome.replayed = [cid for _, cid in done]
    if keys is None:
        return
    rest = sorted(set(keys) - set(done))
    states = await manual_queue.task_states(conn, rest)
    outcome.skipped = {
        cid: _WHY_NOT.get(states.get((cl, cid), ""), "unknown custom_id")
        for cl, cid in rest
        if client is None or cl == client
    }


def _keys(client: str | None, custom_ids: list[str] | None) -> list[tuple[str, str]] | None:
    """``client``'s custom_ids as task keys; None (all) when none are named."""
    if custom_ids is None:
        return None
    if client is None:
        raise ValueError("name the client whose tasks these custom_ids are")
    return [(client, c) for c in custom_ids]


class Replayer:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def replay(self, client: str | None, custom_ids: list[str] | None) -> ReplayOutcome:
        """Re-queue failed tasks with their attempts reset and ``replay_count +
        1``: the named custom_ids of ``client``, or (``custom_ids`` None) all
        of ``client``'s failed tasks, every client's when ``client`` is None.
        Tasks that are not failed are left alone and reported with the
        reason; another client's custom_id is as unknown as one never sent."""
        return await self.replay_keys(_keys(client, custom_ids), client)

    async def replay_keys(
        self, keys: list[tuple[str, str]] | None, client: str | None = None
    ) -> ReplayOutcome:
        """As ``replay``, the tasks named by (client, custom_id) keys (all of
        ``client``'s, or everyone's, when ``keys`` is None)."""
        outcome = ReplayOutcome()
        async with self.engine.begin() as conn:
            done = await manual_queue.replay_failed(conn, client, keys)
            await _settle(conn, outcome, done, keys, client)
        log.info("tasks.replayed", replayed=len(outcome.replayed), skipped=len(outcome.skipped))
        return outcome

    async def dismiss(self, client: str | None, custom_ids: list[str] | None) -> ReplayOutcome:
        """Take failed tasks out of the manual queue, for good, chosen as
        ``replay`` chooses them: they are kept until retention deletes them
        like any finished task, but never replayed. Export them first
        (``batchd failed export``): the export is then their only copy."""
        return await self.dismiss_keys(_keys(client, custom_ids), client)

    async def dismiss_keys(
        self, keys: list[tuple[str, str]] | None, client: str | None = None
    ) -> ReplayOutcome:
        """As ``dismiss``, the tasks named by (client, custom_id) keys (all of
        ``client``'s, or everyone's, when ``keys`` is None)."""
        outcome = ReplayOutcome()
        async with self.engine.begin() as conn:
            done = await manual_queue.dismiss_failed(conn, client, keys)
            await _settle(conn, outcome, done, keys, client)
        log.info("tasks.dismissed", dismissed=len(outcome.replayed), skipped=len(outcome.skipped))
        return outcome

    async def export_failed(self, out: Path, client: str | None = None) -> int:
        """Write the manual queue (``client``'s, or every client's) as JSONL:
        the original request, whose task it is, and the last error."""
        n = 0
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("wb") as f:
            async for row in self._failed_rows(client):
                f.write(orjson.dumps(row) + b"\n")
                n += 1
        tmp.replace(out)
        return n

    async def _failed_rows(self, client: str | None) -> AsyncIterator[dict[str, Any]]:
        async with self.engine.connect() as conn:
            async for r in manual_queue.stream_failed(conn, client):
                yield export_line(r)


def export_line(r: Mapping[Any, Any]) -> dict[str, Any]:
    """One line of a failed export (``batchd failed export``, the console's
    export): whose task it is, the original request and how it failed."""
    return {
        "client": r["client"],
        "custom_id": r["custom_id"],
        "method": "POST",
        "url": r["endpoint"],
        "body": r["body"],
        "metadata": r["metadata"],
        "attempts": r["attempts"],
        "replay_count": r["replay_count"],
        "batch_id": r["batch_id"],
        "last_error": r["last_error"],
        "failed_at": r["finished_at"].isoformat() if r["finished_at"] else None,
    }


def read_failed_export(path: Path) -> Iterable[dict[str, Any]]:
    """Lines of a ``failed export`` file; a bad line stops with its number
    (JsonlError, a ValueError)."""
    for n, row in jsonl.objects(path):
        if not isinstance(row.get("custom_id"), str):
            raise jsonl.JsonlError(path, n, "has no custom_id; is this a failed export?")
        yield row


def write_input_file(rows: Iterable[dict[str, Any]], out: Path) -> int:
    """A fresh provider input file from exported failed lines, for inspection."""
    n = 0
    with out.open("wb") as f:
        for row in rows:
            f.write(
                input_line(
                    row["custom_id"],
                    row.get("url") or row.get("endpoint") or "/v1/chat/completions",
                    row["body"],
                )
            )
            n += 1
    return n
