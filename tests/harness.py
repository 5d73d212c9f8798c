"""A running batchd for tests: service + emulator + SDK adapter + HTTP client.

Tests drive the scheduler and poller tick by tick (``cycle``) so each step is
deterministic, while every byte still crosses real sockets: HTTP into our
API, the openai SDK into the emulator, asyncpg into PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd.config import Settings, load_settings
from batchd.emulator.openai import Emulator
from batchd.provider.base import Provider
from batchd.provider.openai import OpenAIProvider
from batchd.service import Service
from batchd.store.engine import make_engine
from batchd.web import SPEC
from tests.spec import SpecCheck

API_KEY = "test-key"


class FakeClock:
    """A clock tests move by hand (the budget's day, the report's day)."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Harness:
    settings: Settings
    engine: AsyncEngine
    emulator: Emulator
    provider: OpenAIProvider
    service: Service
    http: aiohttp.ClientSession
    base_url: str
    spec: SpecCheck

    async def post(
        self, payload: Any, *, ndjson: bool = False, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        if ndjson:
            data = b"\n".join(orjson.dumps(t) for t in payload)
            hdrs = {"Content-Type": "application/x-ndjson", **(headers or {})}
        else:
            data = orjson.dumps(payload)
            hdrs = {"Content-Type": "application/json", **(headers or {})}
        async with self.http.post(f"{self.base_url}/v1/tasks", data=data, headers=hdrs) as r:
            return r.status, await r.json()

    async def get(
        self, path: str, headers: dict[str, str] | None = None, **params: str
    ) -> tuple[int, Any]:
        async with self.http.get(f"{self.base_url}{path}", params=params, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def post_json(
        self, path: str, doc: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.http.post(f"{self.base_url}{path}", json=doc, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def put_json(
        self, path: str, doc: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.http.put(f"{self.base_url}{path}", json=doc, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def task_as(self, custom_id: str, headers: dict[str, str]) -> dict[str, Any]:
        status, body = await self.get(f"/v1/tasks/{custom_id}", headers=headers)
        assert status == 200, body
        return dict(body)

    async def flush(self, *, drain: bool = False) -> int:
        started = await self.service.scheduler.tick(drain=drain)
        await self.service.scheduler.wait_sends()
        return started

    async def cycle(self, *, drain: bool = False, rounds: int = 50) -> None:
        """Flush due windows and poll until no batch is left in flight."""
        for _ in range(rounds):
            await self.flush(drain=drain)
            await self.make_polls_due()
            await self.service.poller.tick()
            if await self.live_batches() == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("batches still in flight after many cycles")

    async def run_until_settled(self, rounds: int = 60) -> None:
        """Drain every task to a terminal state, retries included."""
        for _ in range(rounds):
            await self.expire_backoffs()
            await self.cycle(drain=True)
            if await self.count("state IN ('queued','submitted')") == 0:
                return
        raise AssertionError("tasks did not settle")

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(text(sql), params)).scalar()

    async def rows(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            return [dict(r) for r in (await conn.execute(text(sql), params)).mappings()]

    async def execute(self, sql: str, **params: Any) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text(sql), params)

    async def count(self, where: str, table: str = "tasks") -> int:
        return int(await self.scalar(f"SELECT count(*) FROM {table} WHERE {where}"))

    async def live_batches(self) -> int:
        return await self.count("state <> 'routed'", "batches")

    async def queued(self) -> int:
        return await self.count("state = 'queued'")

    async def make_polls_due(self) -> None:
        await self.execute("UPDATE batches SET next_poll_at = now() WHERE state = 'submitted'")

    async def expire_backoffs(self) -> None:
        await self.execute("UPDATE tasks SET not_before = now() WHERE state = 'queued'")

    async def drain_sync(self, rounds: int = 50) -> None:
        """Run the sync lane, backoffs expired, until no sync task is left open."""
        for _ in range(rounds):
            await self.expire_backoffs()
            await self.service.sync_lane.tick()
            await self.service.sync_lane.wait_calls()
            if await self.count("lane = 'sync' AND state IN ('queued', 'submitted')") == 0:
                return
        raise AssertionError("sync lane did not settle")

    async def age_queue(self, seconds: float) -> None:
        await self.execute(
            "UPDATE tasks SET not_before = not_before - make_interval(secs => :s)"
            " WHERE state = 'queued'",
            s=seconds,
        )

    async def key(self, custom_id: str, client: str = "local") -> str:
        """The emulator's script and submission key of a task: batchd sends it
        under its own line ids, which the emulator counts per task."""
        task_id = await self.scalar(
            "SELECT id FROM tasks WHERE client = :cl AND custom_id = :cid", cl=client, cid=custom_id
        )
        assert task_id is not None, (client, custom_id)
        return f"t{task_id}"

    async def task(self, custom_id: str) -> dict[str, Any]:
        status, body = await self.get(f"/v1/tasks/{custom_id}")
        assert status == 200, body
        return dict(body)


def chat_task(
    custom_id: str,
    model: str = "gpt-4o-mini",
    *,
    emulate: str | None = None,
    content: str = "hello",
    **extra: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
    }
    if emulate:
        body["metadata"] = {"emulate": emulate}
    return {"custom_id": custom_id, "body": body, **extra}


@asynccontextmanager
async def running(
    db_url: str,
    tmp_path: Path,
    *,
    emulator: Emulator | None = None,
    clock: Callable[[], datetime] | None = None,
    providers: dict[str, Provider] | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """A batchd with its API on a free loopback port and an emulator beside it;
    ``providers`` adds other configured providers (the caller runs their
    emulators and closes nothing: the service closes every provider)."""
    emu = emulator or Emulator(api_key=API_KEY)
    emu_url = await emu.start()
    settings_kw: dict[str, Any] = {
        "database_url": db_url,
        "data_dir": tmp_path / "data",
        "http_port": 0,
        "window_seconds": 900,
        "max_batch_items": 500,
        "poll_interval_seconds": 1,
        "retry_backoff_seconds": 1,
        "openai_base_url": emu_url,
        "log_level": "warning",
    }
    settings_kw.update(overrides)
    settings = load_settings(**settings_kw)
    engine = make_engine(db_url, pool_size=5, pool_timeout=settings.ingest_timeout_seconds)
    provider = OpenAIProvider(api_key=API_KEY, base_url=emu_url, max_retries=0)
    kwargs = {"clock": clock} if clock else {}
    service = Service(settings, engine, {"openai": provider, **(providers or {})}, **kwargs)
    # Outermost, so it sees each reply as the caller does.
    spec = SpecCheck(orjson.loads(service.app[SPEC]))
    service.app.middlewares.insert(0, spec.middleware())
    runner: web.AppRunner = await service.start_api()
    http = aiohttp.ClientSession()
    try:
        yield Harness(
            settings, engine, emu, provider, service, http, f"http://127.0.0.1:{service.port}", spec
        )
        assert not spec.violations, "replies that break the OpenAPI document:\n" + "\n".join(
            spec.violations[:20]
        )
    finally:
        await http.close()
        await service.scheduler.wait_sends()
        await service.callbacks.wait_deliveries()
        await service.callbacks.close()
        await runner.cleanup()
        await service.api.ingest.close()
        await service.api.waiters.close()
        for p in service.providers.values():
            await p.close()
        await engine.dispose()
        await emu.stop()
