"""Real processes for the crash-safety tests: a private PostgreSQL we may stop
and start, ``batchd serve`` replicas we may kill -9, and a load client that
spreads tasks over whichever replicas are up.

The emulator runs in the test's own event loop over a real socket, so tests
can script it directly; the replicas reach it (and PostgreSQL) like a
deployed batchd would.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

API_KEY = "test-key"
_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------ PostgreSQL


def find_pg_bindir() -> Path | None:
    """initdb + pg_ctl: BATCHD_TEST_PG_BINDIR, the distribution's, pg_config's,
    or the binaries pgserver ships."""
    candidates: list[str] = []
    if os.environ.get("BATCHD_TEST_PG_BINDIR"):
        candidates.append(os.environ["BATCHD_TEST_PG_BINDIR"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            candidates.append(
                subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True
                ).stdout.strip()
            )
    for c in candidates:
        if (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    with contextlib.suppress(ImportError):
        from pgserver._commands import POSTGRES_BIN_PATH

        if (Path(POSTGRES_BIN_PATH) / "pg_ctl").exists():
            return Path(POSTGRES_BIN_PATH)
    return None


def _run_as() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: borrow an unprivileged account."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


class PrivatePostgres:
    """A throwaway server on a free loopback port, ours to stop and restart."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="batchd-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        kw: dict[str, Any] = {}
        if self.user is not None:
            kw = {"user": self.user.pw_uid, "group": self.user.pw_gid}
        done = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            timeout=120,
            **kw,
        )
        if check and done.returncode:
            # What the server tools said, not only that they failed.
            raise RuntimeError(
                f"{args[0]} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return done

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.start()

    def start(self) -> None:
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- batchd serve


class Replica:
    """One ``batchd serve`` process; its JSON logs go to ``log``."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.env = env
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.port is not None

    async def start(self, *, crash_at: str | None = None, **extra_env: str) -> None:
        env = {**self.env, **extra_env, "BATCHD_DATA_DIR": str(self.workdir / self.name)}
        if crash_at:
            env["BATCHD_CRASH_AT"] = crash_at
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "batchd",
                "serve",
                env=env,
                cwd=_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        self.port = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            event = self._find_event("service.started", offset)
            if event is not None:
                self.port = int(event["port"])
                return
            if self.proc.returncode is not None:
                raise RuntimeError(
                    f"{self.name} exited {self.proc.returncode} at start:\n{self.tail()}"
                )
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.tail()}")

    def events(self, name: str | None = None, offset: int = 0) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        found = []
        with self.log.open("rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.startswith(b"{"):
                    continue
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if name is None or obj.get("event") == name:
                    found.append(obj)
        return found

    def _find_event(self, name: str, offset: int) -> dict[str, Any] | None:
        hits = self.events(name, offset)
        return hits[0] if hits else None

    def tail(self, n: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    async def wait(self, within: float = 60) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), within)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def terminate(self, within: float = 60) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(within)


def replica_env(
    db_url: str,
    emulator_url: str,
    *,
    anthropic_url: str | None = None,
    gemini_url: str | None = None,
    **settings: Any,
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCHD_", "OPENAI_", "ANTHROPIC_", "GEMINI_", "AZURE_OPENAI_"))
    }
    if anthropic_url:
        env.update({"BATCHD_ANTHROPIC_BASE_URL": anthropic_url, "ANTHROPIC_API_KEY": API_KEY})
    if gemini_url:
        env.update({"BATCHD_GEMINI_BASE_URL": gemini_url, "GEMINI_API_KEY": API_KEY})
    env.update(
        {
            "BATCHD_DATABASE_URL": db_url,
            "BATCHD_OPENAI_BASE_URL": emulator_url,
            "OPENAI_API_KEY": API_KEY,
            "BATCHD_HTTP_PORT": "0",
            "BATCHD_LOG_FORMAT": "json",
            "BATCHD_LOG_LEVEL": "info",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"BATCHD_{k.upper()}": str(v) for k, v in settings.items()})
    return env


# ------------------------------------------------------------------ load client


def chat_task(
    custom_id: str,
    *,
    emulate: str | None = None,
    model: str = "gpt-4o-mini",
    job: str | None = None,
    content: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": content or f"task {custom_id}"}],
    }
    if emulate:
        body["metadata"] = {"emulate": emulate}
    return {"custom_id": custom_id, "body": body, **({"job": job} if job else {})}


def claude_task(
    custom_id: str,
    *,
    emulate: str | None = None,
    job: str | None = None,
    content: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": content or f"task {custom_id}"}],
    }
    if emulate:
        body["metadata"] = {"emulate": emulate}
    return {
        "custom_id": custom_id,
        "endpoint": "/v1/messages",
        "body": body,
        **({"job": job} if job else {}),
    }


def gemini_task(
    custom_id: str,
    *,
    emulate: str | None = None,
    job: str | None = None,
    content: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gemini-2.5-flash",
        "contents": [{"role": "user", "parts": [{"text": content or custom_id}]}],
        "generationConfig": {"maxOutputTokens": 8},
    }
    if emulate:
        body["emulate"] = emulate
    return {
        "custom_id": custom_id,
        "endpoint": "/v1beta/generateContent",
        "body": body,
        **({"job": job} if job else {}),
    }


class Loader:
    """Posts tasks to whichever replica is up, again until some replica
    answers 202: a 503, a refused connection or a dropped request is retried
    with the same tasks (a duplicate is stored once)."""

    def __init__(
        self, replicas: Sequence[Replica], seed: int = 0, tokens: dict[str, str] | None = None
    ) -> None:
        self.replicas = list(replicas)  # tests append the replicas they start later
        self.rng = random.Random(seed)
        self.tokens = tokens or {}  # client name -> its bearer token
        # (client, custom_id) of every task a replica answered 202 for.
        self.accepted: set[tuple[str, str]] = set()
        self.answers: dict[int | str, int] = {}
        self._progress = asyncio.Event()
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    def _note(self, key: int | str) -> None:
        self.answers[key] = self.answers.get(key, 0) + 1

    async def post(
        self, tasks: list[dict[str, Any]], *, give_up_after: float = 180, client: str | None = None
    ) -> None:
        """Post as ``client`` (its token), or with no token (client ``local``)."""
        body = orjson.dumps({"tasks": tasks})
        headers = {"Content-Type": "application/json"}
        if client is not None:
            headers["Authorization"] = f"Bearer {self.tokens[client]}"
        deadline = time.monotonic() + give_up_after
        while time.monotonic() < deadline:
            live = [r for r in self.replicas if r.alive]
            if not live:
                await asyncio.sleep(0.1)
                continue
            target = self.rng.choice(live)
            try:
                async with self.http.post(
                    f"{target.url}/v1/tasks", data=body, headers=headers
                ) as resp:
                    self._note(resp.status)
                    if resp.status == 202:
                        doc = await resp.json()
                        got = {t["custom_id"] for t in doc["tasks"]}
                        assert got == {t["custom_id"] for t in tasks}, doc
                        self.accepted |= {(client or "local", c) for c in got}
                        self._progress.set()
                        return
                    assert resp.status in (503, 429), (resp.status, await resp.text())
                    assert resp.headers.get("Retry-After"), "a 503/429 must say when to retry"
            except (TimeoutError, aiohttp.ClientError):
                self._note("connection")
            await asyncio.sleep(0.1 + self.rng.random() * 0.2)
        raise AssertionError(f"no replica accepted {len(tasks)} tasks in {give_up_after}s")

    async def wait_accepted(self, n: int) -> None:
        while len(self.accepted) < n:
            self._progress.clear()
            await self._progress.wait()

    async def post_all(
        self,
        tasks: list[dict[str, Any]],
        chunk: int = 100,
        concurrency: int = 4,
        pause: float = 0.0,
        clients: Sequence[str | None] | None = None,
    ) -> None:
        """Post every task, ``clients[i]`` (default: no token) sending task i;
        each chunk is one client's, the clients' chunks taking turns."""
        owners = list(clients) if clients is not None else [None] * len(tasks)
        by_client: dict[str | None, list[dict[str, Any]]] = {}
        for task, owner in zip(tasks, owners, strict=True):
            by_client.setdefault(owner, []).append(task)
        per_client = [
            [(owner, mine[i : i + chunk]) for i in range(0, len(mine), chunk)]
            for owner, mine in by_client.items()
        ]
        chunks = [c for turn in itertools.zip_longest(*per_client) for c in turn if c is not None]
        slots = asyncio.Semaphore(concurrency)

        async def one(owner: str | None, c: list[dict[str, Any]]) -> None:
            async with slots:
                await self.post(c, client=owner)
                await asyncio.sleep(pause)

        await asyncio.gather(*(one(owner, c) for owner, c in chunks))

    async def close(self) -> None:
        await self.http.close()


# ---------------------------------------------------------------- waiting


async def until(predicate: Callable[[], bool], within: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {within}s: {what or predicate}")


async def open_count(engine: AsyncEngine) -> int | None:
    """Tasks not yet terminal plus batches not yet routed; None if the
    database does not answer (it may be down on purpose)."""
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text("""
                SELECT (SELECT count(*) FROM tasks WHERE state IN ('queued', 'submitted'))
                     + (SELECT count(*) FROM batches WHERE state <> 'routed')""")
                )
            ).scalar()
            return int(row or 0)
    except Exception:
        return None


async def wait_settled(
    engine: AsyncEngine, within: float, *, replicas: Iterable[Replica] = ()
) -> None:
    deadline = time.monotonic() + within
    left: int | None = None
    while time.monotonic() < deadline:
        left = await open_count(engine)
        if left == 0:
            return
        await asyncio.sleep(0.25)
    tails = "\n".join(f"--- {r.name}\n{r.tail(15)}" for r in replicas)
    raise AssertionError(f"{left} tasks/batches still open after {within}s\n{tails}")


async def provider_requests(replica: Replica) -> dict[tuple[str, str], float]:
    """``batchd_provider_requests_total`` from a replica's /metrics, by (operation, code)."""
    async with aiohttp.ClientSession() as http, http.get(f"{replica.url}/metrics") as resp:
        body = await resp.text()
    found: dict[tuple[str, str], float] = {}
    for line in body.splitlines():
        if line.startswith("batchd_provider_requests_total{"):
            labels, value = line[len("batchd_provider_requests_total{") :].split("} ")
            pairs = dict(p.split("=", 1) for p in labels.split(","))
            found[(pairs["operation"].strip('"'), pairs["code"].strip('"'))] = float(value)
    return found
