"""Result callbacks: the outbox → signed POSTs to each task's callback_url.

The router and the sync lane write an outbox row in the transaction that
makes a task terminal (store_successes / store_failures), so a crash
never loses a delivery. Every replica runs this loop: it claims due rows with
``FOR UPDATE SKIP LOCKED`` under a lease, POSTs each one, and records every
attempt. Delivery is at least once: a receiver that answered 2xx but whose
answer was lost, or a replica that died mid-POST, means the same delivery
(same ``Batchd-Delivery`` id) comes again, so receivers deduplicate on it.
A non-2xx answer, a timeout or a refused connection is retried with
exponential backoff and jitter up to BATCHD_CALLBACK_MAX_ATTEMPTS; then the
delivery is ``failed``, listed by ``GET /v1/callbacks/failed`` and replayable.

A callback URL is the caller's, so the POST is made as if by a stranger:
the host is resolved for each delivery and every address it gives must be
public or inside a CIDR entry of BATCHD_CALLBACK_ALLOWED_HOSTS
(``CheckedResolver``); the connection goes to the addresses that were
checked, never a second lookup's (no DNS rebinding), while the Host header
and TLS SNI keep the URL's name; redirects are never followed; and what
the target answered is kept as its status code and a reason in batchd's
own words, never its body, so a callback cannot read anything back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import __version__, logs, metrics
from batchd.clients import Clients
from batchd.config import Settings
from batchd.domain import backoff_seconds, callback_address_problem, callback_url_problem
from batchd.errors import BatchdError
from batchd.loops import run_ticks
from batchd.signing import (
    ATTEMPT_HEADER,
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from batchd.store.callbacks import claim_callbacks, record_callback_attempt

log = logs.get("batchd.callbacks")

_TICK_SECONDS = 1.0
_BACKOFF_CAP_SECONDS = 3600.0


class AddressRefused(BatchdError, aiohttp.ClientError):
    """The callback host resolves to an address batchd may not connect to."""


class CheckedResolver(AbstractResolver):
    """Resolves a callback host and refuses it unless every address it gives
    passes ``callback_address_problem``. aiohttp connects to exactly the
    addresses returned here, so the address checked is the one reached."""

    def __init__(self, allowed_hosts: Callable[[], tuple[str, ...]]) -> None:
        self.allowed_hosts = allowed_hosts
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for entry in found:
            problem = callback_address_problem(
                ipaddress.ip_address(entry["host"]), self.allowed_hosts()
            )
            if problem:
                # Every address, not only the first: a name giving one public
                # and one private address could be dialled at the second.
                raise AddressRefused(problem)
        return found

    async def close(self) -> None:
        await self._inner.close()


def _reason(exc: BaseException) -> str:
    """A failed POST in batchd's own words: never the target's text, which
    could carry what sits behind the URL."""
    if isinstance(exc, AddressRefused):
        return f"callback_url {exc}"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "the callback host name did not resolve"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "the TLS handshake with the callback host failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "could not connect to the callback host"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the callback host closed the connection before answering"
    return "the HTTP exchange with the callback host failed"


def payload(row: dict[str, Any]) -> dict[str, Any]:
    """The JSON body POSTed for one claimed outbox row: a task's terminal
    state, or a finished job's counts (``"type": "job"``)."""
    if row.get("job") is not None:
        return {"delivery_id": str(row["id"]), "type": "job", **(row.get("job_summary") or {})}
    succeeded = row["task_state"] == "succeeded"
    return {
        "delivery_id": str(row["id"]),
        "custom_id": row["custom_id"],
        "state": row["task_state"],
        "attempts": row["task_attempts"],
        "finished_at": _iso(row["finished_at"]),
        "endpoint": row.get("endpoint"),
        "model": row.get("model"),
        "metadata": row.get("metadata"),
        "status_code": row.get("status_code") if succeeded else None,
        "response": row.get("response") if succeeded else None,
        "last_error": None if succeeded else row.get("task_error"),
    }


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


@dataclass(frozen=True, slots=True)
class CallbackConfig:
    """The settings callback delivery reads."""

    allowed_hosts: tuple[str, ...]
    max_attempts: int
    backoff_seconds: float
    timeout_seconds: float
    concurrency: int

    @classmethod
    def from_settings(cls, s: Settings) -> CallbackConfig:
        return cls(
            s.callback_hosts,
            s.callback_max_attempts,
            s.callback_backoff_seconds,
            s.callback_timeout_seconds,
            s.callback_concurrency,
        )


class CallbackSender:
    def __init__(self, engine: AsyncEngine, clients: Clients, config: CallbackConfig) -> None:
        self.engine = engine
        self.clients = clients
        self.allowed_hosts = config.allowed_hosts
        self.max_attempts = config.max_attempts
        self.base_delay = config.backoff_seconds
        self.timeout = config.timeout_seconds
        self.concurrency = config.concurrency
        # Past the POST's own timeout plus time to record it, a claim is
        # presumed lost with its replica and the row is due again.
        self.lease_seconds = self.timeout * 2 + 10
        self._session: aiohttp.ClientSession | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        try:
            # A backlog (a full claim with room to send more): claim again at once.
            await run_ticks(
                stop,
                self.tick,
                logger=log,
                event="callbacks.tick_failed",
                interval=lambda started: (
                    0 if started and len(self._running) < self.concurrency else _TICK_SECONDS
                ),
            )
            await self.wait_deliveries()
        finally:
            await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_deliveries(self) -> None:
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def tick(self) -> int:
        """Claim due deliveries for free slots and start them; returns how many."""
        free = self.concurrency - len(self._running)
        if free <= 0:
            return 0
        async with self.engine.begin() as conn:
            rows = await claim_callbacks(conn, free, self.lease_seconds)
        for row in rows:
            task = asyncio.create_task(self._deliver(row))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        return len(rows)

    async def drain(self) -> None:
        """Deliver everything due now, including what comes due meanwhile
        (tests and `batchd callbacks replay` use it)."""
        while await self.tick():
            await self.wait_deliveries()
        await self.wait_deliveries()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No DNS cache: each delivery resolves (and checks) afresh.
            connector = aiohttp.TCPConnector(
                resolver=CheckedResolver(lambda: self.allowed_hosts), use_dns_cache=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": f"batchd/{__version__}"},
                trust_env=False,
            )
        return self._session

    async def _deliver(self, row: dict[str, Any]) -> None:
        attempt: int = row["attempts"]
        status: int | None = None
        error: str | None = None
        retry = True
        started = time.monotonic()
        secret = self.clients.secret_for(row["client"])
        # Also refuses an IP host that is not public (aiohttp dials an IP
        # without asking the resolver).
        problem = callback_url_problem(row["url"], self.allowed_hosts)
        if problem:
            # Ops narrowed the allow-list since ingest: never POST there.
            error, retry = f"callback_url {problem}", False
        elif secret is None:
            error = (
                f"no callback secret for client {row['client'] or 'anonymous'!r}; "
                "configure one, then replay"
            )
        else:
            status, error = await self._post(row, secret, attempt)
        duration = time.monotonic() - started
        delivered = status is not None and 200 <= status < 300
        retry_in = None
        if not delivered and retry and attempt < self.max_attempts:
            retry_in = backoff_seconds(
                attempt, self.base_delay, random.random(), _BACKOFF_CAP_SECONDS
            )
        try:
            async with self.engine.begin() as conn:
                state = await record_callback_attempt(
                    conn,
                    row["id"],
                    attempt,
                    status=status,
                    error=error,
                    duration=duration,
                    delivered=delivered,
                    retry_in=retry_in,
                )
        except Exception:
            # Not recorded: the lease runs out and the delivery is made again.
            log.exception("callbacks.record_failed", callback_id=row["id"])
            return
        outcome = "delivered" if delivered else ("retried" if retry_in is not None else "failed")
        metrics.CALLBACK_DELIVERIES.labels(
            outcome=outcome, client=self.clients.label(row["client"])
        ).inc()
        metrics.CALLBACK_SECONDS.observe(duration)
        event = "callback.delivered" if delivered else "callback.attempt_failed"
        log_fn = log.warning if outcome == "failed" else log.info if delivered else log.debug
        log_fn(
            event,
            callback_id=row["id"],
            custom_id=row["custom_id"],
            job=row.get("job"),
            attempt=attempt,
            status=status,
            error=error,
            outcome=outcome,
            state=state,
            retry_in=round(retry_in, 1) if retry_in is not None else None,
        )

    async def _post(
        self, row: dict[str, Any], secret: str, attempt: int
    ) -> tuple[int | None, str | None]:
        body = orjson.dumps(payload(row))
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(secret, timestamp, body),
            DELIVERY_HEADER: str(row["id"]),
            ATTEMPT_HEADER: str(attempt),
        }
        try:
            # Redirects are not followed: the allow-list vetted this URL only.
            # The answer's body is never read.
            async with self.session.post(
                row["url"], data=body, headers=headers, allow_redirects=False
            ) as resp:
                if 200 <= resp.status < 300:
                    return resp.status, None
                if 300 <= resp.status < 400:
                    return resp.status, (
                        f"the receiver answered HTTP {resp.status}, a "
                        "redirect, which batchd does not follow"
                    )
                return resp.status, f"the receiver answered HTTP {resp.status}"
        except TimeoutError:
            return None, f"no answer within {self.timeout:g}s"
        except aiohttp.ClientError as exc:
            return None, _reason(exc)
