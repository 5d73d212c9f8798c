"""An in-memory Anthropic Message Batches server (aiohttp) for tests and
``batchd demo``, speaking the wire protocol the ``anthropic`` SDK uses:

``POST /v1/messages/batches`` (``{"requests": [{"custom_id", "params"}]}``),
``GET /v1/messages/batches[/{id}]`` (list: ``limit``/``after_id``/``before_id``,
newest first), ``POST /v1/messages/batches/{id}/cancel``, results as JSONL at
the batch's ``results_url`` once it has ended, and ``POST /v1/messages`` for
the sync lane. Auth is the ``x-api-key`` header or a bearer token.

Scripting, all deterministic:

* per request: ``script_line(custom_id, *outcomes)`` or a marker in the
  request's ``params.metadata.emulate`` (``outcome``, or ``outcome*N`` for the
  first N submissions of that request); outcomes are ``ok``,
  ``invalid_request`` (errored, ``invalid_request_error``), ``overloaded``
  (``overloaded_error``), ``api_error``, ``canceled``, ``expired`` and
  ``missing`` (no result line at all). Each submission consumes one.
* per batch (``script_batch``): ``hold`` (nothing runs until cancelled or
  expired), ``expire`` with ``ran=N`` (the first N run, the rest expire),
  ``partial`` with ``ran=N`` (the first N run; then ``hold``).
* per route (``inject``): HTTP faults (``http_500``, ``http_529``,
  ``http_429``, ``http_400``, ``http_404``), ``reset_after`` (the work is done,
  then the connection is dropped) and ``hang``.

``record()`` (also ``GET /_emulator/record``) is everything received: each
created batch with its custom_ids and what each one was billed for, sync
submissions, calls and faults applied. Run standalone:
``python -m batchd.emulator.anthropic --port 8098``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from batchd.emulator.base import (
    Handler,
    ScriptedEmulator,
    as_dict,
    iso,
    json_response,
    serve_until_signalled,
)

OUTCOMES = frozenset(
    {"ok", "invalid_request", "overloaded", "api_error", "canceled", "expired", "missing"}
)
ROUTES = frozenset({"create", "retrieve", "list", "cancel", "results", "sync"})
FAULTS = {
    "http_500": (500, "api_error", "Internal server error"),
    "http_529": (529, "overloaded_error", "Overloaded"),
    "http_429": (
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
    ),
    "http_400": (400, "invalid_request_error", "requests: invalid"),
    "http_404": (404, "not_found_error", "Not found"),
}
FAULT_KINDS = frozenset({*FAULTS, "reset_after", "hang"})
BATCH_SCRIPTS = frozenset({"hold", "expire", "partial"})
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_REQUESTS = 100_000
_ERRORED = {
    "invalid_request": ("invalid_request_error", "messages: field required"),
    "overloaded": ("overloaded_error", "Overloaded"),
    "api_error": ("api_error", "Internal server error"),
}


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


@dataclass(slots=True)
class Request:
    custom_id: str
    params: dict[str, Any]
    outcome: str
    result: str | None = None  # what it came to: succeeded, errored, canceled, expired


@dataclass(slots=True)
class Batch:
    id: str
    created_at: float
    requests: list[Request]
    script: tuple[str, dict[str, Any]] | None
    ends_at: float
    cancel_at: float | None = None
    ended_at: float | None = None
    expired: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)


def usage_for(params: dict[str, Any]) -> dict[str, int]:
    """Tokens a succeeded request reports: input = len(compact JSON of
    ``messages``) // 4 (at least 1), output = ``max_tokens``; cache tokens from
    ``metadata.cache_write_tokens`` / ``metadata.cache_read_tokens``."""
    meta = as_dict(params.get("metadata"))
    max_tokens = params.get("max_tokens")
    return {
        "input_tokens": max(1, len(orjson.dumps(params.get("messages", []))) // 4),
        "output_tokens": max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 16,
        "cache_creation_input_tokens": int(meta.get("cache_write_tokens", 0) or 0),
        "cache_read_input_tokens": int(meta.get("cache_read_tokens", 0) or 0),
    }


def message_for(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": params.get("model"),
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage_for(params),
    }


def _error(etype: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": etype, "message": message},
        "request_id": f"req_{uuid.uuid4().hex[:24]}",
    }


class AnthropicEmulator(ScriptedEmulator):
    OUTCOMES = OUTCOMES
    ROUTES = ROUTES
    FAULT_KINDS = FAULT_KINDS
    BATCH_SCRIPTS = BATCH_SCRIPTS

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        in_progress_seconds: float = 0.0,
        cancelling_seconds: float = 0.0,
        expiry_seconds: float = 86400.0,
    ) -> None:
        self.in_progress_seconds = in_progress_seconds
        self.cancelling_seconds = cancelling_seconds
        self.expiry_seconds = expiry_seconds
        self.batches: dict[str, Batch] = {}
        super().__init__(api_key)

    # ---- scripting -------------------------------------------------------------------

    def expire_now(self, batch_id: str) -> None:
        """Make the 24 hours pass for one batch."""
        b = self.batches[batch_id]
        b.expired = True
        self._advance(b)

    def _batches(self) -> list[dict[str, Any]]:
        out = []
        for b in self.batches.values():
            self._advance(b)
            out.append(
                {
                    "id": b.id,
                    "status": self._view(b)["processing_status"],
                    "created_at": b.created_at,
                    "custom_ids": [r.custom_id for r in b.requests],
                    "billed": [r.custom_id for r in b.requests if r.result == "succeeded"],
                    "request_counts": self._counts(b),
                    "cancel_requested": b.cancel_at is not None,
                }
            )
        return out

    def _bad_request(self, message: str) -> Exception:
        return ApiError(400, "invalid_request_error", message)

    # ---- server ----------------------------------------------------------------------

    def _add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_post("/v1/messages/batches", self._create, name="create")
        r.add_get("/v1/messages/batches", self._list, name="list")
        r.add_get("/v1/messages/batches/{id}", self._retrieve, name="retrieve")
        r.add_post("/v1/messages/batches/{id}/cancel", self._cancel, name="cancel")
        r.add_get("/v1/messages/batches/{id}/results", self._results, name="results")
        r.add_post("/v1/messages", self._sync, name="sync")

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or ""
        if route in ROUTES:
            self.calls[route] += 1
        # The SDK sends the key as x-api-key or, in recent versions, as a
        # bearer token: both are accepted.
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        key = request.headers.get("x-api-key") or (bearer if scheme.lower() == "bearer" else "")
        if route in ROUTES and not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return json_response(_error("authentication_error", "invalid x-api-key"), 401)
        fault = self._take_fault(route)
        try:
            if fault is None:
                return await handler(request)
            kind, params = fault
            if kind in FAULTS:
                status, etype, message = FAULTS[kind]
                return json_response(_error(etype, message), status)
            if kind == "hang":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), float(params.get("seconds", 3600)))
                return json_response(_error("api_error", "hung"), 504)
            resp = await handler(request)  # reset_after: the work is done, the answer lost
            if request.transport is not None:
                request.transport.abort()
            return resp
        except ApiError as exc:
            return json_response(_error(exc.type, exc.message), exc.status)

    # ---- batches ---------------------------------------------------------------------

    def _resolve(self, custom_id: str, params: dict[str, Any]) -> str:
        scripted = self._scripted_outcome(custom_id)
        if scripted is not None:
            return scripted
        meta = params.get("metadata")
        return self._marked_outcome(meta.get("emulate") if isinstance(meta, dict) else None, params)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise ApiError(400, "invalid_request_error", "body: invalid JSON") from None
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            raise ApiError(400, "invalid_request_error", "requests: at least one required")
        if len(reqs) > MAX_REQUESTS:
            raise ApiError(
                400, "invalid_request_error", f"requests: at most {MAX_REQUESTS} requests per batch"
            )
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
                raise ApiError(
                    400,
                    "invalid_request_error",
                    f"requests.{i}.custom_id: String should match pattern "
                    "'^[a-zA-Z0-9_-]{1,64}$'",
                )
            if cid in seen:
                raise ApiError(
                    400,
                    "invalid_request_error",
                    f"requests.{i}.custom_id: duplicate custom_id {cid}",
                )
            seen.add(cid)
            if not isinstance(r.get("params"), dict):
                raise ApiError(400, "invalid_request_error", f"requests.{i}.params: required")
        now = time.time()
        items = []
        for r in reqs:
            self.submissions[r["custom_id"]] += 1
            items.append(
                Request(r["custom_id"], r["params"], self._resolve(r["custom_id"], r["params"]))
            )
        script = self._batch_scripts.popleft() if self._batch_scripts else None
        b = Batch(
            id=f"msgbatch_{uuid.uuid4().hex[:24]}",
            created_at=now,
            requests=items,
            script=script,
            ends_at=now + self.in_progress_seconds,
        )
        if script and script[0] == "expire":
            b.expired = True
        self.batches[b.id] = b
        return json_response(self._view(b))

    def _batch(self, request: web.Request) -> Batch:
        b = self.batches.get(request.match_info["id"])
        if b is None:
            raise ApiError(404, "not_found_error", "message batch not found")
        return b

    async def _retrieve(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._view(self._batch(request)))

    async def _list(self, request: web.Request) -> web.StreamResponse:
        limit = min(1000, max(1, int(request.query.get("limit", "20"))))
        ordered = sorted(self.batches.values(), key=lambda b: (b.created_at, b.id), reverse=True)
        ids = [b.id for b in ordered]
        after, before = request.query.get("after_id"), request.query.get("before_id")
        if after in ids:
            ordered = ordered[ids.index(after) + 1 :]
        elif before in ids:
            ordered = ordered[: ids.index(before)][-limit:]
        page = ordered[:limit]
        data = [self._view(b) for b in page]
        return json_response(
            {
                "data": data,
                "has_more": len(ordered) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        self._advance(b)
        if b.ended_at is None and b.cancel_at is None:
            b.cancel_at = time.time()
        self._advance(b)
        return json_response(self._view(b))

    async def _results(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        self._advance(b)
        if b.ended_at is None:
            raise ApiError(
                404, "not_found_error", "results are not available until the batch has ended"
            )
        resp = web.StreamResponse(headers={"Content-Type": "application/binary"})
        await resp.prepare(request)
        # Any order: the adapter must join by custom_id.
        for line in reversed(b.results):
            await resp.write(orjson.dumps(line) + b"\n")
        await resp.write_eof()
        return resp

    async def _sync(self, request: web.Request) -> web.StreamResponse:
        params = orjson.loads(await request.read())
        meta = as_dict(params.get("metadata"))
        key = str(meta.get("batchd_custom_id") or request.headers.get("x-custom-id") or "")
        self.sync_submissions[key] += 1
        outcome = self._resolve(key, params)
        if outcome in _ERRORED:
            etype, message = _ERRORED[outcome]
            status = {"invalid_request_error": 400, "overloaded_error": 529}.get(etype, 500)
            return json_response(_error(etype, message), status)
        if outcome != "ok":
            return json_response(_error("overloaded_error", "Overloaded"), 529)
        return json_response(message_for(params))

    # ---- lifecycle (computed on access) ---------------------------------------------

    def _advance(self, b: Batch) -> None:
        if b.ended_at is not None:
            return
        now = time.time()
        kind, params = b.script or ("", {})
        ran = int(params.get("ran", 0)) if kind in ("expire", "partial") else len(b.requests)
        if kind == "hold":
            ran = 0
        if b.cancel_at is not None:
            if now >= b.cancel_at + self.cancelling_seconds:
                # A plain batch cancelled before it ended ran nothing.
                self._end(b, ran if kind else 0, "canceled")
            return
        if b.expired or now >= b.created_at + self.expiry_seconds:
            self._end(b, ran, "expired")
            return
        if kind in ("hold", "partial"):
            return
        if now >= b.ends_at:
            self._end(b, len(b.requests), "expired")

    def _end(self, b: Batch, ran: int, rest: str) -> None:
        b.ended_at = time.time()
        for i, r in enumerate(b.requests):
            outcome = r.outcome if i < ran else rest
            if outcome == "missing":
                continue
            if outcome == "ok":
                r.result = "succeeded"
                result: dict[str, Any] = {"type": "succeeded", "message": message_for(r.params)}
            elif outcome in _ERRORED:
                r.result = "errored"
                result = {"type": "errored", "error": _error(*_ERRORED[outcome])}
            else:
                r.result = outcome
                result = {"type": outcome}
            b.results.append({"custom_id": r.custom_id, "result": result})

    def _counts(self, b: Batch) -> dict[str, int]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for r in b.requests:
            counts[r.result or "processing"] += 1
        if b.ended_at is not None:
            counts["processing"] = 0
        return counts

    def _view(self, b: Batch) -> dict[str, Any]:
        self._advance(b)
        ended = b.ended_at is not None
        status = "ended" if ended else ("canceling" if b.cancel_at is not None else "in_progress")
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": self._counts(b),
            "ended_at": iso(b.ended_at),
            "created_at": iso(b.created_at),
            "expires_at": iso(b.created_at + 86400),
            "archived_at": None,
            "cancel_initiated_at": iso(b.cancel_at),
            "results_url": f"{self.base}/v1/messages/batches/{b.id}/results" if ended else None,
        }


async def _serve(args: argparse.Namespace) -> None:
    emulator = AnthropicEmulator(args.api_key, in_progress_seconds=args.in_progress_seconds)
    await serve_until_signalled(
        emulator.start(args.host, args.port), emulator.stop, "Anthropic emulator"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m batchd.emulator.anthropic",
        description="An in-memory Anthropic Message Batches API.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8098)
    p.add_argument("--api-key", default="test-key", help="the x-api-key clients must send")
    p.add_argument("--in-progress-seconds", type=float, default=0.0)
    asyncio.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
