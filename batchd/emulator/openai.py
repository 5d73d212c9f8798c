"""An in-memory OpenAI Files + Batches server (aiohttp) for tests, benchmarks
and ``batchd demo``, faithful to openai-batch-protocol.md §2-§9.

Time is scaled: every lifecycle phase lasts a configurable number of seconds
(0 by default, so a batch settles within milliseconds) and the "24h" window is
``completion_window_seconds``. Each batch runs as one background task.

Three scripting layers decide what happens, all deterministic:

* per line (``script_line``, the ``metadata.emulate`` body marker,
  ``failure_rates``): the outcome of one submission of a ``custom_id``;
* per batch (``script_batch``): validation failure, token limit, expiry,
  someone else's cancel, a stuck finalize;
* per route (``inject``): HTTP faults, hangs, resets, broken bodies and
  truncated downloads, counted in ``calls``.

A *submission* is a ``custom_id`` appearing in the input file of a created
batch (whether or not the batch later runs) or a synchronous call naming it;
each submission consumes one scripted outcome. Scripts and submission counts
are kept per *key*: a custom_id's own value, except that batchd's per-attempt
line ids (``t<task>r<replay>a<attempt>``, batchd.domain.line_id) count per
task, ``t<task>``, so a ``*N`` marker means the task's first N submissions.

``record()`` (also ``GET /_emulator/record``) is what the emulator received:
every created batch with its custom_ids and status, synchronous submissions,
calls and faults applied; the crash-safety invariant checker compares it with
batchd's tables. ``POST /_emulator/faults`` injects a fault from outside the
process (same fields as ``inject``).

Run standalone: ``python -m batchd.emulator.openai --port 8099`` (any key; ``--api-key x``
to require one).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hmac
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from batchd.domain import line_task_id
from batchd.emulator.base import serve_until_signalled
from batchd.emulator.openai_lines import (
    ENDPOINTS,
    HTTP_ERRORS,
    NEVER_RAN_MESSAGES,
    OUTCOMES,
    SUCCESS_OUTCOMES,
    LinePlan,
    LineWriter,
    batch_usage,
    count_inputs,
    error_body,
    never_ran_line,
    parse_marker,
    ran_lines,
    success_body,
    tokens_for,
    usage_for,
)
from batchd.emulator.openai_wire import (
    CHUNK,
    DOWNLOAD_FAULT,
    FILE_TTL,
    REQUEST_ID,
    ApiError,
    EmulatedBatch,
    Fault,
    StoredFile,
    UploadedFile,
    abort_connection,
    check_metadata,
    envelope,
    expiry_seconds,
    fault_response,
    ids_after,
    json_body,
    json_response,
    list_page,
    page_limit,
    send_truncated,
)
from batchd.tokens import preload

__all__ = [
    "OUTCOMES",
    "EmulatedBatch",
    "Emulator",
    "StoredFile",
    "UploadedFile",
    "main",
    "usage_for",
]

ROUTES = frozenset(
    {
        "upload",
        "list_files",
        "retrieve_file",
        "download",
        "delete",
        "create",
        "retrieve",
        "list_batches",
        "cancel",
        "sync",
    }
)
FAULTS = frozenset(
    {
        "http_500",
        "http_502_html",
        "http_503",
        "http_429",
        "insufficient_quota",
        "http_404",
        "timeout_after_commit",
        "hang",
        "reset_before",
        "reset_after",
        "invalid_json",
        "truncate",
        "slow",
    }
)
BATCH_SCRIPTS = frozenset(
    {"validation_failed", "token_limit_exceeded", "expire", "cancel", "stuck_finalizing"}
)
_UPLOAD_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_MAX_REPORTED_ERRORS = 1000  # a 50k-line bad file would otherwise make every GET huge
_HANG_DEFAULT = 3600.0
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def script_key(custom_id: str) -> str:
    """What scripts and submission counts are kept by (module docstring)."""
    task = line_task_id(custom_id)
    return custom_id if task is None else f"t{task}"


class Emulator:
    def __init__(
        self,
        api_key: str | None = "test-key",
        *,
        validating_seconds: float = 0,
        in_progress_seconds: float = 0,
        finalizing_seconds: float = 0,
        cancelling_seconds: float = 0,
        completion_window_seconds: float = 86400,
        write_cancelled_lines: bool = True,
        known_models: set[str] | None = None,
        failure_rates: dict[str, float] | None = None,
        seed: int = 0,
        sync_latency_seconds: float | tuple[float, float] = 0.0,
        key_of: Callable[[str], str] | None = None,
        upper_case_statuses: bool = False,
    ) -> None:
        unknown = set(failure_rates or {}) - OUTCOMES
        if unknown:
            raise ValueError(f"unknown outcomes in failure_rates: {sorted(unknown)}")
        self.api_key = api_key
        self.key_of = key_of or script_key
        # Together answers VALIDATING, IN_PROGRESS, COMPLETED...
        self.upper_case_statuses = upper_case_statuses
        self.validating_seconds = validating_seconds
        self.in_progress_seconds = in_progress_seconds
        self.finalizing_seconds = finalizing_seconds
        self.cancelling_seconds = cancelling_seconds
        self.completion_window_seconds = completion_window_seconds
        self.write_cancelled_lines = write_cancelled_lines
        self.known_models = set(known_models) if known_models is not None else None
        self.failure_rates = dict(failure_rates or {})
        self.seed = seed
        self._rng = random.Random(seed)
        # A synchronous call takes this long: a constant, or uniform in (low, high).
        self.sync_latency_seconds = sync_latency_seconds

        self.files: dict[str, StoredFile] = {}
        self.received_files: dict[str, UploadedFile] = {}
        self.batches: dict[str, EmulatedBatch] = {}
        self.submissions: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        # Every synchronous answer that billed usage: (model, (input, cached, output)).
        self.billed_sync: list[tuple[str, tuple[int, int, int]]] = []
        self.sync_submissions: collections.Counter[str] = collections.Counter()
        self.faults_applied: collections.Counter[str] = collections.Counter()
        self._line_scripts: dict[str, collections.deque[str]] = {}
        self._batch_scripts: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._faults: dict[str, collections.deque[Fault]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # ---- scripting -------------------------------------------------------------------

    def script_line(self, custom_id: str, *outcomes: str) -> None:
        """Queue outcomes for the next submissions of ``custom_id``, one each."""
        bad = set(outcomes) - OUTCOMES
        if bad:
            raise ValueError(f"unknown outcomes {sorted(bad)}; known: {sorted(OUTCOMES)}")
        self._line_scripts.setdefault(custom_id, collections.deque()).extend(outcomes)

    def script_batch(self, kind: str, **params: Any) -> None:
        """Queue a batch-level behaviour for the next created batch."""
        if kind not in BATCH_SCRIPTS:
            raise ValueError(f"unknown batch script {kind!r}; known: {sorted(BATCH_SCRIPTS)}")
        self._batch_scripts.append((kind, params))

    def inject(self, route: str, fault: str, times: int = 1, **params: Any) -> None:
        """Answer the next ``times`` requests to ``route`` with ``fault``."""
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; known: {sorted(ROUTES)}")
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {sorted(FAULTS)}")
        self._faults.setdefault(route, collections.deque()).append(Fault(fault, params, times))

    def record(self) -> dict[str, Any]:
        """What was received, for audits: batches (with the custom_ids each one
        planned to run), synchronous submissions, calls and faults applied."""
        return {
            "batches": [
                {
                    "id": b.id,
                    "status": b.status,
                    "metadata": b.metadata,
                    "created_at": b.created_at,
                    "endpoint": b.endpoint,
                    "custom_ids": [p.custom_id for p in b.lines],
                    "request_counts": dict(b.request_counts),
                    "error_codes": [e.get("code") for e in b.errors or []],
                    "cancel_requested": b.cancel_requested.is_set(),
                }
                for b in self.batches.values()
            ],
            "sync_submissions": dict(self.sync_submissions),
            "calls": dict(self.calls),
            "faults_applied": dict(self.faults_applied),
        }

    def created_batches_by_metadata(self, key: str, value: str) -> list[EmulatedBatch]:
        return [b for b in self.batches.values() if (b.metadata or {}).get(key) == value]

    # ---- lifecycle of the server ----------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # Usage counts OpenAI models' tokens: load the vocabularies before
        # serving, off the event loop (a second or so), not in a request.
        await asyncio.to_thread(preload, ["gpt-4o", "gpt-4"])
        # A short shutdown grace: hanging handlers are woken by _closing anyway.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound = self._runner.addresses[0][1]
        return f"http://{host}:{bound}/v1"

    async def stop(self) -> None:
        self._closing.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024**3)
        r = app.router
        # The same API under the URL shapes of its other users: OpenAI at /v1,
        # Groq at /openai/v1, Azure at /openai (deployments for sync calls). A
        # route's name after "." is only its shape; faults address the route.
        for prefix, shape in (("/v1", ""), ("/openai/v1", ".groq"), ("/openai", ".azure")):
            r.add_post(f"{prefix}/files", self._upload, name="upload" + shape)
            r.add_get(f"{prefix}/files", self._list_files, name="list_files" + shape)
            r.add_get(f"{prefix}/files/{{id}}", self._retrieve_file, name="retrieve_file" + shape)
            r.add_get(f"{prefix}/files/{{id}}/content", self._download, name="download" + shape)
            r.add_delete(f"{prefix}/files/{{id}}", self._delete, name="delete" + shape)
            r.add_post(f"{prefix}/batches", self._create, name="create" + shape)
            r.add_get(f"{prefix}/batches", self._list_batches, name="list_batches" + shape)
            r.add_get(f"{prefix}/batches/{{id}}", self._retrieve, name="retrieve" + shape)
            r.add_post(f"{prefix}/batches/{{id}}/cancel", self._cancel, name="cancel" + shape)
            for path in (
                "chat/completions",
                "embeddings",
                "responses",
                "completions",
                "moderations",
            ):
                sync = "sync_" + path.replace("/", "_")
                if shape == ".azure":
                    r.add_post(
                        f"{prefix}/deployments/{{deployment}}/{path}", self._sync, name=sync + shape
                    )
                else:
                    r.add_post(f"{prefix}/{path}", self._sync, name=sync + shape)
        r.add_get("/_emulator/record", self._admin_record, name="admin_record")
        r.add_post("/_emulator/faults", self._admin_faults, name="admin_faults")
        return app

    # ---- middleware: request id, auth, counters, faults, error envelope ---------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        request_id = f"req_{uuid.uuid4().hex}"
        request[REQUEST_ID] = request_id
        name = (request.match_info.route.name or "").partition(".")[0] or None
        route = "sync" if name and name.startswith("sync_") else name
        if route in ROUTES:
            self.calls[route] += 1
        try:
            if not self._authorized(request):
                resp: web.StreamResponse = envelope(
                    401,
                    "Incorrect API key provided. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                    code="invalid_api_key",
                )
            else:
                fault = self._take_fault(route)
                resp = await (
                    self._apply_fault(fault, request, handler) if fault else handler(request)
                )
        except ApiError as exc:
            resp = envelope(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code)
        except web.HTTPException as exc:
            resp = envelope(exc.status, exc.reason)
        except ConnectionError:
            raise  # the client is gone (or a fault closed the socket): nothing to answer
        except Exception as exc:
            resp = envelope(
                500, f"Emulator error: {type(exc).__name__}: {exc}", type_="server_error"
            )
        if not resp.prepared:
            resp.headers["x-request-id"] = request_id
        return resp

    def _authorized(self, request: web.Request) -> bool:
        azure_key = request.headers.get("api-key")  # Azure's header
        if azure_key is not None:
            return self.api_key is None or hmac.compare_digest(
                azure_key.strip().encode(), self.api_key.encode()
            )
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        # With no key of its own (the command line's default) any bearer
        # token will do: `batchd serve` aimed at it without OPENAI_API_KEY
        # sends a placeholder.
        return self.api_key is None or hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def _take_fault(self, route: str | None) -> Fault | None:
        queue = self._faults.get(route or "")
        if not queue:
            return None
        fault = queue[0]
        self.faults_applied[f"{route}:{fault.kind}"] += 1
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        return fault

    async def _hang(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _apply_fault(
        self, fault: Fault, request: web.Request, handler: _Handler
    ) -> web.StreamResponse:
        kind, params = fault.kind, fault.params
        canned = fault_response(fault)
        if canned is not None:
            return canned
        if kind == "hang":
            await self._hang(float(params.get("seconds", _HANG_DEFAULT)))
            return envelope(504, "Gateway timeout (emulated hang).", type_="server_error")
        if kind == "reset_before":
            abort_connection(request)
            return web.Response()
        route_name = (request.match_info.route.name or "").partition(".")[0]
        if kind == "slow" and route_name != "download":
            await self._hang(float(params.get("seconds", 1.0)))
            return await handler(request)
        if kind in ("truncate", "slow"):
            if route_name == "download":
                request[DOWNLOAD_FAULT] = fault
                return await handler(request)
            return await send_truncated(request, await handler(request))
        # The remaining faults do the work first: the server committed, the client
        # cannot know it.
        resp = await handler(request)
        if kind == "timeout_after_commit":
            await self._hang(float(params.get("seconds", _HANG_DEFAULT)))
        elif kind == "reset_after":
            abort_connection(request)
        elif kind == "invalid_json":
            return web.Response(status=200, body=b'{"id": "batch_', content_type="application/json")
        return resp

    # ---- admin: what tests and soaks need from outside the process ------------------

    async def _admin_record(self, _request: web.Request) -> web.StreamResponse:
        return json_response(self.record())

    async def _admin_faults(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        params = body.get("params") or {}
        try:
            self.inject(
                str(body.get("route")), str(body.get("fault")), int(body.get("times", 1)), **params
            )
        except (ValueError, TypeError) as exc:
            raise ApiError(400, str(exc)) from None
        return json_response({"queued": True})

    # ---- files -----------------------------------------------------------------------

    def _new_file(self, filename: str, purpose: str, data: bytes, ttl: int | None) -> StoredFile:
        now = int(time.time())
        f = StoredFile(
            id=f"file-{uuid.uuid4().hex[:22]}",
            filename=filename,
            purpose=purpose,
            data=data,
            created_at=now,
            expires_at=now + ttl if ttl else None,
        )
        self.files[f.id] = f
        return f

    def _file(self, file_id: str) -> StoredFile:
        f = self.files.get(file_id)
        if f is None or f.deleted:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return f

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "Uploads must be multipart/form-data.", code="invalid_value")
        fields: dict[str, str] = {}
        data: bytearray | None = None
        filename = "upload"
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "file":
                filename = part.filename or "upload"
                data = bytearray()
                while chunk := await part.read_chunk(CHUNK):
                    data += chunk
            elif part.name:
                fields[part.name] = await part.text()
        if data is None:
            raise ApiError(
                400,
                "Missing required parameter: 'file'.",
                param="file",
                code="missing_required_parameter",
            )
        purpose = fields.get("purpose")
        if purpose not in _UPLOAD_PURPOSES:
            raise ApiError(
                400,
                f"Invalid value for 'purpose': {purpose!r}.",
                param="purpose",
                code="invalid_value",
            )
        ttl: int | None = FILE_TTL if purpose == "batch" else None
        if "expires_after[seconds]" in fields:
            ttl = expiry_seconds(
                fields.get("expires_after[anchor]"),
                fields["expires_after[seconds]"],
                "expires_after",
            )
        f = self._new_file(filename, purpose, bytes(data), ttl)
        self.received_files[f.id] = UploadedFile(f.data, filename)
        return json_response(f.to_json())

    async def _retrieve_file(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._file(request.match_info["id"]).to_json())

    async def _delete(self, request: web.Request) -> web.StreamResponse:
        f = self._file(request.match_info["id"])
        f.deleted = True
        f.data = b""  # free memory; received_files keeps the audit copy of uploads
        return json_response({"id": f.id, "object": "file", "deleted": True})

    async def _list_files(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        limit = page_limit(q.get("limit"), default=10_000, most=10_000)
        purpose = q.get("purpose")
        ids = [
            f.id
            for f in self.files.values()
            if not f.deleted and (purpose is None or f.purpose == purpose)
        ]
        if q.get("order", "desc") != "asc":
            ids.reverse()
        page = ids_after(ids, q.get("after"), limit + 1)
        return json_response(list_page([self.files[i].to_json() for i in page], limit))

    async def _download(self, request: web.Request) -> web.StreamResponse:
        data = self._file(request.match_info["id"]).data
        fault = request.get(DOWNLOAD_FAULT)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "application/octet-stream",
                "x-request-id": request[REQUEST_ID],
            }
        )
        if fault is not None and fault.kind == "truncate":
            mode = fault.params.get("mode", "content_length")
            cut = int(len(data) * float(fault.params.get("fraction", 0.5)))
            if mode == "clean":
                # A complete HTTP response whose body ends mid-line: not just
                # before or after a newline, where it would read as a whole file.
                while cut > 1 and b"\n" in data[cut - 1 : cut + 1]:
                    cut -= 1
                resp.content_length = cut
                await resp.prepare(request)
                await resp.write(data[:cut])
                await resp.write_eof()
                return resp
            if mode == "chunked":
                resp.enable_chunked_encoding()
            else:
                resp.content_length = len(data)
            await resp.prepare(request)
            await resp.write(data[:cut])
            assert request.transport is not None
            request.transport.close()  # flushes what was written, then FIN mid-body
            return resp
        resp.content_length = len(data)
        await resp.prepare(request)
        view = memoryview(data)
        if fault is not None and fault.kind == "slow":
            step = int(fault.params.get("chunk_bytes", 1024))
            delay = float(fault.params.get("delay", 0.05))
            for i in range(0, len(data), step):
                await resp.write(view[i : i + step])
                await self._hang(delay)
        else:
            for i in range(0, len(data), CHUNK):
                await resp.write(view[i : i + CHUNK])
        await resp.write_eof()
        return resp

    # ---- batches ---------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        for key in ("input_file_id", "endpoint", "completion_window"):
            if key not in body:
                raise ApiError(
                    400,
                    f"Missing required parameter: '{key}'.",
                    param=key,
                    code="missing_required_parameter",
                )
        endpoint = body["endpoint"]
        if endpoint not in ENDPOINTS:
            raise ApiError(
                400,
                f"Invalid value for 'endpoint': {endpoint!r}. Supported "
                f"values are: {', '.join(sorted(ENDPOINTS))}.",
                param="endpoint",
                code="invalid_value",
            )
        if body["completion_window"] != "24h":
            raise ApiError(
                400,
                "Invalid value for 'completion_window': only '24h' is supported.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = check_metadata(body.get("metadata"))
        ttl = FILE_TTL
        if isinstance(body.get("output_expires_after"), dict):
            oea = body["output_expires_after"]
            ttl = expiry_seconds(oea.get("anchor"), oea.get("seconds"), "output_expires_after")
        file_id = body["input_file_id"]
        source = self.files.get(file_id) if isinstance(file_id, str) else None
        if source is None or source.deleted or source.purpose != "batch":
            raise ApiError(400, f"Cannot find file {file_id}.", param="file_id")

        b = EmulatedBatch(
            id=f"batch_{uuid.uuid4().hex}",
            endpoint=endpoint,
            input_file_id=file_id,
            completion_window="24h",
            metadata=metadata,
            created_at=int(time.time()),
            output_ttl=ttl,
            deadline=asyncio.get_running_loop().time() + self.completion_window_seconds,
        )
        b.script = self._batch_scripts.popleft() if self._batch_scripts else None
        self.batches[b.id] = b
        task = asyncio.create_task(self._lifecycle(b, source.data), name=f"emulator-{b.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return json_response(self._batch_json(b))

    async def _retrieve(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._batch_json(self._batch(request.match_info["id"])))

    def _batch_json(self, b: EmulatedBatch) -> dict[str, Any]:
        view = b.to_json()
        if self.upper_case_statuses:
            view["status"] = str(view["status"]).upper()
        return view

    def _batch(self, batch_id: str) -> EmulatedBatch:
        b = self.batches.get(batch_id)
        if b is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return b

    async def _list_batches(self, request: web.Request) -> web.StreamResponse:
        limit = page_limit(request.query.get("limit"), default=20, most=100)
        ids = list(reversed(self.batches))  # insertion order is creation order
        page = ids_after(ids, request.query.get("after"), limit + 1)
        return json_response(list_page([self._batch_json(self.batches[i]) for i in page], limit))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request.match_info["id"])
        if b.status in ("completed", "failed", "expired"):
            raise ApiError(409, f"Cannot cancel a batch with status '{b.status}'.")
        if b.status not in ("cancelling", "cancelled"):
            self._request_cancel(b)
        return json_response(self._batch_json(b))

    def _request_cancel(self, b: EmulatedBatch) -> None:
        b.status = "cancelling"
        b.stamps["cancelling_at"] = int(time.time())
        b.cancel_requested.set()

    # ---- planning: parse, validate, decide outcomes (once, as validation starts) ------

    def _plan(self, b: EmulatedBatch, data: bytes) -> None:
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        endpoint = b.endpoint

        def err(code: str, line: int, param: str | None, message: str) -> None:
            errors.append({"code": code, "line": line, "param": param, "message": message})

        for lineno, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue  # blank lines (a trailing one, CRLF leftovers) are tolerated
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                err("invalid_json_line", lineno, None, "This line is not parseable as valid JSON.")
                continue
            missing = [k for k in ("custom_id", "method", "url", "body") if obj.get(k) is None]
            for key in missing:
                err(
                    "missing_required_parameter",
                    lineno,
                    key,
                    f"Missing required parameter: '{key}'.",
                )
            if missing:
                continue
            custom_id, body = obj["custom_id"], obj["body"]
            if not isinstance(custom_id, str) or not isinstance(body, dict):
                bad = "custom_id" if not isinstance(custom_id, str) else "body"
                err("invalid_request", lineno, bad, f"'{bad}' has the wrong type.")
                continue
            if obj["url"] != endpoint:
                err(
                    "invalid_url",
                    lineno,
                    "url",
                    "The URL provided for this request does not match the batch endpoint.",
                )
            if body.get("stream") is True:
                err(
                    "streaming_unsupported",
                    lineno,
                    "body.stream",
                    "Streaming is not supported in the Batch API.",
                )
            model = body.get("model")
            model = model if isinstance(model, str) else ""
            if self.known_models is not None and model not in self.known_models:
                err(
                    "model_not_found",
                    lineno,
                    "body.model",
                    f"The provided model '{model}' is not supported by the Batch API.",
                )
            if b.file_model is None:
                b.file_model = model
            elif model != b.file_model:
                err(
                    "invalid_request",
                    lineno,
                    "body.model",
                    f"All requests in a batch input file must use the same model; line {lineno} "
                    f"uses '{model}', earlier lines use '{b.file_model}'.",
                )
            if custom_id in seen:
                err(
                    "duplicate_custom_id",
                    lineno,
                    "custom_id",
                    f"The custom_id '{custom_id}' appears more than once in this file.",
                )
                continue
            seen.add(custom_id)
            key = self.key_of(custom_id)
            self.submissions[key] += 1
            outcome = self._resolve(key, body)
            plan = LinePlan(custom_id, outcome, model)
            if outcome in SUCCESS_OUTCOMES:
                plan.tokens = tokens_for(endpoint, body)
                plan.n_inputs = count_inputs(endpoint, body)
            b.lines.append(plan)

        if not errors and not b.lines:
            err("empty_file", 0, None, "The input file contains no requests.")
            errors[-1]["line"] = None
        script = b.script
        if script and script[0] == "validation_failed":
            errors += [
                {
                    "code": e.get("code", "invalid_request"),
                    "line": e.get("line"),
                    "param": e.get("param"),
                    "message": e.get("message", "Invalid request."),
                }
                for e in script[1].get("errors")
                or [
                    {
                        "code": "invalid_request",
                        "line": 1,
                        "param": "body",
                        "message": "Emulated validation failure.",
                    }
                ]
            ]
        elif script and script[0] == "token_limit_exceeded" and not errors:
            errors.append(
                {
                    "code": "token_limit_exceeded",
                    "line": None,
                    "param": None,
                    "message": f"Enqueued token limit reached for {b.file_model} in "
                    "organization org-emulator. Limit: 2,000,000 enqueued tokens. "
                    "Please try again once some in_progress batches have been "
                    "completed.",
                }
            )
        b.validation_errors = errors[:_MAX_REPORTED_ERRORS]

    def _resolve(self, custom_id: str, body: dict[str, Any]) -> str:
        """The outcome of this submission: script, then body marker, then rates, then ok."""
        queue = self._line_scripts.get(custom_id)
        if queue:
            return queue.popleft()
        meta = body.get("metadata")
        marker = parse_marker(meta.get("emulate")) if isinstance(meta, dict) else None
        if marker is not None:
            name, count = marker
            if name not in OUTCOMES:
                return "http_400"  # visible to whoever wrote the bad marker
            if count is None or self.submissions[custom_id] <= count:
                return name
            return "ok"
        if self.failure_rates:
            draw = self._rng.random()
            for name, rate in self.failure_rates.items():
                if draw < rate:
                    return name
                draw -= rate
        return "ok"

    # ---- the background lifecycle ----------------------------------------------------

    async def _pause(
        self, b: EmulatedBatch, seconds: float, *, cancellable: bool, expirable: bool
    ) -> str | None:
        """Wait ``seconds``; return "cancel" or "expire" if either cut the wait short."""
        loop = asyncio.get_running_loop()
        left = b.deadline - loop.time() if expirable else math.inf
        if cancellable and b.cancel_requested.is_set():
            return "cancel"
        if left <= 0:
            return "expire"
        wait = min(seconds, left)
        if wait > 0:
            if cancellable:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(b.cancel_requested.wait(), wait)
            else:
                await asyncio.sleep(wait)
        if cancellable and b.cancel_requested.is_set():
            return "cancel"
        return "expire" if seconds >= left else None

    async def _lifecycle(self, b: EmulatedBatch, data: bytes) -> None:
        # As on the real API, the create call answers at once ("validating")
        # and the file is read after: a 50,000-line file takes the emulator
        # a sixth of a second to plan, which is not the caller's to wait for.
        self._plan(b, data)
        event = await self._pause(b, self.validating_seconds, cancellable=True, expirable=True)
        if event is None and b.validation_errors:
            b.errors = b.validation_errors
            self._enter(b, "failed")
            return
        if event is not None:
            await self._settle(b, event, ran=0)
            return
        self._enter(b, "in_progress")
        n = len(b.lines)
        b.request_counts = {"total": n, "completed": 0, "failed": 0}
        kind, params = b.script or ("", {})
        fraction = float(params.get("run_fraction", 0.5)) if kind in ("expire", "cancel") else 1.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        event = await self._pause(
            b, self.in_progress_seconds * fraction, cancellable=True, expirable=True
        )
        if event is None and kind in ("expire", "cancel"):
            if kind == "cancel":
                self._request_cancel(b)
            await self._settle(b, kind, ran=math.floor(n * fraction))
            return
        if event is not None:
            elapsed = loop.time() - started
            share = elapsed / self.in_progress_seconds if self.in_progress_seconds else 0.0
            await self._settle(b, event, ran=min(n, math.floor(n * min(share, fraction))))
            return
        self._enter(b, "finalizing")
        hold = float(params.get("seconds", 0)) if kind == "stuck_finalizing" else 0.0
        # Expiry while finalizing is unconfirmed on the real API; the emulator lets it finish.
        event = await self._pause(
            b, self.finalizing_seconds + hold, cancellable=True, expirable=False
        )
        if event is not None:
            await self._settle(b, event, ran=n)
            return
        self._finish(b, ran=n, never_ran=None)
        self._enter(b, "completed")

    async def _settle(self, b: EmulatedBatch, event: str, *, ran: int) -> None:
        if event == "expire":
            if not b.validation_errors:
                self._finish(b, ran=ran, never_ran="batch_expired")
            self._enter(b, "expired")
            return
        await self._pause(b, self.cancelling_seconds, cancellable=False, expirable=False)
        if not b.validation_errors:
            self._finish(
                b, ran=ran, never_ran="batch_cancelled" if self.write_cancelled_lines else ""
            )
        self._enter(b, "cancelled")

    def _enter(self, b: EmulatedBatch, status: str) -> None:
        b.status = status
        b.stamps[f"{status}_at"] = int(time.time())

    def _finish(self, b: EmulatedBatch, *, ran: int, never_ran: str | None) -> None:
        """Write the output/error files for the first ``ran`` lines (input order) and
        never-ran lines for the rest (none when ``never_ran`` is "")."""
        out: list[bytes] = []
        err: list[bytes] = []
        tokens = [0, 0, 0]
        writer = LineWriter(b.endpoint)
        for plan in b.lines[:ran]:
            if plan.outcome == "ok":  # the common case, kept off the general path
                out.append(writer.success(plan))
            else:
                o, e = ran_lines(writer, plan)
                out += o
                err += e
            if plan.outcome in SUCCESS_OUTCOMES:
                inp, cached, output = plan.tokens
                tokens[0] += inp
                tokens[1] += cached
                tokens[2] += output
        if never_ran:
            err += [never_ran_line(p.custom_id, never_ran) for p in b.lines[ran:]]
        # Output order is not input order on the real API; clients must not rely on it.
        rng = random.Random(f"{self.seed}:{b.id}")
        rng.shuffle(out)
        rng.shuffle(err)
        if out:
            b.output_file_id = self._new_file(
                f"{b.id}_output.jsonl", "batch_output", b"\n".join(out) + b"\n", b.output_ttl
            ).id
        if err:
            b.error_file_id = self._new_file(
                f"{b.id}_error.jsonl", "batch_output", b"\n".join(err) + b"\n", b.output_ttl
            ).id
        b.request_counts = {"total": len(b.lines), "completed": len(out), "failed": len(err)}
        b.model = b.file_model or None
        b.usage = batch_usage((tokens[0], tokens[1], tokens[2]))

    # ---- synchronous endpoints -------------------------------------------------------

    async def _sync(self, request: web.Request) -> web.StreamResponse:
        """Answer one request directly, by the same outcome engine as batch lines.

        The custom_id for scripts and counting comes from the ``x-custom-id`` header or
        ``body.metadata.custom_id``; without one, scripts and rates still apply but
        nothing is counted.
        """
        # The OpenAI name of the endpoint whatever the URL shape (Azure:
        # /openai/deployments/{d}/chat/completions, Groq: /openai/v1/...).
        tail = (
            request.path.split("/deployments/", 1)[-1].split("/", 1)[-1]
            if "/deployments/" in request.path
            else request.path.split("/v1/", 1)[-1]
        )
        endpoint = "/v1/" + tail
        body = await json_body(request)
        if body.get("stream") is True:
            raise ApiError(
                400,
                "The emulator does not stream; send stream=false.",
                param="stream",
                code="unsupported_value",
            )
        model = body.get("model") if isinstance(body.get("model"), str) else ""
        assert isinstance(model, str)
        if self.known_models is not None and model not in self.known_models:
            status, err = error_body("http_404", model)
            return web.Response(
                status=status, body=orjson.dumps(err), content_type="application/json"
            )
        meta = body.get("metadata")
        custom_id = request.headers.get("x-custom-id") or (
            meta.get("custom_id") if isinstance(meta, dict) else None
        )
        key = ""
        if isinstance(custom_id, str):
            key = self.key_of(custom_id)
            self.submissions[key] += 1
            self.sync_submissions[custom_id] += 1
        outcome = self._resolve(key, body)
        latency = self.sync_latency_seconds
        delay = self._rng.uniform(*latency) if isinstance(latency, tuple) else latency
        if delay > 0:
            await asyncio.sleep(delay)
        if outcome in HTTP_ERRORS:
            status, err = error_body(outcome, model)
            return web.Response(
                status=status, body=orjson.dumps(err), content_type="application/json"
            )
        if outcome in NEVER_RAN_MESSAGES or outcome == "missing":
            return envelope(408, "Request timed out.", type_="timeout", code="timeout")
        if outcome == "malformed":
            return web.Response(body=b'{"id": "chatcmpl-', content_type="application/json")
        plan = LinePlan(
            str(custom_id or ""),
            outcome,
            model,
            tokens_for(endpoint, body),
            count_inputs(endpoint, body),
        )
        self.billed_sync.append((model, plan.tokens))
        return json_response(success_body(endpoint, plan))


def _parse_rates(pairs: list[str]) -> dict[str, float]:
    rates: dict[str, float] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        rates[name.strip()] = float(value)
    return rates


async def _serve(args: argparse.Namespace) -> None:
    emulator = Emulator(
        args.api_key,
        validating_seconds=args.validating_seconds,
        in_progress_seconds=args.in_progress_seconds,
        finalizing_seconds=args.finalizing_seconds,
        cancelling_seconds=args.cancelling_seconds,
        completion_window_seconds=args.completion_window_seconds,
        write_cancelled_lines=not args.omit_cancelled_lines,
        known_models=set(args.known_model) if args.known_model else None,
        failure_rates=_parse_rates(args.failure_rate),
        seed=args.seed,
    )
    await serve_until_signalled(emulator.start(args.host, args.port), emulator.stop, "emulator")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m batchd.emulator.openai",
        description="An in-memory OpenAI Files + Batches API.",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (loopback unless you say otherwise)"
    )
    p.add_argument("--port", type=int, default=8099)
    p.add_argument(
        "--api-key", default=None, help="the Bearer token clients must send (default: any token)"
    )
    p.add_argument(
        "--failure-rate",
        action="append",
        default=[],
        metavar="OUTCOME=RATE",
        help=f"random per-line outcome rate; outcomes: {', '.join(sorted(OUTCOMES))}",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--known-model",
        action="append",
        default=[],
        help="accept only these models (repeatable; default: every model)",
    )
    for phase in ("validating", "in-progress", "finalizing", "cancelling"):
        p.add_argument(f"--{phase}-seconds", type=float, default=0.0)
    p.add_argument(
        "--completion-window-seconds",
        type=float,
        default=86400.0,
        help="the emulated length of the '24h' window",
    )
    p.add_argument(
        "--omit-cancelled-lines",
        action="store_true",
        help="leave never-run lines of cancelled batches out of the error file",
    )
    asyncio.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
