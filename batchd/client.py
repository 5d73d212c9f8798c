"""A small client for services that talk to batchd (and for `batchd submit`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from batchd.signing import (
    DEFAULT_TOLERANCE_SECONDS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureError,
    verify,
)

__all__ = ["BatchdClient", "BatchdClientError", "SignatureError", "verify_callback"]


def verify_callback(secret: str, headers: Mapping[str, str], body: bytes, *,
                    tolerance: float = DEFAULT_TOLERANCE_SECONDS) -> dict[str, Any]:
    """The payload of a batchd callback, once its signature checks out.

    ``headers`` are the request's headers (any case-insensitive mapping, such
    as aiohttp's or Flask's ``request.headers``) and ``body`` the raw bytes
    received. Raises SignatureError when the signature is missing, wrong, or
    more than ``tolerance`` seconds old.
    """
    verify(secret, body, headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER),
           tolerance=tolerance)
    doc: dict[str, Any] = orjson.loads(body)
    return doc


class BatchdClientError(Exception):
    """batchd refused a request; ``status`` and ``code`` come from its reply."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class BatchdClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8080", token: str | None = None,
                 *, timeout: float = 60.0, retries: int = 5) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.retries = retries
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> BatchdClient:
        self._session = aiohttp.ClientSession(headers=self.headers, timeout=self.timeout)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self.headers, timeout=self.timeout)
        return self._session

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; 429 and 503 are retried after the server's Retry-After."""
        for attempt in range(self.retries + 1):
            async with self.session.request(method, self.base_url + path, **kwargs) as resp:
                body = await resp.read()
                if resp.status in (429, 503) and attempt < self.retries:
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                    continue
                data = orjson.loads(body) if body else None
                if resp.status >= 400:
                    err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
                    raise BatchdClientError(resp.status, err.get("code", "error"),
                                            err.get("message", body.decode(errors="replace")))
                return data
        raise AssertionError("unreachable")

    async def submit(self, tasks: Iterable[dict[str, Any]]) -> dict[str, Any]:
        payload = b"\n".join(orjson.dumps(t) for t in tasks)
        result: dict[str, Any] = await self._request(
            "POST", "/v1/tasks", data=payload,
            headers={"Content-Type": "application/x-ndjson"})
        return result

    async def get_task(self, custom_id: str) -> dict[str, Any]:
        from urllib.parse import quote

        result: dict[str, Any] = await self._request("GET", f"/v1/tasks/{quote(custom_id, '')}")
        return result

    async def results(self, after: str = "0", limit: int = 500
                      ) -> AsyncIterator[dict[str, Any]]:
        """Every stored result once, in completion order, from cursor ``after``."""
        while True:
            page = await self._request("GET", "/v1/results",
                                       params={"after": after, "limit": str(limit)})
            for row in page["results"]:
                yield row
            after = page["next"]
            if not page["has_more"]:
                return


async def submit_file(path: Path, url: str, *, token: str | None = None, chunk: int = 1000,
                      progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """POST a JSONL file of tasks in chunks of ``chunk`` lines."""
    totals = {"accepted": 0, "duplicates": 0}
    sent = 0
    async with BatchdClient(url, token) as client:
        batch: list[dict[str, Any]] = []
        with path.open("rb") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    batch.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    raise BatchdClientError(400, "invalid_json", f"{path}:{n} is not JSON") \
                        from None
                if len(batch) >= chunk:
                    sent += await _send(client, batch, totals)
                    batch = []
                    if progress:
                        progress(sent)
        if batch:
            sent += await _send(client, batch, totals)
            if progress:
                progress(sent)
    return totals


async def _send(client: BatchdClient, batch: list[dict[str, Any]], totals: dict[str, int]
                ) -> int:
    reply = await client.submit(batch)
    totals["accepted"] += reply["accepted"]
    totals["duplicates"] += reply["duplicates"]
    return len(batch)
