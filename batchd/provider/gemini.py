"""The provider port on Google's ``google-genai`` SDK: Gemini API Batch Mode.

A task's body is a REST GenerateContentRequest plus ``model``. A small batch
goes inline (``InlinedRequest``s, our id in each one's ``metadata.key``), a
larger one as an uploaded JSONL file of ``{"key", "request"}`` lines; the
job's ``display_name`` carries our batch id, which is how a job created but
not recorded is found after a crash.

Gemini's own truth, from the SDK (``google.genai.batches``, ``types``):

* states arrive as ``BATCH_STATE_*`` on the wire and ``JOB_STATE_*`` from the
  SDK (``_transformers.t_job_state``): both are accepted. PENDING/QUEUED are
  ``validating`` here, RUNNING ``in_progress``, SUCCEEDED (and
  PARTIALLY_SUCCEEDED) ``completed``, CANCELLING ``cancelling``, and FAILED,
  CANCELLED, EXPIRED (48 h) what they say. A job that ends with results keeps
  them: they are routed, and the requests they do not name are retried.
* results: a file (``dest.file_name``) of ``{"key", "response"}`` or
  ``{"key", "error"}`` lines, or ``dest.inlined_responses`` each with a
  ``response`` or an ``error`` status object. A status object's ``code`` is a
  google.rpc code (3 INVALID_ARGUMENT ...) or an HTTP status; both map to the
  HTTP status a line is classified by.
* the SDK resends a request whose connection dropped unless retry options are
  given (``_api_client``, "Retrying due to aiohttp error"): the client is
  built with one attempt, so a create is never sent twice behind our back.
* usage: ``usageMetadata`` (``promptTokenCount`` including
  ``cachedContentTokenCount``, ``candidatesTokenCount`` and
  ``thoughtsTokenCount`` billed as output; prices.tokens_from_usage).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from batchd import metrics
from batchd.errors import ProviderError, TruncatedFileError
from batchd.provider.base import ProviderLimits, RemoteBatch, RemoteFile
from batchd.provider.sdk_errors import SdkErrors, translated

GENERATE = "/v1beta/generateContent"
INLINE = "inline:"
DISPLAY_PREFIX = "batchd-"
_MB = 1024 * 1024
# 2 GB input file, 20 MB inline; jobs expire after 48 hours.
LIMITS = ProviderLimits(max_lines=100_000, max_bytes=2048 * _MB, expiry_hours=48)
INLINE_MAX_BYTES = 20 * _MB
_STATES = {
    "PENDING": "validating",
    "QUEUED": "validating",
    "RUNNING": "in_progress",
    "UPDATING": "in_progress",
    "PAUSED": "in_progress",
    "SUCCEEDED": "completed",
    "PARTIALLY_SUCCEEDED": "completed",
    "CANCELLING": "cancelling",
    "FAILED": "failed",
    "CANCELLED": "cancelled",
    "EXPIRED": "expired",
}
# google.rpc.Code -> HTTP status (google/rpc/code.proto).
_RPC_HTTP = {
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}
_STATUS_HTTP = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# REST request fields that GenerateContentConfig carries for an inline request.
_CONFIG_FIELDS = {
    "systemInstruction": "system_instruction",
    "safetySettings": "safety_settings",
    "tools": "tools",
    "toolConfig": "tool_config",
    "cachedContent": "cached_content",
}
_RETRYABLE_STATUS = frozenset({408, 409, 429})


def state_of(raw: str | None) -> str:
    """Our status for a job state, with either prefix (or none)."""
    word = (raw or "").upper().removeprefix("BATCH_STATE_").removeprefix("JOB_STATE_")
    return _STATES.get(word, "in_progress")


def http_status(error: dict[str, Any]) -> int:
    code = error.get("code")
    if isinstance(code, int) and code >= 100:
        return code
    if isinstance(code, int) and code in _RPC_HTTP:
        return _RPC_HTTP[code]
    return _STATUS_HTTP.get(str(error.get("status", "")).upper(), 500)


def normalize_result(key: Any, response: Any, error: Any) -> dict[str, Any]:
    """One Gemini result (a file line or an inlined response) in batchd's line shape."""
    if isinstance(response, dict) and not error:
        return {"custom_id": key, "response": {"status_code": 200, "body": response}, "error": None}
    err = error if isinstance(error, dict) else {"message": str(error)}
    status = http_status(err)
    code = str(err.get("status") or "") or None
    return {
        "custom_id": key,
        "response": {
            "status_code": status,
            "body": {
                "error": {
                    "code": code,
                    "status": err.get("status"),
                    "message": str(err.get("message", ""))[:500],
                }
            },
        },
        "error": None,
    }


class GeminiProvider:
    name = "gemini"
    limits = LIMITS

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        timeout: float = 120.0,
        inline_max_bytes: int = INLINE_MAX_BYTES,
    ) -> None:
        # retry_options with one attempt: without any, the SDK silently resends
        # a request whose connection dropped (aiohttp path, after 1-10 s), which
        # for batchGenerateContent creates a second, paid job. batchd retries
        # by its own rules, after looking for the job by our id.
        options = types.HttpOptions(
            base_url=base_url,
            api_version="v1beta",
            timeout=int(timeout * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        self._client = genai.Client(api_key=api_key, http_options=options)
        self._aio = self._client.aio
        self.inline_max_bytes = inline_max_bytes

    async def upload_file(self, path: Path, filename: str) -> RemoteFile:
        stat = await asyncio.to_thread(path.stat)
        if stat.st_size <= self.inline_max_bytes:
            requests = await asyncio.to_thread(_inlined, path)
            if requests is not None:
                return RemoteFile(
                    id=f"{INLINE}{path}",
                    filename=filename,
                    bytes=stat.st_size,
                    purpose="batch",
                    created_at=int(stat.st_mtime),
                )
        converted = path.with_suffix(".gemini.jsonl")
        await asyncio.to_thread(_write_gemini_file, path, converted)
        try:
            with _translated("upload_file"):
                obj = await self._aio.files.upload(
                    file=str(converted),
                    config={"display_name": filename, "mime_type": "application/jsonl"},
                )
        finally:
            converted.unlink(missing_ok=True)
        if not obj.name:
            raise ProviderError(
                "upload_file: Gemini returned a file without a name; retry later.",
                operation="upload_file",
            )
        return RemoteFile(
            id=obj.name,
            filename=filename,
            bytes=int(obj.size_bytes or 0),
            purpose="batch",
            created_at=int(obj.create_time.timestamp()) if obj.create_time else 0,
        )

    async def create_batch(
        self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, str]
    ) -> RemoteBatch:
        if endpoint != GENERATE:
            raise ProviderError(
                f"create_batch: Gemini batches run {GENERATE} only, not "
                f"{endpoint}; route the task to another provider.",
                operation="create_batch",
                status=400,
                retryable=False,
            )
        model = metadata.get("batchd_model", "")
        config = {"display_name": DISPLAY_PREFIX + metadata.get("batchd_batch_id", "")}
        src: Any
        if input_file_id.startswith(INLINE):
            src = await asyncio.to_thread(_inlined, Path(input_file_id.removeprefix(INLINE)))
        else:
            src = input_file_id
        with _translated("create_batch"):
            obj = await self._aio.batches.create(model=model, src=src, config=config)  # type: ignore[arg-type]
        return _batch(obj, input_file_id)

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        with _translated("get_batch"):
            obj = await self._aio.batches.get(name=batch_id)
        return _batch(obj)

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        with _translated("cancel_batch"):
            await self._aio.batches.cancel(name=batch_id)
        return await self.get_batch(batch_id)

    async def list_batches(self, page_size: int = 100) -> AsyncIterator[RemoteBatch]:
        with _translated("list_batches"):
            pager = await self._aio.batches.list(config={"page_size": page_size})
            async for obj in pager:
                yield _batch(obj)

    async def list_files(self, purpose: str = "batch") -> AsyncIterator[RemoteFile]:
        with _translated("list_files"):
            pager = await self._aio.files.list()
            async for obj in pager:
                yield RemoteFile(
                    id=obj.name or "",
                    filename=obj.display_name or "",
                    bytes=int(obj.size_bytes or 0),
                    purpose="batch",
                    created_at=int(obj.create_time.timestamp()) if obj.create_time else 0,
                )

    async def call_sync(
        self, endpoint: str, body: dict[str, Any], custom_id: str
    ) -> tuple[int, Any]:
        # The REST body goes out as it came in and the REST answer comes back
        # as it was sent, through the SDK's own request path (auth, base URL,
        # timeouts): the typed generate_content would rename and drop fields.
        model = str(body.get("model", "")).removeprefix("models/")
        request = {k: v for k, v in body.items() if k != "model"}
        try:
            with _translated("sync_call"):
                resp = await self._client._api_client.async_request(
                    "post",
                    f"models/{model}:generateContent",
                    request,
                    types.HttpOptions(headers={"x-custom-id": custom_id}),
                )
        except ProviderError as exc:
            cause = exc.__cause__
            if isinstance(cause, genai_errors.APIError):
                return int(cause.code), {
                    "error": {
                        "code": cause.status,
                        "status": cause.status,
                        "message": str(cause.message)[:500],
                    }
                }
            raise
        return 200, orjson.loads(resp.body) if resp.body else {}

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Results in batchd's line shape: from the result file, or from the
        job's inlined responses when ``file_id`` is ``inline:<job name>``."""
        if file_id.startswith(INLINE):
            with _translated("download_file"):
                obj = await self._aio.batches.get(name=file_id.removeprefix(INLINE))
            responses = obj.dest.inlined_responses if obj.dest else None
            return await asyncio.to_thread(_write_inlined, responses or [], dest)
        raw = dest.with_suffix(".raw")
        try:
            with _translated("download_file"):
                try:
                    await self._aio.files.download(file=file_id, destination=str(raw))
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                    raise TruncatedFileError(
                        f"The download of {file_id} broke off ({type(exc).__name__}); "
                        "download it again.",
                        operation="download_file",
                    ) from exc
            return await asyncio.to_thread(_convert_file, raw, dest, file_id)
        finally:
            raw.unlink(missing_ok=True)

    async def close(self) -> None:
        await self._aio.aclose()


def _inline_request(cid: str, body: dict[str, Any]) -> types.InlinedRequest | None:
    """An input line as the SDK's InlinedRequest, or None when the body holds
    a field the typed request cannot carry (then the batch goes as a file)."""
    rest = {k: v for k, v in body.items() if k != "model"}
    contents = rest.pop("contents", None)
    generation = rest.pop("generationConfig", None) or {}
    if not isinstance(generation, dict):
        return None
    config = dict(generation)
    for field, name in _CONFIG_FIELDS.items():
        if field in rest:
            config[name] = rest.pop(field)
    if rest:
        return None
    try:
        return types.InlinedRequest(
            contents=contents,
            config=types.GenerateContentConfig(**config) if config else None,
            metadata={"key": cid},
        )
    except (pydantic.ValidationError, TypeError, ValueError):
        return None


def _inlined(path: Path) -> list[types.InlinedRequest] | None:
    out = []
    with path.open("rb") as f:
        for raw in f:
            line = orjson.loads(raw)
            req = _inline_request(line["custom_id"], line["body"])
            if req is None:
                return None
            out.append(req)
    return out


def _write_gemini_file(src: Path, dest: Path) -> None:
    with src.open("rb") as f, dest.open("wb") as out:
        for raw in f:
            line = orjson.loads(raw)
            request = {k: v for k, v in line["body"].items() if k != "model"}
            out.write(orjson.dumps({"key": line["custom_id"], "request": request}) + b"\n")


def _write_inlined(responses: list[types.InlinedResponse], dest: Path) -> int:
    written = 0
    with dest.open("wb") as out:
        for r in responses:
            key = (r.metadata or {}).get("key")
            body = (
                r.response.model_dump(
                    mode="json", by_alias=True, exclude_none=True, exclude={"sdk_http_response"}
                )
                if r.response is not None
                else None
            )
            error = r.error.model_dump(mode="json", exclude_none=True) if r.error else None
            data = orjson.dumps(normalize_result(key, body, error)) + b"\n"
            out.write(data)
            written += len(data)
    return written


def _convert_file(raw: Path, dest: Path, file_id: str) -> int:
    written = 0
    last_ok = True
    with raw.open("rb") as f, dest.open("wb") as out:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                last_ok = False
                continue
            last_ok = True
            if not isinstance(obj, dict):
                continue
            data = (
                orjson.dumps(
                    normalize_result(
                        obj.get("key"), obj.get("response"), obj.get("error") or obj.get("status")
                    )
                )
                + b"\n"
            )
            out.write(data)
            written += len(data)
    if not last_ok:
        raise TruncatedFileError(
            f"The download of {file_id} ends in the middle of a line; download it again.",
            operation="download_file",
        )
    return written


def _batch(obj: types.BatchJob, input_file_id: str = "") -> RemoteBatch:
    if not obj.name:
        raise ProviderError(
            "Gemini returned a batch job without a name; retry later.", operation="get_batch"
        )
    raw_state = obj.state.value if obj.state is not None else None
    status = state_of(raw_state)
    output: str | None = None
    if obj.dest is not None and obj.dest.file_name:
        output = obj.dest.file_name
    elif obj.dest is not None and obj.dest.inlined_responses is not None:
        output = f"{INLINE}{obj.name}"
    display = obj.display_name or ""
    metadata = (
        {"batchd_batch_id": display.removeprefix(DISPLAY_PREFIX)}
        if display.startswith(DISPLAY_PREFIX)
        else None
    )
    errors = (
        [{"code": "batch_failed", "message": str(obj.error.message or "")[:500]}]
        if obj.error is not None
        else []
    )
    stats = obj.completion_stats
    counts = (
        {"completed": int(stats.successful_count or 0), "failed": int(stats.failed_count or 0)}
        if stats is not None
        else None
    )
    return RemoteBatch(
        id=obj.name,
        status=status,
        endpoint=GENERATE,
        input_file_id=input_file_id or (obj.src.file_name if obj.src and obj.src.file_name else ""),
        created_at=int(obj.create_time.timestamp()) if obj.create_time else 0,
        output_file_id=output,
        errors=errors,
        request_counts=counts,
        metadata=metadata,
        model=obj.model,
        provider_status=raw_state,
    )


def _translated(operation: str) -> AbstractContextManager[None]:
    return translated(operation, _SDK)


def _count(operation: str, code: str) -> None:
    metrics.PROVIDER_REQUESTS.labels(operation=operation, code=code).inc()


def _status_error(operation: str, exc: genai_errors.APIError) -> ProviderError:
    status = int(exc.code)
    retryable = status in _RETRYABLE_STATUS or status >= 500
    advice = "retry later" if retryable else "fix the request or the account; do not retry"
    code = exc.status if isinstance(exc.status, str) else None
    return ProviderError(
        f"{operation}: Gemini answered HTTP {status}{f' ({code})' if code else ''}: "
        f"{str(exc.message)[:300]}; {advice}.",
        operation=operation,
        status=status,
        code=code,
        retryable=retryable,
    )


_SDK = SdkErrors(
    name="Gemini",
    status=genai_errors.APIError,
    timeout=(TimeoutError, aiohttp.ServerTimeoutError),
    connection=(aiohttp.ClientError, OSError),
    status_code=lambda exc: str(exc.code),
    status_error=_status_error,
    reason=lambda exc: type(exc).__name__,
    count=_count,
)
