"""Provider status → outcomes.

Each tick leases the submitted batches that are due for a look (SKIP LOCKED,
so replicas share them), asks the provider for each one's status and, once
it is terminal, downloads the output and error files to the spool and hands
them to the router. A batch whose check fails is released with a delay and
looked at again; nothing about it changes until the router commits.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import logs, metrics
from batchd.archive import Archive
from batchd.config import Settings
from batchd.errors import ProviderError
from batchd.loops import run_ticks
from batchd.provider.base import Providers, RemoteBatch, pick
from batchd.router import Router
from batchd.store.batches import NOW, claim_due_batches, release_batch, set_batch
from batchd.store.routing import schedule_poll

log = logs.get("batchd.poller")

_CHECK_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class PollerConfig:
    """The settings the poller reads."""

    lease_seconds: float
    poll_interval_seconds: float

    @classmethod
    def from_settings(cls, s: Settings) -> PollerConfig:
        return cls(s.lease_seconds, s.poll_interval_seconds)


class Poller:
    def __init__(
        self,
        engine: AsyncEngine,
        providers: Providers,
        router: Router,
        config: PollerConfig,
        archive: Archive,
        owner: str,
    ) -> None:
        self.engine = engine
        self.providers = providers
        self.router = router
        self.config = config
        self.archive = archive
        self.owner = owner
        self._slots = asyncio.Semaphore(_CHECK_CONCURRENCY)

    async def run(self, stop: asyncio.Event) -> None:
        # Tick faster than the poll interval: each batch carries its own
        # next_poll_at, and a quick tick picks up newly submitted ones soon.
        interval = min(self.config.poll_interval_seconds, 5.0)
        await run_ticks(
            stop,
            self.tick,
            logger=log,
            event="poller.tick_failed",
            interval=lambda _routed: interval,
        )

    async def tick(self) -> int:
        """Check every due batch once; returns how many were routed."""
        async with self.engine.begin() as conn:
            due = await claim_due_batches(conn, self.owner, self.config.lease_seconds)
        results = await asyncio.gather(*(self._check_guarded(b) for b in due))
        # A tick counts as a success only if it reached the provider (or had
        # nothing to ask): a poller whose every check fails must look stuck.
        if not due or any(r is not None for r in results):
            metrics.POLLER_LAST_SUCCESS.set(time.time())
        return sum(1 for r in results if r)

    async def _check_guarded(self, batch: dict[str, Any]) -> bool | None:
        """Whether the batch was routed; None when the check failed."""
        async with self._slots:
            try:
                return await self.check(batch)
            except ProviderError as exc:
                delay = exc.retry_after or self.config.poll_interval_seconds
                log.warning(
                    "batch.check_failed",
                    batch_id=batch["id"],
                    operation=exc.operation,
                    status=exc.status,
                    code=exc.code,
                    retry_in=delay,
                )
            except Exception:
                delay = self.config.poll_interval_seconds
                log.exception("batch.check_crashed", batch_id=batch["id"])
            async with self.engine.begin() as conn:
                await release_batch(
                    conn, batch["id"], self.owner, delay * (1 + random.random() * 0.2)
                )
                await set_batch(conn, batch["id"], next_poll_at=NOW)
            return None

    async def check(self, batch: dict[str, Any]) -> bool:
        provider = pick(self.providers, batch["provider"], "get_batch")
        remote = await provider.get_batch(batch["provider_batch_id"])
        if not remote.terminal:
            async with self.engine.begin() as conn:
                await set_batch(
                    conn,
                    batch["id"],
                    provider_status=remote.status,
                    request_counts=remote.request_counts,
                    lease_owner=None,
                    lease_until=None,
                )
                await schedule_poll(conn, batch["id"], self.config.poll_interval_seconds)
            return False
        files = await self._download(batch["id"], batch["provider"], remote)
        summary = await self.router.route(
            batch["id"], batch["model"], remote, [p for _, p in files], provider=batch["provider"]
        )
        if summary.already_routed:
            for _, path in files:
                path.unlink(missing_ok=True)  # the router that won archived them
            return False
        if batch["submitted_at"] is not None:
            metrics.BATCH_TURNAROUND.observe(time.time() - batch["submitted_at"].timestamp())
        for kind, path in files:
            await self.archive.keep(
                path, batch["spend_day"], batch["id"], kind, {"provider_batch_id": remote.id}
            )
            path.unlink(missing_ok=True)
        return True

    async def _download(
        self, batch_id: str, provider_name: str, remote: RemoteBatch
    ) -> list[tuple[str, Path]]:
        provider = pick(self.providers, provider_name, "download_file")
        files = []
        for kind, file_id in (("output", remote.output_file_id), ("error", remote.error_file_id)):
            if not file_id:
                continue
            path = self.archive.spool_path(batch_id, kind)
            try:
                await provider.download_file(file_id, path)
            except ProviderError as exc:
                if exc.status != 404:
                    raise
                # The provider deleted the file (expiry): its lines can never be
                # read, so its tasks are settled as missing and retried.
                log.error("batch.file_gone", batch_id=batch_id, kind=kind, file_id=file_id)
                path.unlink(missing_ok=True)
                continue
            files.append((kind, path))
        return files
