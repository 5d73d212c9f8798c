"""The provider port: what batchd needs from a batch API, nothing more.

Adapters (the openai SDK one, the emulator-backed tests) implement this
Protocol. Every method raises ``ProviderError`` (see ``batchd.errors``) for a
failure it could not settle by itself, carrying whether a retry is sensible.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
LIVE_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


@dataclass(frozen=True, slots=True)
class RemoteFile:
    id: str
    filename: str
    bytes: int
    purpose: str
    created_at: int


@dataclass(frozen=True, slots=True)
class RemoteBatch:
    """The provider's view of one batch, reduced to what we act on."""

    id: str
    status: str
    endpoint: str
    input_file_id: str
    created_at: int
    output_file_id: str | None = None
    error_file_id: str | None = None
    # batch-level validation errors: [{"code", "line", "param", "message"}]
    errors: list[dict[str, Any]] = field(default_factory=list)
    request_counts: dict[str, int] | None = None
    usage: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Provider(Protocol):
    async def upload_file(self, path: Path, filename: str) -> RemoteFile:
        """Upload a JSONL input file with purpose=batch."""

    async def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str],
    ) -> RemoteBatch: ...

    async def get_batch(self, batch_id: str) -> RemoteBatch: ...

    async def cancel_batch(self, batch_id: str) -> RemoteBatch:
        """Cancel; a batch that is already terminal is returned as is."""

    def list_batches(self, page_size: int = 100) -> AsyncIterator[RemoteBatch]:
        """Batches, newest first, across all pages."""

    def list_files(self, purpose: str = "batch") -> AsyncIterator[RemoteFile]:
        """Files of a purpose, newest first."""

    async def call_sync(self, endpoint: str, body: dict[str, Any], custom_id: str
                        ) -> tuple[int, Any]:
        """One synchronous API call: (HTTP status, parsed body). An HTTP error is
        returned, not raised, so it is classified like a batch line; only a
        call that got no answer raises ``ProviderError``."""

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest``; return the bytes written."""

    async def close(self) -> None: ...
