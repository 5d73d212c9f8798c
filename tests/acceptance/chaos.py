"""The chaos scenario: many tasks through several replicas while replicas are
killed (kill -9 and crash points), PostgreSQL is restarted and the provider
misbehaves; then the invariant checker. The tasks are three jobs, and the
first of them is cancelled once it is all in, while the others still load:
every job's counters must still equal its tasks counted at the end. Used by
test_chaos.py (CI size) and soak.py (any size).

Randomness is seeded: the same seed makes the same choices of what to kill
and which fault to inject, while timing decides where each one lands. The
assertions hold whatever the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import text

from batchd.emulator.anthropic import AnthropicEmulator
from batchd.emulator.gemini import GeminiEmulator
from batchd.emulator.openai import Emulator
from batchd.faults import EXIT_CODE
from batchd.store.engine import async_url, make_engine
from tests import invariants
from tests.acceptance.procs import (
    Loader,
    PrivatePostgres,
    Replica,
    chat_task,
    claude_task,
    gemini_task,
    open_count,
    replica_env,
)

CRASH_POINTS = ("after_claim", "after_upload", "after_create", "mid_route", "after_route")
# (route, fault, params, times): times=3 outlasts the SDK's own two retries.
ROUTE_FAULTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("upload", "http_500", {}, 3),
    ("upload", "reset_before", {}, 1),
    ("create", "http_503", {}, 1),
    ("create", "http_429", {"retry_after": 1}, 1),
    ("create", "reset_after", {}, 1),
    ("create", "timeout_after_commit", {"seconds": 4}, 1),
    ("create", "hang", {"seconds": 4}, 1),
    ("retrieve", "http_500", {}, 3),
    ("retrieve", "http_429", {"retry_after": 1}, 3),
    ("retrieve", "reset_before", {}, 3),
    ("retrieve", "invalid_json", {}, 1),
    ("retrieve", "hang", {"seconds": 4}, 3),
    ("download", "truncate", {"mode": "chunked"}, 1),
    ("download", "truncate", {"mode": "clean"}, 1),
    ("download", "http_503", {}, 3),
    ("download", "reset_before", {}, 1),
    ("list_batches", "http_500", {}, 3),
    ("list_batches", "reset_before", {}, 1),
    ("cancel", "http_500", {}, 1),
]
BATCH_FAULTS: list[tuple[str, dict[str, Any]]] = [
    ("expire", {"run_fraction": 0.5}),
    ("stuck_finalizing", {"seconds": 3}),
    ("token_limit_exceeded", {}),
]
# The same kinds of fault at the other providers (the route names are theirs).
# A list fault hits one call: only a send that retries lists, and a queue of
# them would fail each retry while its backoff grows past the settle window.
ANTHROPIC_FAULTS: list[tuple[str, str, int]] = [
    ("create", "http_529", 1),
    ("create", "reset_after", 1),
    ("create", "http_500", 1),
    ("retrieve", "http_500", 3),
    ("retrieve", "http_529", 3),
    ("results", "http_500", 3),
    ("list", "http_500", 1),
    ("cancel", "http_500", 1),
]
GEMINI_FAULTS: list[tuple[str, str, int]] = [
    ("upload", "http_500", 1),
    ("create", "http_503", 1),
    ("create", "reset_after", 1),
    ("retrieve", "http_503", 3),
    ("download", "http_500", 3),
    ("download", "truncate", 1),
    ("list", "http_500", 1),
]
# A marker of expected_outcome as each provider's emulator spells it.
MARKERS = {
    "anthropic": {
        "http_400": "invalid_request",
        "http_429": "overloaded",
        "http_500*2": "api_error*2",
        "missing*1": "missing*1",
    },
    "gemini": {
        "http_400": "invalid_argument",
        "http_429": "resource_exhausted",
        "http_500*2": "internal*2",
        "missing*1": "missing*1",
    },
}
MAX_ATTEMPTS = 5
CANCELLED_JOB = "chaos-a"


def chaos_job(i: int, n: int) -> str:
    """Task i's job: the first fifth is chaos-a (cancelled mid-run), then
    the rest alternate between chaos-b and chaos-c."""
    return CANCELLED_JOB if i < n // 5 else f"chaos-{'bc'[i % 2]}"


SETTINGS = {
    "window_seconds": 1,
    "max_batch_items": 100,
    "poll_interval_seconds": 0.5,
    "scheduler_interval_seconds": 0.2,
    "retry_backoff_seconds": 0.5,
    "lease_seconds": 3,
    "max_attempts": MAX_ATTEMPTS,
    "provider_timeout_seconds": 2,
    "shutdown_grace_seconds": 5,
}


def expected_outcome(i: int) -> tuple[str | None, str]:
    """(body marker, final state) of task i: the issue 3 mix."""
    if i % 50 == 0:
        return "http_400", "failed"  # permanent: the manual queue at once
    if i % 20 == 2:
        return "http_429", "failed"  # always rate limited: exhausted after MAX_ATTEMPTS
    if i % 20 == 1:
        return "http_500*2", "succeeded"  # two retries, then fine
    if i % 20 == 3:
        return "missing*1", "succeeded"  # absent from both files once
    return None, "succeeded"


@dataclass
class Figures:
    tasks: int = 0
    replicas: int = 0
    clients: int = 1
    kills: int = 0
    sigkills: int = 0
    crash_point_exits: int = 0
    pg_restarts: int = 0
    faults_injected: int = 0
    provider_faults_applied: int = 0
    batch_faults_applied: int = 0
    provider_batches: int = 0
    ingest_503: int = 0
    ingest_refused_during_pg_outage: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong_state: int = 0
    cancelled: int = 0
    violations: list[str] = field(default_factory=list)
    by_state: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    sigterm_exit_codes: list[int] = field(default_factory=list)
    by_provider: dict[str, dict[str, int]] = field(default_factory=dict)
    unexpected_exits: list[tuple[str, int]] = field(default_factory=list)

    def line(self) -> str:
        return (
            "CHAOS "
            + " ".join(f"{k}={v}" for k, v in asdict(self).items() if k != "violations")
            + f" violations={len(self.violations)}"
        )


class Chaos:
    def __init__(
        self,
        pg: PrivatePostgres,
        db_url: str,
        emulator: Emulator,
        emulator_url: str,
        workdir: Path,
        *,
        tasks: int = 5000,
        replicas: int = 3,
        kills: int = 10,
        pg_restarts: int = 1,
        seed: int = 4,
        kill_every: tuple[float, float] = (1.5, 3),
        settle_within: float = 240,
        clients: int = 1,
        anthropic: AnthropicEmulator | None = None,
        gemini: GeminiEmulator | None = None,
    ) -> None:
        """With ``anthropic`` and/or ``gemini`` (started emulators), the load is
        spread over those providers too, and so are the faults."""
        self.pg, self.db_url, self.emu = pg, db_url, emulator
        self.anthropic, self.gemini = anthropic, gemini
        self.providers = ["openai"] + [
            n for n, e in (("anthropic", anthropic), ("gemini", gemini)) if e is not None
        ]
        self.n_tasks, self.n_kills, self.n_pg = tasks, kills, pg_restarts
        self.kill_every, self.settle_within = kill_every, settle_within
        self.rng = random.Random(seed)
        # With clients > 1, task i belongs to client c<i % clients> under the
        # custom_id chaos-<i // clients>: every custom_id is shared by all of
        # them, each with its own body and outcome.
        self.clients = [f"c{k}" for k in range(clients)] if clients > 1 else []
        self.tokens = {c: f"tok-{c}-{seed}" for c in self.clients}
        extra = (
            {"ingest_tokens": ",".join(f"{c}={t}" for c, t in self.tokens.items())}
            if self.clients
            else {}
        )
        env = replica_env(
            db_url,
            emulator_url,
            anthropic_url=anthropic.base if anthropic else None,
            gemini_url=gemini.base if gemini else None,
            **SETTINGS,
            **extra,
        )
        self.replicas = [Replica(f"chaos{i}", env, workdir) for i in range(replicas)]
        self.fig = Figures(tasks=tasks, replicas=replicas, clients=max(1, clients))
        self._locks = {r.name: asyncio.Lock() for r in self.replicas}
        self._stopping = False
        self._batch_scripts = 0

    async def _restart(self, r: Replica, crash_at: str | None = None) -> None:
        async with self._locks[r.name]:
            if r.proc is not None and r.proc.returncode is None:
                return
            for _ in range(5):
                try:
                    await r.start(crash_at=crash_at)
                    return
                except RuntimeError:
                    await asyncio.sleep(0.5)  # e.g. a crash point hit at once: try clean
                    crash_at = None

    async def _supervise(self) -> None:
        """Like an orchestrator: a replica that died by itself comes back clean."""
        while not self._stopping:
            for r in self.replicas:
                if (
                    r.proc is not None
                    and r.proc.returncode is not None
                    and not self._locks[r.name].locked()
                ):
                    if r.proc.returncode == EXIT_CODE:
                        self.fig.crash_point_exits += 1
                        self.fig.kills += 1
                    else:  # died by itself, not at a crash point: a real crash
                        self.fig.unexpected_exits.append((r.name, r.proc.returncode))
                    r.proc = None
                    await asyncio.sleep(self.rng.uniform(0.2, 1.0))
                    await self._restart(r)
            await asyncio.sleep(0.1)

    def _inject(self) -> None:
        target = self.rng.choice(self.providers)
        if target == "anthropic" and self.anthropic is not None:
            route, fault, times = self.rng.choice(ANTHROPIC_FAULTS)
            self.anthropic.inject(route, fault, times)
        elif target == "gemini" and self.gemini is not None:
            route, fault, times = self.rng.choice(GEMINI_FAULTS)
            self.gemini.inject(route, fault, times)
        elif self.rng.random() < 0.15:
            kind, params = self.rng.choice(BATCH_FAULTS)
            self.emu.script_batch(kind, **params)
            self._batch_scripts += 1
        else:
            route, fault, params, times = self.rng.choice(ROUTE_FAULTS)
            self.emu.inject(route, fault, times, **params)
        self.fig.faults_injected += 1

    async def _restart_pg(self, loader: Loader) -> None:
        """Restart the database while tasks are still coming in: the first time
        at 40% accepted, later ones (soak) spread over the rest of the load."""
        for k in range(self.n_pg):
            await loader.wait_accepted(int(self.n_tasks * (0.4 + 0.5 * k / self.n_pg)))
            answers_before = dict(loader.answers)
            await asyncio.to_thread(self.pg.stop, "immediate")
            await asyncio.sleep(self.rng.uniform(1.5, 3))
            await asyncio.to_thread(self.pg.start)
            self.fig.pg_restarts += 1
            self.fig.ingest_refused_during_pg_outage += sum(
                n - answers_before.get(code, 0) for code, n in loader.answers.items() if code != 202
            )

    async def _havoc(self, loader_done: asyncio.Event) -> None:
        while self.fig.kills < self.n_kills or not loader_done.is_set():
            await asyncio.sleep(self.rng.uniform(*self.kill_every))
            for _ in range(3):
                self._inject()
            live = [r for r in self.replicas if r.alive]
            if len(live) > 1:
                victim = self.rng.choice(live)
                async with self._locks[victim.name]:
                    await victim.kill()
                    victim.proc = None
                self.fig.sigkills += 1
                self.fig.kills += 1
                await asyncio.sleep(self.rng.uniform(0.2, 1.0))
                arm = self.rng.random() < 0.4
                point = f"{self.rng.choice(CRASH_POINTS)}:{self.rng.randint(1, 3)}"
                await self._restart(victim, point if arm else None)

    async def run(self) -> Figures:
        started = time.monotonic()
        for r in self.replicas:
            await r.start()
        tasks = []
        owners: list[str | None] = []
        for i in range(self.n_tasks):
            marker, _ = expected_outcome(i)
            client, cid = self._key(i)
            provider = self.provider_of(i)
            make = {"anthropic": claude_task, "gemini": gemini_task}.get(provider, chat_task)
            if provider != "openai":
                marker = MARKERS[provider].get(marker or "", marker)
            tasks.append(
                make(
                    cid,
                    emulate=marker,
                    content=f"task {i} of {client}",
                    job=chaos_job(i, self.n_tasks),
                )
            )
            owners.append(client if self.clients else None)
        loader = Loader(self.replicas, seed=self.rng.randint(0, 1 << 30), tokens=self.tokens)
        supervisor = asyncio.create_task(self._supervise())
        loader_done = asyncio.Event()

        async def load() -> None:
            try:
                await loader.post_all(tasks, chunk=50, concurrency=2, pause=0.4, clients=owners)
            finally:
                loader_done.set()

        loading = asyncio.create_task(load())
        restarting = asyncio.create_task(self._restart_pg(loader))
        cancelling = asyncio.create_task(self._cancel_first_job(loader))
        engine = make_engine(async_url(self.db_url), pool_size=2)
        try:
            await self._havoc(loader_done)
            await loading
            await restarting
            await cancelling
            # The havoc is over: faults queued at the other providers and not
            # applied yet would only stretch the settle with growing backoffs.
            for other in (self.anthropic, self.gemini):
                if other is not None:
                    other.clear_faults()
            await self._wait_settled(engine)
            self._stopping = True
            await supervisor
            for r in self.replicas:
                if r.proc is not None and r.proc.returncode is None:
                    self.fig.sigterm_exit_codes.append(await r.terminate(within=60))
            records = {"openai": self.emu.record()}
            if self.anthropic is not None:
                records["anthropic"] = self.anthropic.record()
            if self.gemini is not None:
                records["gemini"] = self.gemini.record()
            report = await invariants.check(engine, records, accepted=loader.accepted)
            self.fig.by_provider = await self._by_provider(engine)
            await self._check_outcomes(engine, report)
        finally:
            self._stopping = True
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            for job in (loading, restarting, cancelling):
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError, AssertionError):
                    await job
            for r in self.replicas:
                await r.kill()
            await loader.close()
            await engine.dispose()
        self.fig.ingest_503 = loader.answers.get(503, 0)
        self.fig.provider_faults_applied = sum(self.emu.faults_applied.values()) + sum(
            sum(e.faults_applied.values()) for e in (self.anthropic, self.gemini) if e
        )
        self.fig.batch_faults_applied = self._batch_scripts - len(self.emu._batch_scripts)
        self.fig.seconds = round(time.monotonic() - started, 1)
        return self.fig

    async def _cancel_first_job(self, loader: Loader) -> None:
        """Once every task of the first job is in, cancel it (each client's:
        job names are per client) through whichever replica answers, again
        until one does (replicas die meanwhile)."""
        first = set()
        for i in range(self.n_tasks):
            if chaos_job(i, self.n_tasks) == CANCELLED_JOB:
                client, cid = self._key(i)
                first.add((client if self.clients else "local", cid))
        while not first <= loader.accepted:
            await loader.wait_accepted(len(loader.accepted) + 1)
        owners: list[str | None] = [*self.clients] or [None]
        for owner in owners:
            headers = {"Authorization": f"Bearer {self.tokens[owner]}"} if owner else {}
            await self._cancel_on_any(loader, headers)

    async def _cancel_on_any(self, loader: Loader, headers: dict[str, str]) -> None:
        while True:
            for r in [r for r in self.replicas if r.alive]:
                try:
                    async with loader.http.post(
                        f"{r.url}/v1/jobs/{CANCELLED_JOB}/cancel", json={}, headers=headers
                    ) as resp:
                        if resp.status == 200:
                            return
                except (TimeoutError, OSError, aiohttp.ClientError):
                    pass
            await asyncio.sleep(0.2)

    def provider_of(self, i: int) -> str:
        """Task i's provider: round robin, so every marker meets every provider."""
        return self.providers[(i // 50) % len(self.providers)]

    @staticmethod
    async def _by_provider(engine: Any) -> dict[str, dict[str, int]]:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT provider, state, count(*) FROM tasks GROUP BY 1, 2")
                )
            ).all()
        out: dict[str, dict[str, int]] = {}
        for provider, state, n in rows:
            out.setdefault(provider, {})[state] = int(n)
        return out

    async def _wait_settled(self, engine: Any) -> None:
        deadline = time.monotonic() + self.settle_within
        while time.monotonic() < deadline:
            if await open_count(engine) == 0:
                return
            await asyncio.sleep(0.5)
        tails = "\n".join(f"--- {r.name}\n{r.tail(10)}" for r in self.replicas)
        raise AssertionError(
            f"not settled in {self.settle_within}s: {await open_count(engine)} open\n{tails}"
        )

    def _key(self, i: int) -> tuple[str, str]:
        """(client, custom_id) of task i."""
        if not self.clients:
            return "local", f"chaos-{i}"
        n = len(self.clients)
        return self.clients[i % n], f"chaos-{i // n}"

    def _index(self, client: str, custom_id: str) -> int:
        number = int(custom_id.rsplit("-", 1)[1])
        if not self.clients:
            return number
        return number * len(self.clients) + self.clients.index(client)

    async def _check_outcomes(self, engine: Any, report: invariants.Report) -> None:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(text("SELECT client, custom_id, state, attempts FROM tasks"))
            ).all()
        wrong = []
        for client, cid, state, attempts in rows:
            i = self._index(client, cid)
            marker, expected = expected_outcome(i)
            if state == "cancelled" and chaos_job(i, self.n_tasks) == CANCELLED_JOB:
                self.fig.cancelled += 1
                continue  # queued when its job was cancelled (or back from a retry)
            exhausted = marker == "http_429" and attempts != MAX_ATTEMPTS
            if state != expected or exhausted:
                wrong.append((cid, state, attempts))
        self.fig.wrong_state = len(wrong)
        self.fig.lost = report.lost
        self.fig.duplicated = report.duplicated
        self.fig.by_state = report.by_state
        self.fig.provider_batches = report.provider_batches
        self.fig.violations = (
            report.violations
            + ([f"{len(wrong)} task(s) in the wrong terminal state: {wrong[:5]}"] if wrong else [])
            + [
                f"replica {name} exited {code} by itself"
                for name, code in self.fig.unexpected_exits
            ]
        )
