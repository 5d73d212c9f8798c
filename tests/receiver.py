"""A callback receiver for tests: an aiohttp server on a loopback port that
verifies each request's signature as a real service would, and answers with
scripted statuses."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from batchd.client import SignatureError, verify_callback


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def payload(self) -> dict[str, Any]:
        doc: dict[str, Any] = orjson.loads(self.body)
        return doc


class Receiver:
    def __init__(self, secret: str, statuses: list[int] | None = None) -> None:
        self.secret = secret
        self.script: collections.deque[int] = collections.deque(statuses or [])
        self.got: list[Received] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_callback(self.secret, request.headers, body)
            verified = True
        except SignatureError:
            verified = False
        self.got.append(Received(request.path, dict(request.headers), body, verified))
        if not verified:
            return web.Response(status=401, text="bad signature")
        status = self.script.popleft() if self.script else 200
        return web.Response(status=status, text="ok" if status < 300 else "receiver broken")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def deliveries(self, path: str | None = None) -> list[Received]:
        return [r for r in self.got if path is None or r.path == path]
