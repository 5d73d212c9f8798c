"""Composition root: builds every part from settings and runs the loops."""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import os
import socket
import time
from pathlib import Path

from aiohttp import web
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import __version__, console, console_jobs, logs, metrics, tokens
from batchd.archive import Archive
from batchd.callbacks import CallbackConfig, CallbackSender
from batchd.clients import Clients
from batchd.config import Settings, compatible_providers
from batchd.daily import DailyReport
from batchd.domain import DEFAULT_ENDPOINT, LOCAL, Routing, route_provider
from batchd.errors import ConfigError
from batchd.estimates import Calibration
from batchd.health import HEALTH
from batchd.ingest import Ingest, IngestConfig
from batchd.jobs import Jobs
from batchd.listener import CappedSite
from batchd.poller import Poller, PollerConfig
from batchd.prices import PriceTable
from batchd.provider.base import Provider, Providers, registry
from batchd.replay import Replayer
from batchd.report import Reporter
from batchd.retention import Retention
from batchd.router import Router
from batchd.scheduler import Clock, Scheduler, SchedulerConfig, utc_now
from batchd.snapshots import Snapshots
from batchd.spool_sweep import SpoolSweep
from batchd.store.engine import make_engine, resolve_url
from batchd.store.routing import Backoff, release_owner
from batchd.sync_lane import SyncConfig, SyncLane
from batchd.waiters import Waiters
from batchd.web import ApiState, build_app

log = logs.get("batchd.service")

_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_ROOT / "migrations"))
    cfg.set_main_option("path_separator", "os")
    if url:
        cfg.attributes["url"] = url
    return cfg


def schema_head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def known_revisions() -> frozenset[str]:
    return frozenset(
        s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()
    )


async def migrate(url: str) -> None:
    """alembic upgrade head; env.py runs its own event loop, hence the thread."""
    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")


async def open_engine(settings: Settings) -> tuple[AsyncEngine, str]:
    url = await resolve_url(settings.database_url, settings.data_dir)
    return make_engine(url, pool_timeout=settings.ingest_timeout_seconds), url


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_provider(settings: Settings) -> dict[str, Provider]:
    """Every configured provider's SDK adapter, by name (DESIGN section 14).

    A provider is configured by its key, or by a base URL alone (an
    emulator). Refuses to start when none is, in one line that says how.
    Each SDK is imported only when its provider is configured: anthropic and
    google-genai take seconds to import, and a replica should start fast."""
    from batchd.provider.openai import OpenAIProvider, azure_provider, compatible_provider

    timeout = settings.provider_timeout_seconds
    out: dict[str, Provider] = {}
    openai_key, azure_key, anthropic_key, gemini_key = (
        k.get_secret_value() if k else None
        for k in (
            settings.openai_api_key,
            settings.azure_openai_api_key,
            settings.anthropic_api_key,
            settings.gemini_api_key,
        )
    )
    if openai_key or settings.openai_base_url:
        out["openai"] = OpenAIProvider(
            api_key=openai_key or "emulator", base_url=settings.openai_base_url, timeout=timeout
        )
    if azure_key or settings.azure_openai_endpoint:
        if not (azure_key and settings.azure_openai_endpoint):
            raise ConfigError(
                "AZURE_OPENAI_API_KEY and AZURE_OPENAI_ENDPOINT: set both to use "
                "Azure OpenAI, or neither"
            )
        out["azure"] = azure_provider(
            azure_key, settings.azure_openai_endpoint, settings.azure_api_version, timeout=timeout
        )
    if anthropic_key or settings.anthropic_base_url:
        from batchd.provider.anthropic import AnthropicProvider

        out["anthropic"] = AnthropicProvider(
            anthropic_key or "emulator", settings.anthropic_base_url, timeout=timeout
        )
    if gemini_key or settings.gemini_base_url:
        from batchd.provider.gemini import GeminiProvider

        out["gemini"] = GeminiProvider(
            gemini_key or "emulator",
            settings.gemini_base_url,
            timeout=timeout,
            inline_max_bytes=settings.gemini_inline_max_bytes,
        )
    for name, (url, key) in compatible_providers().items():
        out[f"openai_compatible:{name}"] = compatible_provider(
            name, key or "none", url, timeout=timeout
        )
    if not out:
        raise ConfigError(
            "OPENAI_API_KEY is unset: set it, or point BATCHD_OPENAI_BASE_URL "
            "at an emulator, or run `batchd demo` (or configure another "
            "provider: ANTHROPIC_API_KEY, GEMINI_API_KEY, AZURE_OPENAI_API_KEY)"
        )
    return out


class Service:
    """Everything one replica runs: API, scheduler, poller (with router), snapshots."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        provider: Provider | Providers,
        clock: Clock = utc_now,
    ) -> None:
        self.clients = Clients.from_settings(settings)
        if not self.clients.required and not is_loopback(settings.http_host):
            raise ConfigError(
                "BATCHD_INGEST_TOKENS is unset, so the API listens on loopback "
                "only: set tokens or BATCHD_HTTP_HOST=127.0.0.1"
            )
        profiles = settings.profiles_by_client
        max_queued = settings.max_queued_by_client
        for name, per_client in (
            ("BATCHD_CLIENT_PROFILES", profiles),
            ("BATCHD_CLIENT_MAX_QUEUED", max_queued),
        ):
            unknown = sorted(set(per_client) - self.clients.names - {LOCAL})
            if unknown:
                raise ConfigError(
                    f"{name}: {unknown[0]!r} is no client named in "
                    "BATCHD_INGEST_TOKENS (name=token), BATCHD_ADMIN_TOKENS or "
                    "BATCHD_INGEST_TOKENS_FILE (nor 'local')"
                )
        unknown = sorted(set(settings.budgets_by_client) - self.clients.names)
        if unknown:
            raise ConfigError(
                f"BATCHD_CLIENT_BUDGETS: {unknown[0]!r} is no client named in "
                "BATCHD_INGEST_TOKENS (name=token) or BATCHD_INGEST_TOKENS_FILE"
            )
        self.settings = settings
        self.engine = engine
        self.providers = registry(provider)
        self.clock = clock
        self.owner = owner_id()
        self.prices = PriceTable.load(settings.prices_file)
        self.archive = Archive(settings.archive_path, settings.spool_path)
        backoff = Backoff(settings.retry_backoff_seconds, settings.max_attempts)
        # Learned from routed batches, read by the budget's reservations.
        self.calibration = Calibration()
        self.router = Router(engine, self.prices, backoff, self.clients, self.calibration)
        # Each part gets the few settings it reads, as its own small config.
        self.scheduler = Scheduler(
            engine,
            self.providers,
            SchedulerConfig.from_settings(settings),
            self.prices,
            self.archive,
            self.owner,
            clock,
            self.calibration,
        )
        self.poller = Poller(
            engine,
            self.providers,
            self.router,
            PollerConfig.from_settings(settings),
            self.archive,
            self.owner,
        )
        self.sync_lane = SyncLane(
            engine,
            self.providers,
            SyncConfig.from_settings(settings),
            self.prices,
            self.clients,
            clock,
            self.calibration,
        )
        self.callbacks = CallbackSender(
            engine, self.clients, CallbackConfig.from_settings(settings)
        )
        self.reporter = Reporter(engine, settings.failure_alert_ratio, clock)
        self.jobs = Jobs(engine, self.clients)
        self.retention = Retention(
            engine,
            self.reporter,
            days=settings.retention_days,
            batch_rows=settings.retention_batch_rows,
            interval=settings.retention_interval_seconds,
        )
        self.api = ApiState(
            engine=engine,
            ingest=Ingest(
                engine,
                IngestConfig.from_settings(settings),
                clients=self.clients,
                clock=clock,
                on_sync=self.sync_lane.wake,
                model_problem=self._model_problem,
                routing=Routing(frozenset(self.providers), settings.routes),
            ),
            waiters=Waiters(engine, settings.max_waiters),
            replayer=Replayer(engine),
            reporter=self.reporter,
            clients=self.clients,
            jobs=self.jobs,
            schema_head=schema_head(),
            known_revisions=known_revisions(),
            max_queued=settings.max_queued_tasks,
            max_wait=settings.max_wait_seconds,
            client_max_queued=max_queued,
            spec_models=None if settings.model_globs else sorted(self.prices.models),
        )
        self.app = build_app(self.api, settings.max_request_bytes)
        console.setup(
            self.app,
            console.Console(
                engine=engine,
                clients=self.clients,
                replayer=self.api.replayer,
                reporter=self.reporter,
                local_key=os.urandom(32),
                jobs=True,
                config=console.ConsoleConfig(
                    window_seconds=settings.window_seconds,
                    max_batch_items=settings.max_batch_items,
                    daily_budget_usd=settings.daily_budget_usd,
                    alert_ratio=settings.failure_alert_ratio,
                ),
            ),
        )
        console_jobs.setup(self.app, self.jobs)
        self.snapshots = Snapshots(
            engine, self.clients, self.api, settings.budgets_by_client, clock
        )
        self.spool = SpoolSweep(engine, self.archive)
        self.daily = DailyReport(
            self.reporter, self.archive, settings.archive_retention_days, clock
        )
        # What tests and tools call directly.
        self.snapshot = self.snapshots.tick
        self.sweep_spool = self.spool.sweep
        self.port: int | None = None
        metrics.CONFIG_WINDOW.set(settings.window_seconds)
        metrics.CONFIG_MAX_TASKS.set(settings.max_batch_items)
        metrics.BUDGET_LIMIT.set(float(settings.daily_budget_usd or 0))
        metrics.BUILD_INFO.info({"version": __version__})
        metrics.start_model_series(self._priced_series())
        HEALTH.reset()  # what this service's provider says, from its first call on
        for client, cap in settings.budgets_by_client.items():
            metrics.CLIENT_BUDGET_LIMIT.labels(client=client).set(float(cap))
            metrics.CLIENT_BUDGET_SPENT.labels(client=client).set(0)
        if settings.any_budget:
            # Ingest counts tokens from the first request on: load the
            # vocabularies now (a second or so), not inside a request.
            tokens.preload(sorted(self.prices.models))

    def _priced_series(self) -> list[tuple[str, str]]:
        """(provider, model) of each priced model at the provider it goes to:
        Claude models to Anthropic, Gemini models to Gemini (their endpoints'
        families), the rest by BATCHD_MODEL_ROUTES."""
        return [
            (
                "anthropic"
                if model.startswith("claude")
                else "gemini"
                if model.startswith("gemini")
                else route_provider(None, DEFAULT_ENDPOINT, model, self.settings.routes),
                model,
            )
            for model in sorted(self.prices.models)
        ]

    def _model_problem(self, model: str) -> str | None:
        """A window (and a provider batch) per (endpoint, model) only for
        models the prices file prices or BATCHD_ALLOWED_MODELS allows: an
        invented model string must not become a batch, or a metric label, of
        its own."""
        if self.prices.entry(model) is not None or any(
            fnmatch.fnmatchcase(model, glob) for glob in self.settings.model_globs
        ):
            return None
        return (
            "names a model batchd has no price for; price it in BATCHD_PRICES_FILE or "
            "allow it with BATCHD_ALLOWED_MODELS"
        )

    async def start_api(self) -> web.AppRunner:
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self.settings.http_header_timeout_seconds,
        )
        await runner.setup()
        site = CappedSite(
            runner,
            self.settings.http_host,
            self.settings.http_port,
            max_connections=self.settings.http_max_connections,
        )
        await site.start()
        self.port = runner.addresses[0][1] if runner.addresses else self.settings.http_port
        self.api.port = self.port
        return runner

    async def run(self, stop: asyncio.Event, started: asyncio.Event | None = None) -> None:
        await self.spool.sweep()
        runner = await self.start_api()
        if not self.clients.required:
            log.warning(
                "service.auth_off",
                host=self.settings.http_host,
                port=self.port,
                hint="no BATCHD_INGEST_TOKENS: any local process may submit paid work",
            )
        log.info(
            "service.started",
            host=self.settings.http_host,
            port=self.port,
            owner=self.owner,
            window_seconds=self.settings.window_seconds,
            max_batch_items=self.settings.max_batch_items,
        )
        loops_stop = asyncio.Event()
        loops = [
            asyncio.create_task(body(loops_stop), name=name)
            for name, body in (
                ("scheduler", self.scheduler.run),
                ("poller", self.poller.run),
                ("sync_lane", self.sync_lane.run),
                ("callbacks", self.callbacks.run),
                ("jobs", self.jobs.run),
                ("snapshot", self.snapshots.run),
                ("spool_sweep", self.spool.run),
                ("daily", self.daily.run),
                ("retention", self.retention.run),
            )
        ]
        if started is not None:
            started.set()
        await stop.wait()
        await self._drain(runner, loops_stop, loops)

    async def _drain(
        self, runner: web.AppRunner, loops_stop: asyncio.Event, loops: list[asyncio.Task[None]]
    ) -> None:
        """Stop taking tasks, let the write in hand finish, exit within the grace."""
        grace = self.settings.shutdown_grace_seconds
        deadline = time.monotonic() + grace
        self.api.draining = True
        log.info("service.draining", grace_seconds=grace)
        loops_stop.set()
        _done, pending = await asyncio.wait(loops, timeout=max(0.1, grace * 0.8))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self.settings.flush_on_shutdown:
            await self._flush_all(deadline)
        await self._release_claims()
        await runner.shutdown()
        await runner.cleanup()
        await self.api.ingest.close()
        await self.api.waiters.close()
        await asyncio.wait_for(
            asyncio.gather(*(p.close() for p in self.providers.values()), return_exceptions=True),
            max(0.1, deadline - time.monotonic()),
        )
        log.info("service.stopped", cancelled_loops=[t.get_name() for t in pending])

    async def _flush_all(self, deadline: float) -> None:
        """Send every queued window now (the last replica of a deployment going
        away for good, say); whatever does not make the deadline stays queued
        or is picked up by the next start as a half-sent batch."""
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic() - 1)):
                started = await self.scheduler.tick(drain=True)
                await self.scheduler.wait_sends()
            log.info("service.drain_flushed", batches=started)
        except Exception as exc:
            log.warning("service.drain_flush_failed", error=type(exc).__name__)

    async def _release_claims(self) -> None:
        """Hand our leases back so another replica need not wait them out."""
        try:
            async with self.engine.begin() as conn:
                released = await release_owner(conn, self.owner)
            log.info("service.claims_released", batches=released)
        except Exception as exc:
            log.warning("service.release_failed", error=type(exc).__name__)
