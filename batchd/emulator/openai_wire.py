"""Wire-level pieces of the emulator: the stored objects as the API shows them,
the error envelope, request checks, pagination and canned fault responses."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from batchd.emulator.openai_lines import LinePlan, error_body

FILE_TTL = 30 * 86400
CHUNK = 256 * 1024
_STATUS_FAULTS = frozenset({"http_500", "http_503", "http_429", "insufficient_quota"})


class UploadedFile(bytes):
    """The exact bytes of an upload, with the multipart filename beside them."""

    filename: str

    def __new__(cls, data: bytes, filename: str) -> UploadedFile:
        obj = super().__new__(cls, data)
        obj.filename = filename
        return obj


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def envelope(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(
        status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
    )


def json_response(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    expires_at: int | None
    deleted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.expires_at,
            "status_details": None,
        }


@dataclass
class EmulatedBatch:
    """One batch as the emulator sees it; the public fields mirror the wire object."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    status: str = "validating"
    stamps: dict[str, int | None] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "in_progress_at",
                "finalizing_at",
                "completed_at",
                "failed_at",
                "expired_at",
                "cancelling_at",
                "cancelled_at",
            )
        )
    )
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    request_counts: dict[str, int] = field(
        default_factory=lambda: {"total": 0, "completed": 0, "failed": 0}
    )
    model: str | None = None
    usage: dict[str, Any] | None = None
    lines: list[LinePlan] = field(default_factory=list)
    # Decided at create, revealed when validation ends.
    validation_errors: list[dict[str, Any]] = field(default_factory=list)
    script: tuple[str, dict[str, Any]] | None = None
    file_model: str | None = None
    output_ttl: int = FILE_TTL
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    deadline: float = 0.0  # loop time at which the completion window closes

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + 86400,
            **self.stamps,
            "request_counts": dict(self.request_counts),
            "metadata": self.metadata,
            "model": self.model,
            "usage": self.usage,
        }


@dataclass
class Fault:
    kind: str
    params: dict[str, Any]
    remaining: int


REQUEST_ID = web.RequestKey("request_id", str)
DOWNLOAD_FAULT = web.RequestKey("download_fault", Fault)


def fault_response(fault: Fault) -> web.Response | None:
    """The canned answer of a status fault (5xx, 429, 404, HTML 502), else None."""
    kind, params = fault.kind, fault.params
    if kind == "http_502_html":
        return web.Response(
            status=502,
            content_type="text/html",
            text="<html><head><title>502 Bad Gateway</title></head>"
            "<body><center><h1>502 Bad Gateway</h1></center>"
            "</body></html>",
        )
    if kind not in _STATUS_FAULTS and kind != "http_404":
        return None
    headers: dict[str, str] = {}
    if "retry_after" in params:
        headers["retry-after"] = str(params["retry_after"])
    if "retry_after_ms" in params:
        headers["retry-after-ms"] = str(params["retry_after_ms"])
    if "should_retry" in params:
        headers["x-should-retry"] = "true" if params["should_retry"] else "false"
    if kind == "http_404":
        return envelope(404, "No such object (emulated).", headers=headers)
    status, body = error_body(kind, "the model")
    return web.Response(
        status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
    )


def abort_connection(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


async def send_truncated(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Send half of a buffered response's body under its full Content-Length."""
    if not isinstance(resp, web.Response) or not isinstance(resp.body, bytes):
        return resp
    body = resp.body
    out = web.StreamResponse(
        status=resp.status,
        headers={"Content-Type": resp.content_type, "x-request-id": request[REQUEST_ID]},
    )
    out.content_length = len(body)
    await out.prepare(request)
    await out.write(body[: len(body) // 2])
    assert request.transport is not None
    request.transport.close()
    return out


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "We could not parse the JSON body of your request.") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise ApiError(
            400,
            "Invalid type for 'metadata': expected an object.",
            param="metadata",
            code="invalid_type",
        )
    if len(metadata) > 16:
        raise ApiError(
            400,
            "Invalid 'metadata': at most 16 key-value pairs are allowed.",
            param="metadata",
            code="invalid_value",
        )
    for key, value in metadata.items():
        if len(key) > 64:
            raise ApiError(
                400,
                "Invalid 'metadata': keys are at most 64 characters.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
        if not isinstance(value, str):
            raise ApiError(
                400,
                f"Invalid type for 'metadata.{key}': expected a string.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if len(value) > 512:
            raise ApiError(
                400,
                "Invalid 'metadata': values are at most 512 characters.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
    return dict(metadata)


def expiry_seconds(anchor: Any, seconds: Any, param: str) -> int:
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        value = -1
    if anchor != "created_at" or not 3600 <= value <= 2_592_000:
        raise ApiError(
            400,
            f"Invalid '{param}': anchor must be 'created_at' and seconds between 3600 and 2592000.",
            param=param,
            code="invalid_value",
        )
    return value


def page_limit(raw: str | None, *, default: int, most: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise ApiError(
            400,
            f"Invalid 'limit': must be between 1 and {most}.",
            param="limit",
            code="invalid_value",
        )
    return value


def ids_after(ids: list[str], after: str | None, count: int) -> list[str]:
    """The ``count`` ids following ``after`` (an unknown cursor gives an empty page)."""
    if after is None:
        return ids[:count]
    try:
        start = ids.index(after) + 1
    except ValueError:
        return []
    return ids[start : start + count]


def list_page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """A list envelope; ``items`` holds one extra element when there is a next page."""
    data = items[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(items) > limit,
    }
