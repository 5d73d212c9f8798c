"""Settings from the environment (DESIGN section 7), validated once at start."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from batchd.domain import (
    DEFAULT_LIMITS,
    DEFAULT_MODEL_ROUTES,
    MAX_CUSTOM_ID,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    PROVIDER_NAME,
    PROVIDER_NAMES,
    Limits,
    parse_client_budgets,
    parse_client_numbers,
    parse_client_profiles,
    parse_model_routes,
)
from batchd.errors import ConfigError

# Provider limits (openai-batch-protocol.md section 6).
PROVIDER_MAX_LINES = 50_000
PROVIDER_MAX_FILE_BYTES = 200 * 1024 * 1024
# Shortest callback signing secret: HMAC-SHA256's own key size, so a guessed
# or brute-forced key is never the weak link.
MIN_SECRET_BYTES = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATCHD_", extra="ignore", frozen=True)

    database_url: str | None = Field(None, description="PostgreSQL URL; embedded when unset")
    data_dir: Path = Field(Path("data"), description="embedded database, spool and archive")
    window_seconds: float = Field(900, gt=0, description="flush when the oldest task is this old")
    max_batch_items: int = Field(
        500, ge=1, le=PROVIDER_MAX_LINES, description="flush when a window holds this many"
    )
    max_file_bytes: int = Field(
        PROVIDER_MAX_FILE_BYTES,
        ge=1024,
        le=PROVIDER_MAX_FILE_BYTES,
        description="split a window before its input file passes this size",
    )
    max_attempts: int = Field(3, ge=1, le=20, description="submissions before the manual queue")
    poll_interval_seconds: float = Field(60, gt=0, description="how often live batches are checked")
    retry_backoff_seconds: float = Field(60, ge=0, description="base retry delay, doubled per try")
    completion_window: Literal["24h"] = Field("24h", description="sent to the provider")
    daily_budget_usd: Decimal | None = Field(None, ge=0, description="hard daily spend cap")
    prices_file: Path | None = Field(None, description="per-model prices JSON")
    archive_dir: Path | None = Field(None, description="JSONL audit archive")
    archive_retention_days: int | None = Field(None, ge=1, description="prune archive days")
    failure_alert_ratio: float = Field(0.03, ge=0, le=1, description="daily ALERT threshold")
    http_host: str = Field("127.0.0.1", description="ingest API address")
    http_port: int = Field(8080, ge=0, le=65535, description="ingest API port")
    ingest_tokens: SecretStr | None = Field(
        None, description="comma-separated bearer tokens; `client=token` names the client"
    )
    admin_tokens: SecretStr | None = Field(
        None,
        description="comma-separated name=token admin tokens: they see and act on every "
        "client's tasks (?client= narrows)",
    )
    client_max_queued: str | None = Field(
        None,
        description="client=N pairs: past N queued tasks that client gets 429 "
        "queue_full; others are not affected",
    )
    allowed_models: str | None = Field(
        None,
        description="comma-separated model globs (gpt-4o*) ingest accepts besides the "
        "models in the prices file; set, any other model is a 400",
    )
    ingest_tokens_file: Path | None = Field(
        None, description="TOML file of clients: tokens, callback secret, default callback_url"
    )
    callback_allowed_hosts: str | None = Field(
        None,
        description="comma-separated hosts callbacks may go to (*.domain, CIDR, *); "
        "unset refuses callbacks; a private, loopback or link-local address needs a CIDR entry",
    )
    callback_secret: SecretStr | None = Field(
        None,
        description="signing secret (at least 32 bytes) for callbacks of clients that "
        "have none of their own",
    )
    callback_max_attempts: int = Field(10, ge=1, le=50, description="callback delivery attempts")
    callback_backoff_seconds: float = Field(
        5, ge=0, description="base delay between callback attempts; doubles, with jitter"
    )
    callback_timeout_seconds: float = Field(10, gt=0, description="one callback POST's limit")
    callback_concurrency: int = Field(16, ge=1, description="callback POSTs in flight per replica")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error"
    )
    log_format: Literal["json", "console"] = Field(
        "json", description="json for machines, console for people"
    )
    openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("OPENAI_API_KEY", "BATCHD_OPENAI_API_KEY")
    )
    openai_base_url: str | None = Field(None, description="provider base URL ending in /v1")
    anthropic_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "BATCHD_ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str | None = Field(
        None, description="Anthropic base URL (an emulator's; the SDK's default when unset)"
    )
    gemini_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("GEMINI_API_KEY", "BATCHD_GEMINI_API_KEY")
    )
    gemini_base_url: str | None = Field(
        None, description="Gemini API base URL (an emulator's; the SDK's default when unset)"
    )
    gemini_inline_max_bytes: int = Field(
        20 * 1024 * 1024,
        ge=0,
        le=20 * 1024 * 1024,
        description="Gemini batches up to this many input bytes go inline, larger ones as an "
        "uploaded JSONL file",
    )
    azure_openai_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("AZURE_OPENAI_API_KEY", "BATCHD_AZURE_OPENAI_API_KEY")
    )
    azure_openai_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("AZURE_OPENAI_ENDPOINT", "BATCHD_AZURE_OPENAI_ENDPOINT"),
        description="https://<resource>.openai.azure.com",
    )
    azure_api_version: str = Field(
        "2024-10-21", min_length=1, description="Azure OpenAI api-version of every call"
    )
    model_routes: str = Field(
        DEFAULT_MODEL_ROUTES,
        description="comma-separated glob=provider, first match wins, "
        "for tasks naming no provider on an OpenAI endpoint",
    )
    queued_requests: str | None = Field(
        None,
        description="provider=N: requests that may wait at a provider per model "
        "(default: the provider's documented cap, e.g. anthropic=100000)",
    )
    queued_tokens: str | None = Field(
        None,
        description="provider=N: input tokens that may wait at a provider per model "
        "(default: the provider's documented cap, e.g. azure=200000000)",
    )
    shutdown_grace_seconds: float = Field(30, gt=0, description="SIGTERM drain limit")
    flush_on_shutdown: bool = Field(
        False, description="on SIGTERM, send every queued window now (flush reason drain)"
    )
    max_queued_tasks: int | None = Field(None, ge=1, description="ingest answers 429 past this")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="ingest body limit")
    ingest_timeout_seconds: float = Field(
        10,
        gt=0,
        le=300,
        description="longest an ingest request waits for the database "
        "(its turn to commit, a pooled connection, a lock) before 503",
    )
    max_pending_tasks: int = Field(
        20_000, ge=1, description="tasks waiting for a commit past which ingest answers 503"
    )
    max_wait_seconds: float = Field(
        300, ge=0, le=3600, description="longest ?wait on POST /v1/tasks"
    )
    max_waiters: int = Field(
        1000, ge=0, description="POST /v1/tasks?wait requests waiting at once; past it 429"
    )
    http_header_timeout_seconds: float = Field(
        15,
        gt=0,
        le=3600,
        description="a connection that sends no complete request head "
        "within this long (of opening, or of its last answer) is closed",
    )
    http_max_connections: int = Field(
        1000, ge=1, description="open client connections to the API; more are closed at once"
    )
    max_tasks_per_request: int = Field(
        10_000, ge=1, le=PROVIDER_MAX_LINES, description="tasks one ingest request may hold"
    )
    max_custom_id_chars: int = Field(
        MAX_CUSTOM_ID, ge=1, le=MAX_CUSTOM_ID, description="longest custom_id"
    )
    custom_id_pattern: str = Field(
        DEFAULT_LIMITS.custom_id_pattern,
        min_length=1,
        description="regular expression a whole custom_id must match",
    )
    max_task_body_bytes: int = Field(
        DEFAULT_LIMITS.task_body_bytes,
        ge=64,
        le=PROVIDER_MAX_FILE_BYTES,
        description="largest task body, as JSON",
    )
    max_body_depth: int = Field(
        DEFAULT_LIMITS.body_depth, ge=2, le=512, description="deepest nesting in a task body"
    )
    max_metadata_pairs: int = Field(
        MAX_METADATA_PAIRS, ge=0, le=MAX_METADATA_PAIRS, description="metadata pairs per task"
    )
    max_metadata_key_chars: int = Field(
        MAX_METADATA_KEY, ge=1, le=MAX_METADATA_KEY, description="longest metadata key"
    )
    max_metadata_value_chars: int = Field(
        MAX_METADATA_VALUE, ge=1, le=MAX_METADATA_VALUE, description="longest metadata value"
    )
    sync_concurrency: int = Field(8, ge=1, description="synchronous lane concurrency")
    batch_share: int = Field(100, ge=0, le=100, description="canary share sent to batches")
    client_budgets: str | None = Field(
        None,
        description="client=USD pairs: a client's own daily cap (UTC), inside "
        "BATCHD_DAILY_BUDGET_USD; its tasks past it wait, others go on",
    )
    client_profiles: str | None = Field(
        None,
        description="client=profile pairs (1h, 6h, 24h): the latency profile of a "
        "client's tasks that name none in metadata.latency_profile",
    )
    scheduler_interval_seconds: float = Field(1.0, gt=0, description="scheduler tick")
    retention_days: int = Field(
        30,
        ge=1,
        le=36_500,
        description="finished tasks, results, events, callbacks and "
        "batches older than this many days are deleted (failed tasks stay in the manual queue)",
    )
    retention_interval_seconds: float = Field(
        300, gt=0, description="how often the retention pass rolls up closed days and prunes"
    )
    retention_batch_rows: int = Field(
        2000,
        ge=1,
        le=100_000,
        description="rows one retention step deletes per table (one short transaction)",
    )
    lease_seconds: float = Field(300, gt=0, description="how long a replica's claim lasts")
    provider_timeout_seconds: float = Field(
        120, gt=0, description="longest wait for one provider call (the SDK retries twice)"
    )

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("http_host")
    @classmethod
    def _host_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("callback_secret")
    @classmethod
    def _secret_long(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(
                f"must be at least {MIN_SECRET_BYTES} bytes; make one with `openssl rand -hex 32`"
            )
        return v

    @field_validator("custom_id_pattern")
    @classmethod
    def _pattern_compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        return v

    @field_validator("model_routes")
    @classmethod
    def _routes_parse(cls, v: str) -> str:
        parse_model_routes(v)
        return v

    @field_validator("queued_requests", "queued_tokens")
    @classmethod
    def _queued_parse(cls, v: str | None) -> str | None:
        parse_provider_counts(v)
        return v

    @property
    def routes(self) -> tuple[tuple[str, str], ...]:
        return parse_model_routes(self.model_routes)

    @property
    def limits(self) -> Limits:
        return Limits(
            tasks_per_request=self.max_tasks_per_request,
            custom_id_chars=self.max_custom_id_chars,
            custom_id_pattern=self.custom_id_pattern,
            task_body_bytes=min(self.max_task_body_bytes, self.max_file_bytes),
            body_depth=self.max_body_depth,
            metadata_pairs=self.max_metadata_pairs,
            metadata_key_chars=self.max_metadata_key_chars,
            metadata_value_chars=self.max_metadata_value_chars,
        )

    @property
    def callback_hosts(self) -> tuple[str, ...]:
        if not self.callback_allowed_hosts:
            return ()
        return tuple(h.strip().lower() for h in self.callback_allowed_hosts.split(",") if h.strip())

    @field_validator("client_max_queued")
    @classmethod
    def _max_queued_parse(cls, v: str | None) -> str | None:
        parse_client_numbers(v)
        return v

    @property
    def max_queued_by_client(self) -> dict[str, int]:
        return {k: int(n) for k, n in parse_client_numbers(self.client_max_queued).items()}

    @property
    def model_globs(self) -> tuple[str, ...]:
        if not self.allowed_models:
            return ()
        return tuple(g.strip() for g in self.allowed_models.split(",") if g.strip())

    @field_validator("client_profiles")
    @classmethod
    def _profiles_parse(cls, v: str | None) -> str | None:
        parse_client_profiles(v)
        return v

    @field_validator("client_budgets")
    @classmethod
    def _budgets_parse(cls, v: str | None) -> str | None:
        parse_client_budgets(v)
        return v

    @property
    def budgets_by_client(self) -> dict[str, Decimal]:
        return parse_client_budgets(self.client_budgets)

    @property
    def any_budget(self) -> bool:
        return self.daily_budget_usd is not None or bool(self.budgets_by_client)

    @property
    def profiles_by_client(self) -> dict[str, str]:
        return parse_client_profiles(self.client_profiles)

    @property
    def archive_path(self) -> Path:
        return self.archive_dir or self.data_dir / "archive"

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool"


def parse_provider_counts(raw: str | None) -> dict[str, int]:
    """``provider=N`` pairs (BATCHD_QUEUED_REQUESTS, BATCHD_QUEUED_TOKENS)."""
    out: dict[str, int] = {}
    for pair in (raw or "").split(","):
        if not pair.strip():
            continue
        name, eq, value = pair.strip().rpartition("=")
        name = name.strip().lower()
        if not eq or not PROVIDER_NAME.match(name):
            raise ValueError(f"{pair.strip()!r} is not provider=N ({PROVIDER_NAMES})")
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"{pair.strip()!r}: {value!r} is not a whole number") from None
        if out[name] < 1:
            raise ValueError(f"{pair.strip()!r}: must be at least 1")
    return out


_COMPATIBLE = re.compile(r"^BATCHD_PROVIDER_([A-Z0-9_]{1,32})_BASE_URL$")


def compatible_providers(environ: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """OpenAI-compatible services named by ``BATCHD_PROVIDER_<NAME>_BASE_URL``
    (with ``BATCHD_PROVIDER_<NAME>_API_KEY``): name -> (base URL, key)."""
    env = os.environ if environ is None else environ
    out = {}
    for key, url in env.items():
        m = _COMPATIBLE.match(key)
        if m and url.strip():
            name = m.group(1)
            out[name.lower()] = (url.strip(), env.get(f"BATCHD_PROVIDER_{name}_API_KEY", ""))
    return out


_ALIASES = {
    "openai_api_key": "OPENAI_API_KEY",
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "gemini_api_key": "GEMINI_API_KEY",
    "azure_openai_api_key": "AZURE_OPENAI_API_KEY",
    "azure_openai_endpoint": "AZURE_OPENAI_ENDPOINT",
}


def env_name(field: str) -> str:
    return _ALIASES.get(field, f"BATCHD_{field.upper()}")


def load_settings(**overrides: object) -> Settings:
    """Read the environment; a bad value raises ConfigError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        name = env_name(field) if field in Settings.model_fields else field
        value = os.environ.get(name)
        secret = any(word in name for word in ("KEY", "SECRET", "TOKEN"))
        shown = f" (got {value!r})" if value is not None and not secret else ""
        raise ConfigError(f"{name}: {first['msg']}{shown}") from None
