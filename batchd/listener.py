"""The API's listening socket, with the limits aiohttp leaves to the caller.

aiohttp takes every connection it is offered and keeps each one while its
request head trickles in, so a few thousand idle or slow sockets would use
up file descriptors and memory before any handler (or auth) runs. Two
limits close that:

- the header-read timeout is aiohttp's keep-alive timer, which also runs
  from the moment a connection opens: a connection that has not sent a
  complete request head within it (of opening, or of its last answer) is
  closed;
- past ``max_connections`` open connections a new one is closed at once,
  before a byte of it is read.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from batchd import logs, metrics

log = logs.get("batchd.listener")


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        metrics.HTTP_CONNECTIONS_REFUSED.inc()
        transport.close()


class CappedSite(web.TCPSite):
    """A TCPSite that refuses connections past ``max_connections``."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, *, max_connections: int
    ) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self.max_connections = max_connections
        self._warned = False

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        if len(server.connections) >= self.max_connections:
            if not self._warned:
                self._warned = True
                log.warning("http.connections_full", max_connections=self.max_connections)
            return _Refused()
        self._warned = False
        return server()

    async def start(self) -> None:
        # TCPSite.start with our protocol factory in place of the bare
        # server (BaseSite.start registers the site with its runner).
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol, self._host, self._port, reuse_address=True
        )
        self._bound_port = (
            self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port
        )
