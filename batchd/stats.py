"""``batchd stats``: what the database holds and what a task costs in it:
table and index sizes, tasks by state, the oldest rows, bytes per task."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from batchd.store import retention


async def collect(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        tables = await retention.table_sizes(conn)
        indexes = await retention.index_sizes(conn)
        states = await retention.tasks_by_state(conn)
        oldest = await retention.oldest_rows(conn)
        database = await retention.database_bytes(conn)
    tasks = sum(states.values())
    return {
        "database_bytes": database,
        "tasks": tasks,
        "tasks_by_state": states,
        "bytes_per_task": round(database / tasks) if tasks else None,
        "tables": tables,
        "indexes": indexes,
        "oldest": {
            k: (v.isoformat() if isinstance(v, datetime) else (str(v) if v is not None else None))
            for k, v in oldest.items()
        },
    }


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop returns at GB


def render(stats: dict[str, Any]) -> str:
    lines = [
        f"database: {_size(stats['database_bytes'])}, {stats['tasks']} task(s)"
        + (f", {stats['bytes_per_task']} bytes a task" if stats["bytes_per_task"] else ""),
        "tasks by state: "
        + (", ".join(f"{k}={v}" for k, v in sorted(stats["tasks_by_state"].items())) or "none"),
        "",
        f"{'table':<20} {'total':>10} {'heap':>10} {'indexes':>10} {'toast':>10} "
        f"{'rows~':>12} {'dead':>10}",
    ]
    for t in stats["tables"]:
        lines.append(
            f"{t['name']:<20} {_size(t['total']):>10} {_size(t['heap']):>10} "
            f"{_size(t['indexes']):>10} {_size(t['toast']):>10} "
            f"{t['rows_estimate']:>12} {t['dead_rows']:>10}"
        )
    lines += ["", "oldest rows:"]
    lines += [f"  {k}: {v or '-'}" for k, v in stats["oldest"].items()]
    return "\n".join(lines)
