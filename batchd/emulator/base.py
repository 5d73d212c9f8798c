"""What the emulators share: how each runs from the command line; and for
the Anthropic and Gemini emulators: the scripting surface
(per-line outcomes, batch-level behaviours and injected faults, each checked
against the emulator's own vocabulary, its class attributes, when queued),
the server's start and stop, the test-only admin routes, and small helpers."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def iso(ts: float | None) -> str | None:
    """A Unix time as the RFC 3339 text both APIs use (``Z``, not ``+00:00``)."""
    return (
        None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
    )


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
    )


async def serve_until_signalled(
    start: Awaitable[str], stop: Callable[[], Awaitable[None]], name: str
) -> None:
    """Run an emulator from the command line: start it, say where it listens,
    and stop it cleanly on SIGINT or SIGTERM."""
    url = await start
    print(f"batchd {name} listening on {url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        await stop()


class ScriptedEmulator:
    OUTCOMES: ClassVar[frozenset[str]]
    ROUTES: ClassVar[frozenset[str]]
    FAULT_KINDS: ClassVar[frozenset[str]]
    BATCH_SCRIPTS: ClassVar[frozenset[str]]

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.faults_applied: collections.Counter[str] = collections.Counter()
        self.submissions: collections.Counter[str] = collections.Counter()
        self.sync_submissions: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._line_scripts: dict[str, collections.deque[str]] = {}
        self._batch_scripts: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._faults: dict[str, collections.deque[list[Any]]] = {}
        self._marked: collections.Counter[bytes] = collections.Counter()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base = ""
        self.app = self._build_app()

    # ---- what each emulator defines ---------------------------------------------------

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        """The provider's API routes, each named (the names fault scripts use)."""
        raise NotImplementedError

    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raise NotImplementedError

    def _batches(self) -> list[dict[str, Any]]:
        """Each batch as ``GET /_emulator/record`` shows it."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What the emulator received and billed (``GET /_emulator/record``)."""
        return {
            "batches": self._batches(),
            "sync_submissions": dict(self.sync_submissions),
            "calls": dict(self.calls),
            "faults_applied": dict(self.faults_applied),
        }

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024**3)
        self._add_routes(app.router)
        app.router.add_get("/_emulator/record", self._admin_record, name="admin_record")
        app.router.add_post("/_emulator/faults", self._admin_faults, name="admin_faults")
        return app

    def _bad_request(self, message: str) -> Exception:
        """The emulator's own 400 error, for a malformed admin request."""
        raise NotImplementedError

    # ---- server ----------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.base = f"http://{host}:{self._runner.addresses[0][1]}"
        return self.base

    async def stop(self) -> None:
        self._closing.set()  # wakes handlers hanging on a "hang" fault
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _admin_record(self, _request: web.Request) -> web.StreamResponse:
        return json_response(self.record())

    async def _admin_faults(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        try:
            self.inject(
                str(body.get("route")),
                str(body.get("fault")),
                int(body.get("times", 1)),
                **(body.get("params") or {}),
            )
        except (ValueError, TypeError) as exc:
            raise self._bad_request(str(exc)) from None
        return json_response({"queued": True})

    # ---- scripting -------------------------------------------------------------------

    def script_line(self, key: str, *outcomes: str) -> None:
        """Queue outcomes for the next submissions of ``key``, one each."""
        bad = set(outcomes) - self.OUTCOMES
        if bad:
            raise ValueError(f"unknown outcomes {sorted(bad)}; known: {sorted(self.OUTCOMES)}")
        self._line_scripts.setdefault(key, collections.deque()).extend(outcomes)

    def script_batch(self, kind: str, **params: Any) -> None:
        """Queue a batch-level behaviour for the next created batch."""
        if kind not in self.BATCH_SCRIPTS:
            raise ValueError(f"unknown batch script {kind!r}; known: {sorted(self.BATCH_SCRIPTS)}")
        self._batch_scripts.append((kind, params))

    def inject(self, route: str, fault: str, times: int = 1, **params: Any) -> None:
        """Answer the next ``times`` requests to ``route`` with ``fault``."""
        if route not in self.ROUTES:
            raise ValueError(f"unknown route {route!r}; known: {sorted(self.ROUTES)}")
        if fault not in self.FAULT_KINDS:
            raise ValueError(f"unknown fault {fault!r}; known: {sorted(self.FAULT_KINDS)}")
        self._faults.setdefault(route, collections.deque()).append([fault, times, params])

    def clear_faults(self) -> None:
        """Drop the faults not applied yet: the provider has recovered."""
        self._faults.clear()

    def _take_fault(self, route: str) -> tuple[str, dict[str, Any]] | None:
        """The fault due for this request to ``route``, if any (and count it)."""
        queue = self._faults.get(route)
        if not queue:
            return None
        entry = queue[0]
        entry[1] -= 1
        if entry[1] <= 0:
            queue.popleft()
        self.faults_applied[f"{route}:{entry[0]}"] += 1
        return str(entry[0]), entry[2]

    def _scripted_outcome(self, key: str) -> str | None:
        """The next queued outcome for ``key``, if one was scripted."""
        queue = self._line_scripts.get(key)
        return queue.popleft() if queue else None

    def _marked_outcome(self, marker: Any, request: dict[str, Any]) -> str:
        """A body marker: ``outcome`` every time, or ``outcome*N`` for the first
        N submissions of the same request, then ``ok`` (so a retried request
        can succeed). Counted by the request's content, which stays the same
        across attempts while batchd's line id changes."""
        if not isinstance(marker, str):
            return "ok"
        name, star, count = marker.partition("*")
        if name not in self.OUTCOMES:
            return "ok"
        if not star:
            return name
        digest = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
        self._marked[digest] += 1
        return name if self._marked[digest] <= (int(count) if count.isdigit() else 1) else "ok"
