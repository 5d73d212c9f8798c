"""An in-memory Gemini API Batch Mode server (aiohttp) for tests and
``batchd demo``, speaking the wire protocol ``google-genai`` uses:

* files: the resumable upload (``POST /upload/v1beta/files`` with
  ``X-Goog-Upload-Command: start`` answers ``X-Goog-Upload-URL``; chunks are
  POSTed there with ``upload`` / ``upload, finalize``) and
  ``GET /v1beta/files/{id}:download?alt=media``;
* batches: ``POST /v1beta/models/{model}:batchGenerateContent`` (``batch.
  inputConfig`` holds ``fileName`` or ``requests.requests``), ``GET
  /v1beta/batches/{id}``, ``GET /v1beta/batches`` (``pageSize``/``pageToken``,
  answered as ``operations``), ``POST /v1beta/batches/{id}:cancel``; a job is an
  operation whose ``metadata`` carries ``state`` (``BATCH_STATE_*``) and, once
  done, ``output`` (``responsesFile`` or ``inlinedResponses``);
* ``POST /v1beta/models/{model}:generateContent`` for the sync lane.

Auth is the ``x-goog-api-key`` header. Scripting as the other emulators:
``script_line(key, *outcomes)`` (or ``"emulate"`` in a file line's request:
``outcome``, or ``outcome*N`` for the first N submissions of that request;
outcomes ``ok``, ``invalid_argument``, ``resource_exhausted``, ``internal``,
``unavailable``, ``missing``), ``script_batch`` (``hold``, ``expire`` /
``cancelled_keeps`` with ``ran=N``, ``fail``), ``inject(route, fault)`` and
``record()`` / ``GET /_emulator/record``. Run standalone:
``python -m batchd.emulator.gemini --port 8097``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass
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
    {"ok", "invalid_argument", "resource_exhausted", "internal", "unavailable", "missing"}
)
ROUTES = frozenset({"upload", "download", "create", "retrieve", "list", "cancel", "sync"})
FAULTS = {
    "http_500": (500, "INTERNAL"),
    "http_503": (503, "UNAVAILABLE"),
    "http_429": (429, "RESOURCE_EXHAUSTED"),
    "http_400": (400, "INVALID_ARGUMENT"),
    "http_404": (404, "NOT_FOUND"),
}
FAULT_KINDS = frozenset({*FAULTS, "reset_after", "truncate"})
BATCH_SCRIPTS = frozenset({"hold", "expire", "fail"})
_ERRORS = {
    "invalid_argument": (3, "INVALID_ARGUMENT", "Request contains an invalid argument."),
    "resource_exhausted": (8, "RESOURCE_EXHAUSTED", "Resource has been exhausted."),
    "internal": (13, "INTERNAL", "An internal error has occurred."),
    "unavailable": (14, "UNAVAILABLE", "The service is currently unavailable."),
}
_HTTP_OF = {3: 400, 8: 429, 13: 500, 14: 503}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(slots=True)
class Item:
    key: str
    request: dict[str, Any]
    outcome: str
    billed: bool = False


@dataclass(slots=True)
class Job:
    name: str
    model: str
    display_name: str
    created_at: float
    items: list[Item]
    inline: bool
    script: tuple[str, dict[str, Any]] | None
    ends_at: float
    state: str = "BATCH_STATE_PENDING"
    ended_at: float | None = None
    cancelled: bool = False
    output: dict[str, Any] | None = None


def usage_for(request: dict[str, Any]) -> dict[str, int]:
    """promptTokenCount = len(compact JSON of ``contents``) // 4 (at least 1);
    candidatesTokenCount = ``generationConfig.maxOutputTokens`` or 16."""
    prompt = max(1, len(orjson.dumps(request.get("contents", []))) // 4)
    gen = as_dict(request.get("generationConfig"))
    out = gen.get("maxOutputTokens")
    out = out if isinstance(out, int) and out > 0 else 16
    return {
        "promptTokenCount": prompt,
        "candidatesTokenCount": out,
        "totalTokenCount": prompt + out,
    }


def response_for(request: dict[str, Any], model: str) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": "ok"}], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": usage_for(request),
        "modelVersion": model.removeprefix("models/"),
        "responseId": uuid.uuid4().hex[:16],
    }


def _status(code: int, status: str, message: str) -> dict[str, Any]:
    return {"code": code, "message": message, "status": status}


class GeminiEmulator(ScriptedEmulator):
    OUTCOMES = OUTCOMES
    ROUTES = ROUTES
    FAULT_KINDS = FAULT_KINDS
    BATCH_SCRIPTS = BATCH_SCRIPTS

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        running_seconds: float = 0.0,
        expiry_seconds: float = 48 * 3600.0,
    ) -> None:
        self.running_seconds = running_seconds
        self.expiry_seconds = expiry_seconds
        self.jobs: dict[str, Job] = {}
        self.files: dict[str, bytes] = {}
        self._uploads: dict[str, tuple[dict[str, Any], bytearray]] = {}
        super().__init__(api_key)

    # ---- scripting -------------------------------------------------------------------

    def expire_now(self, name: str) -> None:
        job = self.jobs[name]
        job.script = ("expire", (job.script or ("", {}))[1])
        job.ends_at = 0
        self._advance(job)

    def _batches(self) -> list[dict[str, Any]]:
        out = []
        for job in self.jobs.values():
            self._advance(job)
            out.append(
                {
                    "id": job.name,
                    "status": job.state,
                    "display_name": job.display_name,
                    "created_at": job.created_at,
                    "custom_ids": [i.key for i in job.items],
                    "billed": [i.key for i in job.items if i.billed],
                    "cancel_requested": job.cancelled,
                }
            )
        return out

    def _bad_request(self, message: str) -> Exception:
        return ApiError(400, "INVALID_ARGUMENT", message)

    # ---- server ----------------------------------------------------------------------

    def _add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_post("/upload/v1beta/files", self._upload, name="upload")
        r.add_get("/v1beta/files/{id}:download", self._download, name="download")
        r.add_post("/v1beta/models/{model}:batchGenerateContent", self._create, name="create")
        r.add_post("/v1beta/models/{model}:generateContent", self._sync, name="sync")
        r.add_get("/v1beta/batches", self._list, name="list")
        r.add_post("/v1beta/batches/{id}:cancel", self._cancel, name="cancel")
        r.add_get("/v1beta/batches/{id}", self._retrieve, name="retrieve")

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or ""
        if route in ROUTES:
            self.calls[route] += 1
            key = request.headers.get("x-goog-api-key", "")
            # An upload session's URL is its own credential (the SDK sends no
            # key with the chunks), as at Google.
            session = route == "upload" and request.query.get("upload_id") in self._uploads
            if not session and not hmac.compare_digest(key.encode(), self.api_key.encode()):
                return self._error(403, "PERMISSION_DENIED", "API key not valid.")
        fault = self._take_fault(route)
        try:
            if fault is None:
                return await handler(request)
            kind, _ = fault
            if kind in FAULTS:
                status, code = FAULTS[kind]
                return self._error(status, code, f"emulated {kind}")
            resp = await handler(request)
            if kind == "truncate" and isinstance(resp, web.Response) and resp.body:
                body = bytes(resp.body)  # type: ignore[arg-type]
                return web.Response(
                    body=body[: max(1, len(body) - 7)], content_type=resp.content_type
                )
            if request.transport is not None:  # reset_after
                request.transport.abort()
            return resp
        except ApiError as exc:
            return self._error(exc.status, exc.code, exc.message)

    def _error(self, status: int, code: str, message: str) -> web.Response:
        return json_response(
            {"error": {"code": status, "message": message, "status": code}}, status
        )

    # ---- files -----------------------------------------------------------------------

    def _file_view(self, name: str, display: str, size: int) -> dict[str, Any]:
        now = iso(time.time())
        return {
            "name": name,
            "displayName": display,
            "mimeType": "application/jsonl",
            "sizeBytes": str(size),
            "createTime": now,
            "updateTime": now,
            "state": "ACTIVE",
            "uri": f"{self.base}/v1beta/{name}",
            "source": "UPLOADED",
        }

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        command = request.headers.get("X-Goog-Upload-Command", "").lower()
        upload_id = request.query.get("upload_id")
        if command == "start":
            meta = orjson.loads(await request.read() or b"{}").get("file") or {}
            upload_id = uuid.uuid4().hex
            self._uploads[upload_id] = (meta, bytearray())
            url = f"{self.base}/upload/v1beta/files?upload_id={upload_id}"
            return json_response(
                {}, headers={"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"}
            )
        if upload_id not in self._uploads:
            raise ApiError(404, "NOT_FOUND", "unknown upload session")
        meta, data = self._uploads[upload_id]
        offset = int(request.headers.get("X-Goog-Upload-Offset", "0"))
        if offset != len(data):
            raise ApiError(400, "INVALID_ARGUMENT", f"offset {offset} != {len(data)}")
        data.extend(await request.read())
        if "finalize" not in command:
            return json_response({}, headers={"X-Goog-Upload-Status": "active"})
        del self._uploads[upload_id]
        name = f"files/{uuid.uuid4().hex[:16]}"
        self.files[name] = bytes(data)
        return json_response(
            {"file": self._file_view(name, str(meta.get("displayName", "")), len(data))},
            headers={"X-Goog-Upload-Status": "final"},
        )

    async def _download(self, request: web.Request) -> web.StreamResponse:
        data = self.files.get(f"files/{request.match_info['id']}")
        if data is None:
            raise ApiError(404, "NOT_FOUND", "file not found")
        return web.Response(body=data, content_type="application/octet-stream")

    # ---- batches ---------------------------------------------------------------------

    def _resolve(self, key: str, request: dict[str, Any]) -> str:
        scripted = self._scripted_outcome(key)
        if scripted is not None:
            return scripted
        return self._marked_outcome(request.get("emulate"), request)

    async def _create(self, request: web.Request) -> web.StreamResponse:
        model = "models/" + request.match_info["model"].removeprefix("models/")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise ApiError(400, "INVALID_ARGUMENT", "invalid JSON") from None
        batch = body.get("batch") or {}
        config = batch.get("inputConfig") or {}
        raw: list[tuple[str, dict[str, Any]]] = []
        if "fileName" in config:
            data = self.files.get(str(config["fileName"]))
            if data is None:
                raise ApiError(404, "NOT_FOUND", f"file {config['fileName']} not found")
            for n, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    raise ApiError(400, "INVALID_ARGUMENT", f"line {n}: invalid JSON") from None
                raw.append((str(obj.get("key", "")), obj.get("request") or {}))
            inline = False
        else:
            for r in (config.get("requests") or {}).get("requests") or []:
                raw.append((str((r.get("metadata") or {}).get("key", "")), r.get("request") or {}))
            inline = True
        if not raw:
            raise ApiError(400, "INVALID_ARGUMENT", "the batch holds no requests")
        items = []
        for key, req in raw:
            self.submissions[key] += 1
            items.append(Item(key, req, self._resolve(key, req)))
        now = time.time()
        job = Job(
            name=f"batches/{uuid.uuid4().hex[:20]}",
            model=model,
            display_name=str(batch.get("displayName", "")),
            created_at=now,
            items=items,
            inline=inline,
            script=self._batch_scripts.popleft() if self._batch_scripts else None,
            ends_at=now + self.running_seconds,
        )
        self.jobs[job.name] = job
        return json_response(self._view(job))

    def _job(self, request: web.Request) -> Job:
        job = self.jobs.get(f"batches/{request.match_info['id']}")
        if job is None:
            raise ApiError(404, "NOT_FOUND", "batch not found")
        return job

    async def _retrieve(self, request: web.Request) -> web.StreamResponse:
        return json_response(self._view(self._job(request)))

    async def _list(self, request: web.Request) -> web.StreamResponse:
        size = min(1000, max(1, int(request.query.get("pageSize", "50"))))
        start = int(request.query.get("pageToken") or 0)
        ordered = sorted(self.jobs.values(), key=lambda j: (j.created_at, j.name), reverse=True)
        page = ordered[start : start + size]
        body: dict[str, Any] = {"operations": [self._view(j) for j in page]}
        if start + size < len(ordered):
            body["nextPageToken"] = str(start + size)
        return json_response(body)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        self._advance(job)
        if job.ended_at is None:
            job.cancelled = True
            self._advance(job)
        return json_response({})

    async def _sync(self, request: web.Request) -> web.StreamResponse:
        model = request.match_info["model"]
        body = orjson.loads(await request.read())
        key = str(request.headers.get("x-custom-id", ""))
        self.sync_submissions[key] += 1
        outcome = self._resolve(key, body)
        if outcome in _ERRORS:
            code, status, message = _ERRORS[outcome]
            return self._error(_HTTP_OF[code], status, message)
        if outcome != "ok":
            return self._error(503, "UNAVAILABLE", "The service is currently unavailable.")
        return json_response(response_for(body, model))

    # ---- lifecycle (computed on access) ---------------------------------------------

    def _advance(self, job: Job) -> None:
        if job.ended_at is not None:
            return
        now = time.time()
        kind, params = job.script or ("", {})
        ran = int(params.get("ran", 0))
        if job.cancelled:
            self._end(job, ran if kind else 0, "BATCH_STATE_CANCELLED")
        elif kind == "fail":
            self._end(job, 0, "BATCH_STATE_FAILED")
        elif kind == "expire" or now >= job.created_at + self.expiry_seconds:
            self._end(job, ran, "BATCH_STATE_EXPIRED")
        elif kind == "hold":
            job.state = "BATCH_STATE_RUNNING"
        elif now >= job.ends_at:
            self._end(job, len(job.items), "BATCH_STATE_SUCCEEDED")
        else:
            job.state = "BATCH_STATE_RUNNING"

    def _end(self, job: Job, ran: int, state: str) -> None:
        job.ended_at = time.time()
        job.state = state
        if state == "BATCH_STATE_FAILED":
            return
        lines = []
        for item in job.items[:ran]:
            if item.outcome == "missing":
                continue
            if item.outcome == "ok":
                item.billed = True
                lines.append({"key": item.key, "response": response_for(item.request, job.model)})
            else:
                lines.append({"key": item.key, "error": _status(*_ERRORS[item.outcome])})
        lines.reverse()  # any order: the adapter joins by key
        if job.inline:
            job.output = {
                "inlinedResponses": {
                    "inlinedResponses": [
                        {
                            "metadata": {"key": line["key"]},
                            **(
                                {"response": line["response"]}
                                if "response" in line
                                else {"error": line["error"]}
                            ),
                        }
                        for line in lines
                    ]
                }
            }
        else:
            name = f"files/batch-{uuid.uuid4().hex[:16]}"
            self.files[name] = b"".join(orjson.dumps(line) + b"\n" for line in lines)
            job.output = {"responsesFile": name}

    def _view(self, job: Job) -> dict[str, Any]:
        self._advance(job)
        done = job.ended_at is not None
        ok = sum(1 for i in job.items if i.billed)
        meta: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "model": job.model,
            "displayName": job.display_name,
            "name": job.name,
            "createTime": iso(job.created_at),
            "updateTime": iso(time.time()),
            "state": job.state,
            "batchStats": {
                "requestCount": str(len(job.items)),
                "successfulRequestCount": str(ok),
                "pendingRequestCount": "0" if done else str(len(job.items)),
            },
        }
        if done:
            meta["endTime"] = iso(job.ended_at)
            if job.output is not None:
                meta["output"] = job.output
        return {"name": job.name, "metadata": meta, "done": done}


async def _serve(args: argparse.Namespace) -> None:
    emulator = GeminiEmulator(args.api_key, running_seconds=args.running_seconds)
    await serve_until_signalled(
        emulator.start(args.host, args.port), emulator.stop, "Gemini emulator"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m batchd.emulator.gemini", description="An in-memory Gemini API Batch Mode."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8097)
    p.add_argument("--api-key", default="test-key", help="the x-goog-api-key clients send")
    p.add_argument("--running-seconds", type=float, default=0.0)
    asyncio.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
