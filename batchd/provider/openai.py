"""The provider port on the official ``openai`` SDK: OpenAI itself
(``AsyncOpenAI``), Azure OpenAI global batch (``AsyncAzureOpenAI``, where a
line's model is the deployment name) and OpenAI-compatible batch APIs such as
Groq and Together (``AsyncOpenAI`` at their base URL). All three speak Files +
Batches; they differ in limits, URL shapes (the SDK builds them) and the case
of their status names (Together answers upper case).

The SDK does the HTTP and its own bounded retries; this adapter only shapes
calls (streamed downloads, no-retry cancel) and turns every failure into a
``ProviderError`` that says whether trying again makes sense.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal, cast

import openai
import orjson
from openai.types import Batch, FileObject

from batchd import metrics
from batchd.backoff import retry_after_headers
from batchd.errors import ProviderError, TruncatedFileError
from batchd.health import HEALTH
from batchd.provider.base import ProviderLimits, RemoteBatch, RemoteFile
from batchd.provider.sdk_errors import SdkErrors, translated

_Endpoint = Literal[
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
]
_RETRYABLE_STATUS = frozenset({408, 409, 429})
_OPERATIONS = (
    "upload_file",
    "create_batch",
    "get_batch",
    "cancel_batch",
    "list_batches",
    "list_files",
    "sync_call",
    "download_file",
)
_MB = 1024 * 1024

# openai-batch-protocol.md section 6 and shared/providers.md.
OPENAI_LIMITS = ProviderLimits(max_lines=50_000, max_bytes=200 * _MB)
# 100,000 lines and 200 MB a file; a queued-token quota per deployment
# (200M by default) counts every queued job together. Jobs are not expired.
AZURE_LIMITS = ProviderLimits(
    max_lines=100_000, max_bytes=200 * _MB, queued_tokens=200_000_000, expiry_hours=24 * 365
)
# Known OpenAI-compatible services by name; any other name gets OpenAI's.
COMPATIBLE_LIMITS = {
    # 50,000 lines / 200 MB; completion windows of 24h to 7d.
    "groq": ProviderLimits(max_lines=50_000, max_bytes=200 * _MB),
    # custom_id at most 64 characters, 50,000 requests / 100 MB, 30B tokens
    # queued per model.
    "together": ProviderLimits(
        max_lines=50_000, max_bytes=100 * _MB, queued_tokens=30_000_000_000, max_custom_id=64
    ),
}


class OpenAIProvider:
    name = "openai"
    limits = OPENAI_LIMITS

    def __init__(
        self,
        api_key: str,
        base_url: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 2,
        name: str = "openai",
        limits: ProviderLimits | None = None,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        self.name = name
        self.limits = limits or OPENAI_LIMITS
        self._client = client or openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries
        )
        # For cancel (a 409 means "already terminal"; the SDK would retry it
        # twice) and create (see create_batch).
        self._no_retry = self._client.with_options(max_retries=0)
        # The refused-credentials series exist from the start at 0, so the
        # first 401/403 is an increase the alert sees at once (a series born
        # at 1 has no earlier sample to rise from).
        for operation in _OPERATIONS:
            for code in ("401", "403"):
                metrics.PROVIDER_REQUESTS.labels(operation=operation, code=code)

    async def upload_file(self, path: Path, filename: str) -> RemoteFile:
        # A (name, open file) tuple reaches the multipart encoder as is, which reads
        # it in 64 KiB chunks and seeks back to 0 on a retry; a Path would be read
        # into memory whole.
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            with _translated("upload_file"):
                obj = await self._client.files.create(file=(filename, handle), purpose="batch")
        finally:
            handle.close()
        return _file(obj)

    async def create_batch(
        self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict[str, str]
    ) -> RemoteBatch:
        # No SDK retries here: the SDK would resend POST /batches with no
        # idempotency key after a timeout or 5xx and could create a second,
        # paid batch. The scheduler decides, after looking for our metadata.
        with _translated("create_batch"):
            obj = await self._no_retry.batches.create(
                input_file_id=input_file_id,
                endpoint=cast(_Endpoint, endpoint),
                completion_window=cast(Literal["24h"], completion_window),
                metadata=metadata,
            )
        return _batch(obj, "create_batch")

    async def get_batch(self, batch_id: str) -> RemoteBatch:
        with _translated("get_batch"):
            obj = await self._client.batches.retrieve(batch_id)
        return _batch(obj, "get_batch")

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        try:
            with _translated("cancel_batch"):
                obj = await self._no_retry.batches.cancel(batch_id)
        except ProviderError as exc:
            if exc.status == 409:
                return await self.get_batch(batch_id)
            raise
        return _batch(obj, "cancel_batch")

    async def list_batches(self, page_size: int = 100) -> AsyncIterator[RemoteBatch]:
        with _translated("list_batches"):
            async for obj in self._client.batches.list(limit=page_size):
                yield _batch(obj, "list_batches")

    async def list_files(self, purpose: str = "batch") -> AsyncIterator[RemoteFile]:
        with _translated("list_files"):
            async for obj in self._client.files.list(purpose=purpose, order="desc"):
                yield _file(obj)

    async def call_sync(
        self, endpoint: str, body: dict[str, Any], custom_id: str
    ) -> tuple[int, Any]:
        # No SDK retries: a resent POST may be billed twice; the sync lane
        # retries through the queue, with backoff, by the batch rules.
        path = endpoint.removeprefix("/v1")
        try:
            with _translated("sync_call"):
                data = await self._no_retry.post(
                    path, body=body, cast_to=object, options={"headers": {"x-custom-id": custom_id}}
                )
        except ProviderError as exc:
            cause = exc.__cause__
            if isinstance(cause, openai.APIStatusError):
                return cause.status_code, _error_body(cause)
            raise
        return 200, data

    async def download_file(self, file_id: str, dest: Path) -> int:
        written = 0
        tail = bytearray()  # the bytes after the last newline seen so far
        with _translated("download_file"):
            async with self._client.files.with_streaming_response.content(file_id) as resp:
                encoding = resp.headers.get("content-encoding", "identity").lower()
                length = resp.headers.get("content-length")
                expected = int(length) if length and encoding == "identity" else None
                chunks = resp.iter_bytes().__aiter__()
                out = await asyncio.to_thread(dest.open, "wb")
                try:
                    while True:
                        try:
                            chunk = await chunks.__anext__()
                        except StopAsyncIteration:
                            break
                        except Exception as exc:
                            # A cut stream surfaces as the transport's own exception
                            # (httpx2), which the SDK neither wraps nor retries.
                            raise TruncatedFileError(
                                f"The download of {file_id} broke off after {written} bytes "
                                f"({type(exc).__name__}); download it again.",
                                operation="download_file",
                                retryable=True,
                            ) from exc
                        out.write(chunk)
                        written += len(chunk)
                        cut = chunk.rfind(b"\n")
                        if cut < 0:
                            tail += chunk
                        else:
                            tail[:] = chunk[cut + 1 :]
                finally:
                    out.close()
            if expected is not None and written != expected:
                raise TruncatedFileError(
                    f"The download of {file_id} gave {written} of {expected} bytes; "
                    "download it again.",
                    operation="download_file",
                    retryable=True,
                )
            if tail.strip() and not _parses(bytes(tail)):
                raise TruncatedFileError(
                    f"The download of {file_id} ends in the middle of a line; download it again.",
                    operation="download_file",
                    retryable=True,
                )
        return written

    async def close(self) -> None:
        await self._client.close()


def azure_provider(
    api_key: str, endpoint: str, api_version: str, *, timeout: float = 120.0, max_retries: int = 2
) -> OpenAIProvider:
    """Azure OpenAI global batch: the same protocol under ``{endpoint}/openai``
    with ``api-version`` on every call and the deployment as a line's model."""
    client = openai.AsyncAzureOpenAI(
        api_key=api_key,
        azure_endpoint=endpoint,
        api_version=api_version,
        timeout=timeout,
        max_retries=max_retries,
    )
    return OpenAIProvider(api_key, name="azure", limits=AZURE_LIMITS, client=client)


def compatible_provider(
    name: str, api_key: str, base_url: str, *, timeout: float = 120.0, max_retries: int = 2
) -> OpenAIProvider:
    """An OpenAI-compatible Files + Batches service (``openai_compatible:<name>``)."""
    limits = COMPATIBLE_LIMITS.get(name.lower(), OPENAI_LIMITS)
    return OpenAIProvider(
        api_key,
        base_url,
        timeout=timeout,
        max_retries=max_retries,
        name=f"openai_compatible:{name}",
        limits=limits,
    )


def _parses(line: bytes) -> bool:
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return True


def _translated(operation: str) -> AbstractContextManager[None]:
    return translated(operation, _SDK)


PROVIDER = "openai"


def _count(operation: str, code: str) -> None:
    metrics.PROVIDER_REQUESTS.labels(operation=operation, code=code).inc()
    HEALTH.observe(PROVIDER, operation, int(code) if code.isdigit() else None)


def _status_error(operation: str, exc: openai.APIStatusError) -> ProviderError:
    status = exc.status_code
    code = exc.code if isinstance(exc.code, str) else None
    headers = exc.response.headers
    retryable = status in _RETRYABLE_STATUS or status >= 500
    # The provider's explicit verdict wins over the status class, as in the SDK.
    verdict = headers.get("x-should-retry", "").lower()
    if verdict in ("true", "false"):
        retryable = verdict == "true"
    if code == "insufficient_quota":
        retryable = False  # retrying spends nothing but time until someone pays
    advice = "retry later" if retryable else "fix the request or the account; do not retry"
    message = str(exc.body.get("message")) if isinstance(exc.body, dict) else exc.message
    return ProviderError(
        f"{operation}: the provider answered HTTP {status}"
        f"{f' ({code})' if code else ''}: {message[:300]}; {advice}.",
        operation=operation,
        status=status,
        code=code,
        retryable=retryable,
        retry_after=retry_after_headers(headers),
    )


def _error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    if isinstance(exc.body, dict):
        return {"error": exc.body}
    return {"error": {"message": str(exc.message)[:500], "code": None}}


def _file(obj: FileObject) -> RemoteFile:
    return RemoteFile(
        id=obj.id,
        filename=obj.filename,
        bytes=obj.bytes,
        purpose=obj.purpose,
        created_at=obj.created_at,
    )


def _batch(obj: Batch, operation: str) -> RemoteBatch:
    # The SDK parses leniently: a missing id or status arrives as None, not an error.
    if not isinstance(obj.id, str) or not isinstance(obj.status, str):
        raise ProviderError(
            f"{operation}: the provider returned a batch without an id or status; retry later.",
            operation=operation,
        )
    errors = [e.model_dump() for e in obj.errors.data] if obj.errors and obj.errors.data else []
    # Together answers VALIDATING, IN_PROGRESS, COMPLETED...: the same words.
    status = obj.status.lower()
    return RemoteBatch(
        id=obj.id,
        status=status,
        endpoint=obj.endpoint,
        provider_status=obj.status if status != obj.status else None,
        input_file_id=obj.input_file_id,
        created_at=obj.created_at,
        output_file_id=obj.output_file_id,
        error_file_id=obj.error_file_id,
        errors=errors,
        request_counts=obj.request_counts.model_dump() if obj.request_counts else None,
        usage=obj.usage.model_dump() if obj.usage else None,
        metadata=dict(obj.metadata) if obj.metadata else None,
        model=obj.model,
    )


_SDK = SdkErrors(
    name="the provider",
    status=openai.APIStatusError,
    timeout=(openai.APITimeoutError,),
    connection=(openai.APIConnectionError,),
    status_code=lambda exc: str(exc.status_code),
    status_error=_status_error,
    reason=lambda exc: exc.message,
    count=_count,
)
