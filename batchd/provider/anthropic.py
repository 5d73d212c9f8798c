"""The provider port on Anthropic's SDK (``AsyncAnthropic``): Message Batches.

Anthropic takes a batch's requests inline (``{"custom_id", "params"}``, no
file upload) and serves its results as JSONL from the batch's ``results_url``
once processing has ended. So ``upload_file`` only checks the local input file
and names it; ``create_batch`` reads it and sends the requests; the results
stream is rewritten, line by line, into batchd's line shape (base.py).

Anthropic's own truth, from the SDK (``anthropic.types.messages``):

* ``processing_status`` is ``in_progress``, ``canceling`` or ``ended``; an
  ended batch is ``cancelled`` here when a cancel was initiated, ``expired``
  when some request expired (24 h passed), else ``completed``. An expired or
  cancelled batch keeps what finished: its succeeded lines are stored, the
  rest retried.
* result lines: ``succeeded`` (a Message), ``errored`` (an error object whose
  ``type`` says what: ``invalid_request_error`` is final; ``overloaded_error``,
  ``api_error`` and the like are retried), ``canceled`` and ``expired`` (never
  ran, not billed: retried).
* usage: ``input_tokens`` (uncached), ``cache_creation_input_tokens``,
  ``cache_read_input_tokens``, ``output_tokens`` (prices.tokens_from_usage).
* a batch carries no metadata: a batch created but not recorded is found by
  creation time and request count (scheduler._find_remote).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import anthropic
import orjson
from anthropic.types.messages import MessageBatch

from batchd import metrics
from batchd.backoff import retry_after_headers
from batchd.errors import ProviderError, TruncatedFileError
from batchd.provider.base import ProviderLimits, RemoteBatch, RemoteFile
from batchd.provider.sdk_errors import SdkErrors, translated

MESSAGES = "/v1/messages"
INLINE = "inline:"
# 100,000 requests or 256 MB a batch; 100,000 batch requests queued at tier 1.
LIMITS = ProviderLimits(
    max_lines=100_000,
    max_bytes=256 * 1024 * 1024,
    queued_requests=100_000,
    batch_metadata=False,
    expiry_hours=24,
    max_custom_id=64,
)
# The HTTP status each error type stands for (Anthropic's errors page), so a
# result line is classified like any other (domain.classify_status).
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "timeout_error": 504,
    "api_error": 500,
    "overloaded_error": 529,
}
_NEVER_RAN = {
    "canceled": ("batch_cancelled", "The request was not run: the batch was cancelled."),
    "expired": ("batch_expired", "The request was not run before the batch expired."),
}
_RETRYABLE_STATUS = frozenset({408, 409, 429})


class AnthropicProvider:
    name = "anthropic"
    limits = LIMITS

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 2,
    ) -> None:
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries
        )
        # Creates and cancels are never resent by the SDK (no idempotency key:
        # a resent create may make a second, paid batch).
        self._no_retry = self._client.with_options(max_retries=0)

    async def upload_file(self, path: Path, filename: str) -> RemoteFile:
        """Nothing leaves the machine: the requests go inline with the create.
        The file is checked here so a bad line fails before anything is sent."""
        size, mtime = await asyncio.to_thread(_check_input, path)
        return RemoteFile(
            id=f"{INLINE}{path}", filename=filename, bytes=size, purpose="batch", created_at=mtime
        )

    async def create_batch(
        self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, str]
    ) -> RemoteBatch:
        if endpoint != MESSAGES:
            raise ProviderError(
                f"create_batch: Anthropic batches run {MESSAGES} only, not "
                f"{endpoint}; route the task to another provider.",
                operation="create_batch",
                status=400,
                retryable=False,
            )
        path = Path(input_file_id.removeprefix(INLINE))
        requests = await asyncio.to_thread(_requests, path)
        with _translated("create_batch"):
            obj = await self._no_retry.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        return _batch(obj)

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        with _translated("get_batch"):
            obj = await self._client.messages.batches.retrieve(batch_id)
        return _batch(obj)

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        try:
            with _translated("cancel_batch"):
                obj = await self._no_retry.messages.batches.cancel(batch_id)
        except ProviderError as exc:
            # An ended batch cannot be cancelled: it is already what we want.
            if exc.status in (400, 409):
                return await self.get_batch(batch_id)
            raise
        return _batch(obj)

    async def list_batches(self, page_size: int = 100) -> AsyncIterator[RemoteBatch]:
        with _translated("list_batches"):
            async for obj in self._client.messages.batches.list(limit=page_size):
                yield _batch(obj)

    async def list_files(self, purpose: str = "batch") -> AsyncIterator[RemoteFile]:
        """Anthropic keeps no input files."""
        for _ in ():
            yield _
        return

    async def call_sync(
        self, endpoint: str, body: dict[str, Any], custom_id: str
    ) -> tuple[int, Any]:
        # No SDK retries: a resent POST may be billed twice.
        try:
            with _translated("sync_call"):
                data = await self._no_retry.post(
                    MESSAGES,
                    body=body,
                    cast_to=object,
                    options={"headers": {"x-custom-id": custom_id}},
                )
        except ProviderError as exc:
            cause = exc.__cause__
            if isinstance(cause, anthropic.APIStatusError):
                return cause.status_code, _error_body(cause)
            raise
        return 200, data

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a batch's results (``file_id`` is the batch id) into ``dest`` in
        batchd's line shape; returns the bytes written."""
        written = 0
        last_ok = True
        with _translated("download_file"):
            async with self._client.messages.batches.with_streaming_response.results(
                file_id
            ) as resp:
                out = await asyncio.to_thread(dest.open, "wb")
                try:
                    lines = resp.iter_lines().__aiter__()
                    while True:
                        try:
                            raw = await lines.__anext__()
                        except StopAsyncIteration:
                            break
                        except Exception as exc:
                            raise TruncatedFileError(
                                f"The results of {file_id} broke off after {written} bytes "
                                f"({type(exc).__name__}); download them again.",
                                operation="download_file",
                                retryable=True,
                            ) from exc
                        if not raw.strip():
                            continue
                        try:
                            line = orjson.loads(raw)
                        except orjson.JSONDecodeError:
                            last_ok = False
                            continue
                        last_ok = True
                        data = orjson.dumps(normalize_result(line)) + b"\n"
                        out.write(data)
                        written += len(data)
                finally:
                    out.close()
            if not last_ok:
                raise TruncatedFileError(
                    f"The results of {file_id} end in the middle of a line; download them again.",
                    operation="download_file",
                    retryable=True,
                )
        return written

    async def close(self) -> None:
        await self._client.close()


def normalize_result(line: dict[str, Any]) -> dict[str, Any]:
    """One Anthropic result line in batchd's line shape (base.py)."""
    cid = line.get("custom_id")
    result = _dict(line.get("result"))
    kind = result.get("type")
    if kind == "succeeded":
        return {
            "custom_id": cid,
            "response": {"status_code": 200, "body": result.get("message")},
            "error": None,
        }
    if kind == "errored":
        outer = _dict(result.get("error"))
        inner = _dict(outer.get("error")) or outer
        etype = str(inner.get("type") or "api_error")
        status = ERROR_STATUS.get(etype, 500)
        return {
            "custom_id": cid,
            "response": {
                "status_code": status,
                "body": {
                    "error": {
                        "type": etype,
                        "code": etype,
                        "message": str(inner.get("message", ""))[:500],
                    }
                },
            },
            "error": None,
        }
    code, message = _NEVER_RAN.get(str(kind), ("unknown_result", f"result type {kind!r}"))
    return {"custom_id": cid, "response": None, "error": {"code": code, "message": message}}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _check_input(path: Path) -> tuple[int, int]:
    """Size and mtime of an input file whose every line is a request."""
    size = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            size += len(raw)
            line = orjson.loads(raw)
            if not isinstance(line.get("custom_id"), str) or not isinstance(line.get("body"), dict):
                raise ProviderError(
                    f"upload_file: line {n} of {path.name} is not a request; it cannot be sent.",
                    operation="upload_file",
                    status=400,
                    retryable=False,
                )
    return size, int(path.stat().st_mtime)


def _requests(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        return [
            {"custom_id": line["custom_id"], "params": line["body"]}
            for line in map(orjson.loads, f)
        ]


def status_of(obj: MessageBatch) -> str:
    if obj.processing_status == "in_progress":
        return "in_progress"
    if obj.processing_status == "canceling":
        return "cancelling"
    if obj.cancel_initiated_at is not None:
        return "cancelled"
    if obj.request_counts.expired:
        return "expired"
    return "completed"


def _batch(obj: MessageBatch) -> RemoteBatch:
    counts = obj.request_counts
    total = counts.processing + counts.succeeded + counts.errored + counts.canceled + counts.expired
    status = status_of(obj)
    return RemoteBatch(
        id=obj.id,
        status=status,
        endpoint=MESSAGES,
        input_file_id="",
        created_at=int(obj.created_at.timestamp()),
        created_exact=obj.created_at.timestamp(),
        output_file_id=obj.id if obj.results_url else None,
        request_counts={
            "total": total,
            "completed": counts.succeeded,
            "failed": counts.errored + counts.canceled + counts.expired,
            **counts.model_dump(),
        },
        provider_status=obj.processing_status,
    )


def _translated(operation: str) -> AbstractContextManager[None]:
    return translated(operation, _SDK)


def _count(operation: str, code: str) -> None:
    metrics.PROVIDER_REQUESTS.labels(operation=operation, code=code).inc()


def _error_type(exc: anthropic.APIStatusError) -> str | None:
    body = exc.body
    if isinstance(body, dict):
        inner = _dict(body.get("error")) or body
        etype = inner.get("type")
        return etype if isinstance(etype, str) else None
    return None


def _status_error(operation: str, exc: anthropic.APIStatusError) -> ProviderError:
    status = exc.status_code
    etype = _error_type(exc)
    retryable = status in _RETRYABLE_STATUS or status >= 500
    verdict = exc.response.headers.get("x-should-retry", "").lower()
    if verdict in ("true", "false"):
        retryable = verdict == "true"
    advice = "retry later" if retryable else "fix the request or the account; do not retry"
    return ProviderError(
        f"{operation}: Anthropic answered HTTP {status}{f' ({etype})' if etype else ''}: "
        f"{str(exc.message)[:300]}; {advice}.",
        operation=operation,
        status=status,
        code=etype,
        retryable=retryable,
        retry_after=retry_after_headers(exc.response.headers),
    )


def _error_body(exc: anthropic.APIStatusError) -> dict[str, Any]:
    etype = _error_type(exc) or "api_error"
    return {"error": {"type": etype, "code": etype, "message": str(exc.message)[:500]}}


_SDK = SdkErrors(
    name="Anthropic",
    status=anthropic.APIStatusError,
    timeout=(anthropic.APITimeoutError,),
    connection=(anthropic.APIConnectionError,),
    status_code=lambda exc: str(exc.status_code),
    status_error=_status_error,
    reason=lambda exc: exc.message,
    count=_count,
)
