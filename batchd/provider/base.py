"""The provider port: what batchd needs from a batch API, nothing more.

One adapter per provider SDK implements this Protocol (openai, azure and
openai_compatible on ``openai``; anthropic on ``anthropic``; gemini on
``google-genai``). Every method raises ``ProviderError`` (see
``batchd.errors``) for a failure it could not settle by itself, carrying
whether a retry is sensible.

The flow above the port speaks one dialect, OpenAI's, and each adapter
translates at its edge:

* input: the scheduler writes an OpenAI-shaped JSONL input file
  (``{"custom_id", "method", "url", "body"}`` lines); ``upload_file`` makes it
  available to ``create_batch`` in the provider's own form (a Files upload,
  Gemini's ``{"key", "request"}`` file, or inline requests read from the
  local file at create time for Anthropic and small Gemini batches);
* status: ``RemoteBatch.status`` is one of the OpenAI names below whatever the
  provider calls it (``provider_status`` keeps the provider's own word);
* results: ``download_file`` writes lines in batchd's line shape, the OpenAI
  batch output shape: ``{"custom_id", "response": {"status_code", "body"} |
  null, "error": {"code", "message"} | null}``. The body is the provider's own
  response (an Anthropic Message, a Gemini GenerateContentResponse), so a
  caller gets what the provider said; errors carry an HTTP-like status so one
  classifier (domain.classify_line) decides retryable or final.

Results may come back in any order from every provider: the router joins them
by custom_id, never by position.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from batchd.errors import ProviderError

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
LIVE_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


@dataclass(frozen=True, slots=True)
class ProviderLimits:
    """What one provider accepts, from its documentation; batchd splits and
    holds windows to stay inside it rather than have a batch refused."""

    max_lines: int
    max_bytes: int
    # Work that may wait at the provider at once, per model (None: no
    # documented cap). A window waits while submitting it would pass either.
    queued_requests: int | None = None
    queued_tokens: int | None = None
    # Whether a created batch carries our metadata (else reconciliation after
    # a crash matches on creation time and request count; see scheduler).
    batch_metadata: bool = True
    # How long a batch may run before the provider expires it.
    expiry_hours: int = 24
    max_custom_id: int = 512


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
    # The provider's own word for the status, when it differs from ``status``.
    provider_status: str | None = None
    # created_at to the microsecond, where the provider gives it (Anthropic).
    created_exact: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Provider(Protocol):
    name: str
    limits: ProviderLimits

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

    async def call_sync(
        self, endpoint: str, body: dict[str, Any], custom_id: str
    ) -> tuple[int, Any]:
        """One synchronous API call: (HTTP status, parsed body). An HTTP error is
        returned, not raised, so it is classified like a batch line; only a
        call that got no answer raises ``ProviderError``."""

    async def download_file(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest``; return the bytes written."""

    async def close(self) -> None: ...


Providers = Mapping[str, Provider]


def registry(providers: Provider | Providers) -> dict[str, Provider]:
    """Providers by name; one adapter stands for itself."""
    if isinstance(providers, Mapping):
        return dict(providers)
    return {providers.name: providers}


def pick(providers: Providers, name: str, operation: str) -> Provider:
    """The adapter of a configured provider. A batch or task of one no longer
    configured waits (retryable) until it is configured again."""
    found = providers.get(name)
    if found is None:
        raise ProviderError(
            f"{operation}: provider {name} is not configured here; configure "
            "it again to finish its work",
            operation=operation,
            code="unconfigured",
        )
    return found
