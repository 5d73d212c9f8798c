"""HTTP payloads → validated tasks → the store, all or nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.domain import InvalidTask, TaskIn, parse_task
from batchd.store import repo

log = logs.get("batchd.ingest")


class IngestError(Exception):
    """A request the API refuses; ``status`` and ``code`` go into the reply."""

    def __init__(self, status: int, code: str, message: str,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or {}


@dataclass(frozen=True, slots=True)
class Accepted:
    accepted: int
    duplicates: int
    tasks: list[dict[str, str]]

    def as_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicates": self.duplicates, "tasks": self.tasks}


def decode_payload(raw: bytes, content_type: str) -> list[Any]:
    """The task objects of a request body: one task, {"tasks": [...]}, or NDJSON."""
    if "ndjson" in content_type or "jsonl" in content_type:
        items = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise IngestError(400, "invalid_json", f"line {n} is not valid JSON: {exc}") \
                    from None
        return items
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise IngestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and "tasks" in doc and "custom_id" not in doc:
        tasks = doc["tasks"]
        if not isinstance(tasks, list):
            raise IngestError(400, "invalid_request", '"tasks" must be a list of task objects')
        return tasks
    return [doc]


def validate(items: list[Any], max_tasks: int, max_line_bytes: int) -> list[TaskIn]:
    """Parse every task; the first invalid one refuses the whole request."""
    if not items:
        raise IngestError(400, "invalid_request", "the request holds no tasks")
    if len(items) > max_tasks:
        raise IngestError(413, "too_many_tasks",
                          f"a request may hold at most {max_tasks} tasks; split it")
    tasks: dict[str, TaskIn] = {}
    for index, item in enumerate(items):
        try:
            task = parse_task(item, index)
        except InvalidTask as exc:
            raise IngestError(400, "invalid_task", str(exc),
                              {"index": exc.index, "custom_id": exc.custom_id,
                               "field": exc.field}) from None
        if task.line_bytes > max_line_bytes:
            raise IngestError(413, "task_too_large",
                              f"task {index} ({task.custom_id!r}) is {task.line_bytes} bytes, "
                              f"more than a provider input file may hold ({max_line_bytes})")
        seen = tasks.get(task.custom_id)
        if seen is not None and seen.digest != task.digest:
            raise IngestError(409, "conflict",
                              f"custom_id {task.custom_id!r} appears twice with different bodies",
                              {"custom_ids": [task.custom_id]})
        tasks.setdefault(task.custom_id, task)
    return list(tasks.values())


class Ingest:
    def __init__(self, engine: AsyncEngine, *, max_tasks: int = 10_000,
                 max_line_bytes: int = 200 * 1024 * 1024) -> None:
        self.engine = engine
        self.max_tasks = max_tasks
        self.max_line_bytes = max_line_bytes

    async def submit(self, items: list[Any]) -> Accepted:
        tasks = validate(items, self.max_tasks, self.max_line_bytes)
        async with self.engine.begin() as conn:
            result = await repo.insert_tasks(conn, tasks)
            if result.conflicts:
                # Raising rolls the transaction back: nothing of this request stays.
                raise IngestError(
                    409, "conflict",
                    f"{len(result.conflicts)} custom_id(s) already exist with a different body: "
                    f"{', '.join(result.conflicts[:5])}",
                    {"custom_ids": result.conflicts[:100]})
        metrics.TASKS_RECEIVED.inc(len(result.inserted))
        states = [{"custom_id": cid, "state": "queued"} for cid in result.inserted]
        states += [{"custom_id": cid, "state": st} for cid, st in result.duplicates.items()]
        n_dupes = len(result.duplicates) + (len(items) - len(tasks))
        log.debug("tasks.accepted", accepted=len(result.inserted), duplicates=n_dupes)
        return Accepted(len(result.inserted), n_dupes, states)
