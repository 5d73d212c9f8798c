"""Pure decisions: where a task goes, when a window is due, what a line's outcome
means, how long to back off. No I/O here, so each rule has a table-driven test.
What a task request may hold is the API's contract (batchd/contract.py)."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson

from batchd.backoff import equal_jitter, exponential
from batchd.errors import BatchdError

DEFAULT_ENDPOINT = "/v1/chat/completions"
# The client of anonymous tokens and of no-token mode (batchd.clients).
LOCAL = "local"
# Endpoint -> the body key the provider requires besides `model`.
ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": "messages",
    "/v1/responses": "input",
    "/v1/embeddings": "input",
    "/v1/completions": "prompt",
    "/v1/moderations": "input",
    "/v1/messages": "messages",  # Anthropic Messages API
    "/v1beta/generateContent": "contents",  # Gemini GenerateContentRequest
}
MESSAGES = "/v1/messages"
GENERATE_CONTENT = "/v1beta/generateContent"
# DESIGN section 14: an endpoint only one provider family speaks routes there.
ENDPOINT_PROVIDER = {MESSAGES: "anthropic", GENERATE_CONTENT: "gemini"}
OPENAI_ENDPOINTS = frozenset(ENDPOINTS) - frozenset(ENDPOINT_PROVIDER)
PROVIDER_NAME = re.compile(r"^(openai|azure|anthropic|gemini|openai_compatible:[a-z0-9_]{1,32})$")
PROVIDER_NAMES = "openai, azure, anthropic, gemini or openai_compatible:<name>"
DEFAULT_MODEL_ROUTES = "*=openai"


def provider_endpoints(provider: str) -> frozenset[str]:
    """The task endpoints a provider runs."""
    if provider == "anthropic":
        return frozenset({MESSAGES})
    if provider == "gemini":
        return frozenset({GENERATE_CONTENT})
    return OPENAI_ENDPOINTS


def parse_model_routes(raw: str | None) -> tuple[tuple[str, str], ...]:
    """``BATCHD_MODEL_ROUTES``: comma-separated ``glob=provider``, first match
    wins; ``*=openai`` is always the last resort."""
    routes: list[tuple[str, str]] = []
    for pair in (raw or "").split(","):
        if not pair.strip():
            continue
        glob, eq, provider = pair.rpartition("=")
        glob, provider = glob.strip(), provider.strip().lower()
        if not eq or not glob:
            raise ValueError(f"{pair.strip()!r} is not glob=provider")
        if not PROVIDER_NAME.match(provider):
            raise ValueError(f"{provider!r} is not a provider ({PROVIDER_NAMES})")
        routes.append((glob, provider))
    routes.append(("*", "openai"))
    return tuple(routes)


def route_provider(
    requested: str | None, endpoint: str, model: str, routes: tuple[tuple[str, str], ...]
) -> str:
    """The provider a task goes to: its own ``provider``; else the endpoint's
    family; else the first model glob that matches."""
    if requested:
        return requested
    family = ENDPOINT_PROVIDER.get(endpoint)
    if family:
        return family
    for glob, provider in routes:
        if fnmatch.fnmatchcase(model, glob):
            return provider
    return "openai"


# Provider limits: no setting may raise a limit past these.
MAX_CUSTOM_ID = 512
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
# Output tokens assumed for the budget when a task sets no max_tokens: on the
# high side on purpose, the reservation is settled to the real cost later.
DEFAULT_OUTPUT_ESTIMATE = 4096


class TaskState(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class BatchState(StrEnum):
    BUILDING = "building"
    UPLOADING = "uploading"
    SUBMITTED = "submitted"
    ROUTED = "routed"


class FlushReason(StrEnum):
    TIMEOUT = "timeout"
    CAP = "cap"
    LIMIT = "limit"
    DRAIN = "drain"


class InvalidTask(BatchdError, ValueError):
    """A task in the request is invalid; the message names it and the field.
    ``status`` is 413 for a task over a size limit, else 400."""

    def __init__(
        self, index: int, custom_id: str | None, field: str, reason: str, status: int = 400
    ) -> None:
        who = f"task {index}" + (f" ({custom_id!r})" if custom_id else "")
        super().__init__(f"{who}: {field} {reason}")
        self.index = index
        self.custom_id = custom_id
        self.field = field
        self.status = status


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request and each task in it may hold (the BATCHD_MAX_* settings).

    The defaults are the provider's own limits where it has one, so a task
    batchd accepts is never refused by the provider for its shape.
    """

    tasks_per_request: int = 10_000
    custom_id_chars: int = MAX_CUSTOM_ID
    # Characters a custom_id may hold: safe in a URL path segment once
    # percent-encoded, in a log line and in a file name.
    custom_id_pattern: str = r"[A-Za-z0-9._:@+=~/-]+"
    task_body_bytes: int = 8 * 1024 * 1024
    body_depth: int = 64
    metadata_pairs: int = MAX_METADATA_PAIRS
    metadata_key_chars: int = MAX_METADATA_KEY
    metadata_value_chars: int = MAX_METADATA_VALUE

    @property
    def custom_id_regex(self) -> re.Pattern[str]:
        return _compiled(self.custom_id_pattern)


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


DEFAULT_LIMITS = Limits()


# Not frozen, though nothing changes one after contract.admit (ingest derives
# new ones with dataclasses.replace): a frozen dataclass sets each of these
# fields through object.__setattr__, 1.1 us a task of a bulk request's CPU.
@dataclass(slots=True)
class TaskIn:
    custom_id: str
    endpoint: str
    model: str
    body: dict[str, Any]
    metadata: dict[str, str] | None
    digest: str
    line_bytes: int
    est_input_tokens: int
    est_output_tokens: int
    # Routing asked for by the caller (lane, deadline, latency profile) and
    # decided at ingest by ``place`` (lane, not_before, fallback_at).
    requested_lane: str | None = None
    deadline: datetime | None = None
    profile: str | None = None
    lane: str = "batch"
    backdate_seconds: float = 0.0
    fallback_at: datetime | None = None
    fallback_action: str | None = None  # "sync" | "resubmit", with fallback_at
    # Where the result is POSTed when the task finishes (the task's own, or
    # its token's default), and the configured client its token names.
    callback_url: str | None = None
    client: str = LOCAL
    # The body as compact JSON, serialised once at parse and stored as is.
    body_json: str = ""
    # The job the task belongs to (per client), and where the job's summary
    # is POSTed when it finishes (taken from the job's first task).
    job: str | None = None
    job_callback_url: str | None = None
    # The provider the caller asked for, then the one routing chose (ingest).
    provider: str | None = None


# The custom_id batchd writes into a provider input file for one attempt of
# one task: never the caller's, so callers' ids never meet in a file, and
# within every provider's rules (^[A-Za-z0-9_-]{1,64}$). It names the task
# (tasks.id), its replay and its attempt; routing reads the task back from it.
_LINE_ID = re.compile(r"t([0-9]{1,19})r([0-9]{1,10})a([0-9]{1,10})")
LINE_ID_MAX_CHARS = 1 + 19 + 1 + 10 + 1 + 10


def line_id(task_id: int, replay_count: int, attempt: int) -> str:
    return f"t{task_id}r{replay_count}a{attempt}"


def line_task_id(value: object) -> int | None:
    """The task a line id names; None for anything else."""
    match = _LINE_ID.fullmatch(value) if isinstance(value, str) else None
    return int(match[1]) if match else None


def input_line(custom_id: str, endpoint: str, body: dict[str, Any]) -> bytes:
    """One line of a provider input file, newline included."""
    line = {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}
    return orjson.dumps(line) + b"\n"


def body_digest(endpoint: str, body: dict[str, Any]) -> str:
    canonical = orjson.dumps({"endpoint": endpoint, "body": body}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def estimate_tokens(endpoint: str, body: dict[str, Any], body_bytes: int) -> tuple[int, int]:
    """High-side (input, output) token estimate for the daily budget.

    Tokenizers average about four bytes of English per token; two bytes per
    token keeps the estimate above the truth for almost any text.
    """
    est_in = math.ceil(body_bytes / 2)
    if endpoint in ("/v1/embeddings", "/v1/moderations"):
        return est_in, 0
    if endpoint == GENERATE_CONTENT:
        config = body.get("generationConfig")
        out = config.get("maxOutputTokens") if isinstance(config, dict) else None
        n = config.get("candidateCount") if isinstance(config, dict) else None
        est_out = out if isinstance(out, int) and out > 0 else DEFAULT_OUTPUT_ESTIMATE
        return est_in, est_out * (n if isinstance(n, int) and n > 1 else 1)
    out = (
        body.get("max_completion_tokens") or body.get("max_output_tokens") or body.get("max_tokens")
    )
    est_out = out if isinstance(out, int) and out > 0 else DEFAULT_OUTPUT_ESTIMATE
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        est_out *= n
    return est_in, est_out


def provider_settings(provider: str) -> str:
    """The environment a provider needs, as a user reads it."""
    if provider == "openai":
        return "OPENAI_API_KEY (or BATCHD_OPENAI_BASE_URL for an emulator)"
    if provider == "azure":
        return "AZURE_OPENAI_API_KEY and AZURE_OPENAI_ENDPOINT"
    if provider == "anthropic":
        return "ANTHROPIC_API_KEY (or BATCHD_ANTHROPIC_BASE_URL for an emulator)"
    if provider == "gemini":
        return "GEMINI_API_KEY (or BATCHD_GEMINI_BASE_URL for an emulator)"
    name = provider.partition(":")[2].upper()
    return f"BATCHD_PROVIDER_{name}_BASE_URL and BATCHD_PROVIDER_{name}_API_KEY"


@dataclass(frozen=True, slots=True)
class Routing:
    """Which provider each task goes to (DESIGN section 14), and which are
    configured: a task routed to one that is not is refused at ingest."""

    configured: frozenset[str] = frozenset({"openai"})
    routes: tuple[tuple[str, str], ...] = (("*", "openai"),)

    def route(self, task: TaskIn, index: int) -> str:
        provider = route_provider(task.provider, task.endpoint, task.model, self.routes)
        if provider not in self.configured:
            raise InvalidTask(
                index,
                task.custom_id,
                "provider",
                f"the task routes to provider {provider}, which is not "
                f"configured here; set {provider_settings(provider)}, or send "
                "the task to a configured provider",
            )
        if task.endpoint not in provider_endpoints(provider):
            raise InvalidTask(
                index,
                task.custom_id,
                "provider",
                f"the task routes to provider {provider}, which does not run "
                f"{task.endpoint}; set provider or BATCHD_MODEL_ROUTES",
            )
        return provider


# ------------------------------------------------------------- callbacks

MAX_CALLBACK_URL = 2048
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# An http(s) URL with a DNS name or IPv4 host, an optional port and no
# credentials; the OpenAPI document states the same pattern.
CALLBACK_URL_PATTERN = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://{_LABEL}(?:\.{_LABEL})*(?::{_PORT})?"
    r"(?:[/?#][^\s\u0000]*)?$"
)
_CALLBACK_URL = re.compile(CALLBACK_URL_PATTERN)


def callback_url_problem(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """Why batchd must not POST results to ``url``, or None when it may.

    ``allowed_hosts`` (BATCHD_CALLBACK_ALLOWED_HOSTS) holds exact host names,
    ``host:port``, ``*.domain`` (any subdomain, not the domain itself), IP
    networks in CIDR form, or ``*`` for any host name; empty refuses every
    URL, so a caller can never point batchd at an address ops did not choose.
    Whatever the name, the address it reaches must be public unless a CIDR
    entry covers it (``callback_address_problem``): an IP host is checked
    here, a DNS name when it is resolved for each delivery.
    """
    if len(url) > MAX_CALLBACK_URL:
        return f"must be at most {MAX_CALLBACK_URL} chars"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    host = (parts.hostname or "").lower()
    if not host:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not carry credentials; callbacks are signed with the client's secret"
    if not _CALLBACK_URL.fullmatch(url):
        return "must be an http(s) URL with a DNS name or IPv4 host and no spaces"
    if not allowed_hosts:
        return "cannot be used: callbacks are off (ops set BATCHD_CALLBACK_ALLOWED_HOSTS)"
    if not any(_host_matches(host, port, pattern) for pattern in allowed_hosts):
        return f"host {host!r} is not in BATCHD_CALLBACK_ALLOWED_HOSTS"
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return None
    return callback_address_problem(literal, allowed_hosts)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def callback_address_problem(address: IPAddress, allowed_hosts: tuple[str, ...]) -> str | None:
    """Why a callback must not connect to ``address``, or None when it may.

    Only globally routable addresses are open to every allowed host name:
    loopback, private, link-local (cloud metadata at 169.254.169.254 among
    them), shared, multicast and reserved ranges need a CIDR entry of
    BATCHD_CALLBACK_ALLOWED_HOSTS that holds the address, so a caller's URL
    can reach neither batchd's own host nor the cluster's inside unless ops
    opened that range.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for pattern in allowed_hosts:
        if "/" in pattern:
            try:
                if address in ipaddress.ip_network(pattern, strict=False):
                    return None
            except ValueError:
                continue
    if address.is_global and not address.is_multicast:
        return None
    return (
        f"reaches the non-public address {address}, which no CIDR entry of "
        "BATCHD_CALLBACK_ALLOWED_HOSTS allows"
    )


def _host_matches(host: str, port: int | None, pattern: str) -> bool:
    if pattern == "*":
        return True
    if "/" in pattern:
        try:
            return ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(
                pattern, strict=False
            )
        except ValueError:
            return False
    want_host, _, want_port = (
        pattern.rpartition(":") if pattern.count(":") == 1 else (pattern, "", "")
    )
    if want_port and (not want_port.isdigit() or port != int(want_port)):
        return False
    if want_host.startswith("*."):
        return host.endswith(want_host[1:])
    return host == want_host


# ---------------------------------------------------------------- lanes

LANES = ("batch", "sync")
PROVIDER_COMPLETION = timedelta(hours=24)
PROFILE_KEY = "latency_profile"
# How long before a tolerance (or deadline) runs out a task still waiting on a
# batch is moved to the synchronous lane, so the synchronous call can finish.
SYNC_MARGIN = timedelta(minutes=10)
# How long before the 24h tolerance a task still waiting on a batch is put
# into a fresh batch. A batch is submitted a window after ingest, so its own
# 24 h expiry falls after the tolerance; an hour ahead, the old batch is
# plainly late and a fresh one has the time to get through its window and
# upload before the tolerance runs out.
RESUBMIT_MARGIN = timedelta(hours=1)
FALLBACK_ACTIONS = ("sync", "resubmit")


@dataclass(frozen=True, slots=True)
class Profile:
    """A workload's latency tolerance: its window, and what happens to a task
    no batch has answered by ``tolerance - margin``."""

    window_seconds: float | None  # None: BATCHD_WINDOW_SECONDS
    tolerance: timedelta
    fallback: str  # "sync": call it synchronously; "resubmit": into a fresh batch
    margin: timedelta


PROFILES: dict[str, Profile] = {
    "1h": Profile(300, timedelta(hours=1), "sync", SYNC_MARGIN),
    "6h": Profile(900, timedelta(hours=6), "sync", SYNC_MARGIN),
    "24h": Profile(None, timedelta(hours=24), "resubmit", RESUBMIT_MARGIN),
}


T = TypeVar("T")


def _client_pairs(raw: str | None, example: str, value: Callable[[str, str], T]) -> dict[str, T]:
    """``client=value`` pairs, comma-separated; ``value(pair, text)`` reads one
    value or raises ValueError naming the pair."""
    out: dict[str, T] = {}
    for pair in (raw or "").split(","):
        pair = pair.strip()
        if not pair:
            continue
        client, sep, text = (p.strip() for p in pair.partition("="))
        if not sep or not client:
            raise ValueError(f"{pair!r} must look like {example}")
        parsed = value(pair, text)
        if client in out:
            raise ValueError(f"client {client!r} is listed twice")
        out[client] = parsed
    return out


def parse_client_numbers(raw: str | None) -> dict[str, Decimal]:
    """``client=N`` pairs (BATCHD_CLIENT_MAX_QUEUED, N a whole number >= 0);
    ValueError says which pair is wrong."""

    def number(pair: str, text: str) -> Decimal:
        if not text.isdigit():
            raise ValueError(f"{pair!r} must look like client=1000")
        return Decimal(text)

    return _client_pairs(raw, "client=1000", number)


def parse_client_profiles(raw: str | None) -> dict[str, str]:
    """``client=profile`` pairs (BATCHD_CLIENT_PROFILES); ValueError says which
    pair is wrong."""

    def profile(pair: str, text: str) -> str:
        if text not in PROFILES:
            raise ValueError(f"{pair!r}: the profile must be one of {', '.join(PROFILES)}")
        return text

    return _client_pairs(raw, "client=6h", profile)


def parse_client_budgets(raw: str | None) -> dict[str, Decimal]:
    """``client=USD`` pairs (BATCHD_CLIENT_BUDGETS); ValueError says which
    pair is wrong."""

    def budget(pair: str, text: str) -> Decimal:
        try:
            usd = Decimal(text)
        except ArithmeticError:
            raise ValueError(f"{pair!r}: the budget must be a number of USD") from None
        if not usd.is_finite() or usd < 0:
            raise ValueError(f"{pair!r}: the budget must be 0 or more USD")
        return usd

    return _client_pairs(raw, "client=50 (USD a UTC day)", budget)


@dataclass(frozen=True, slots=True)
class Placement:
    lane: str
    reason: str  # requested | deadline | canary | batch
    # not_before = the database's now() minus this: a short-window profile
    # makes its task look older, so its window flushes sooner.
    backdate_seconds: float
    fallback_at: datetime | None  # when to give up waiting on the batch
    fallback_action: str | None = None  # then: "sync" or "resubmit"


def canary_bucket(custom_id: str) -> int:
    """A stable 0-99 bucket per custom_id (same task, same lane, any replica)."""
    return int.from_bytes(hashlib.sha256(custom_id.encode()).digest()[:8], "big") % 100


def place(task: TaskIn, now: datetime, window_seconds: float, batch_share: int) -> Placement:
    """Which lane a task takes, and when it may join a window.

    A window's age is measured from its oldest ``not_before``; a profile with a
    shorter window than the global one back-dates ``not_before`` by the
    difference, so its tasks flush on their own schedule without a window key
    of their own. The earliest of the deadline's and the profile's limits
    decides the fallback; a deadline always falls back to sync (after a 24h
    resubmission, the sweep sets the deadline's fallback in its place).
    """
    if task.requested_lane == "sync":
        return Placement("sync", "requested", 0.0, None)
    profile = PROFILES.get(task.profile or "")
    window = profile.window_seconds if profile and profile.window_seconds else window_seconds
    if (
        task.deadline is not None
        and task.deadline < now + timedelta(seconds=window) + PROVIDER_COMPLETION
    ):
        return Placement("sync", "deadline", 0.0, None)
    # At a 100% share no bucket is past it: skip the hash.
    if (
        task.requested_lane != "batch"
        and batch_share < 100
        and canary_bucket(task.custom_id) >= batch_share
    ):
        return Placement("sync", "canary", 0.0, None)
    limits: list[tuple[datetime, str]] = []
    if task.deadline is not None:
        limits.append((task.deadline - SYNC_MARGIN, "sync"))
    if profile is not None:
        limits.append((now + profile.tolerance - profile.margin, profile.fallback))
    if not limits:  # no profile, no deadline: most tasks, and one shared answer
        return _PLAIN_BATCH
    fallback_at, action = min(limits)
    return Placement("batch", "batch", max(0.0, window_seconds - window), fallback_at, action)


_PLAIN_BATCH = Placement("batch", "batch", 0.0, None)


def client_fit(
    estimates: Sequence[Decimal], clients: Sequence[str | None], left: dict[str, Decimal]
) -> list[int]:
    """Which of ``estimates`` (in order) stay within their client's own cap
    (``left``: what each capped client has left today). A client past its cap
    waits; the others' go on."""
    left = dict(left)
    kept = []
    for n, (estimate, client) in enumerate(zip(estimates, clients, strict=True)):
        if client is not None and client in left:
            if estimate > left[client]:
                continue
            left[client] -= estimate
        kept.append(n)
    return kept


def budget_fit(spent: Decimal, estimates: Sequence[Decimal], budget: Decimal | None) -> int:
    """How many of ``estimates``, taken in order, fit under the daily budget
    on top of ``spent``. In order, not smallest first, so a large task at the
    head is not passed over by smaller ones forever."""
    if budget is None:
        return len(estimates)
    total = spent
    for n, estimate in enumerate(estimates):
        total += estimate
        if total > budget:
            return n
    return len(estimates)


def file_byte_budget(max_file_bytes: int) -> int:
    """Bytes a batch input file may hold. A little under the provider's limit:
    the serialised line can differ by a few bytes from the size taken at
    ingest (number formatting). Ingest refuses a task past it, so one task
    always fits a file on its own."""
    return int(max_file_bytes * 0.995)


def flush_reason(
    count: int,
    oldest_age_seconds: float,
    window_seconds: float,
    max_items: int,
    window_bytes: int = 0,
    max_bytes: int | None = None,
) -> FlushReason | None:
    """Why a window should be flushed now, or None to keep waiting.

    ``window_bytes`` is the input size of the tasks counted in ``count``; a
    window that already fills a file goes out before it would pass the limit.
    """
    if count <= 0:
        return None
    if count >= max_items:
        return FlushReason.CAP
    if max_bytes is not None and window_bytes >= max_bytes:
        return FlushReason.LIMIT
    if oldest_age_seconds >= window_seconds:
        return FlushReason.TIMEOUT
    return None


def backoff_seconds(attempts: int, base: float, jitter: float, cap: float = 86_400.0) -> float:
    """Delay before a retried task may join a window again.

    Doubles per attempt already made; "equal jitter" (half fixed, half random,
    ``jitter`` in [0, 1)) spreads retries of one failed batch over time.
    """
    return equal_jitter(exponential(attempts - 1, base, cap), jitter)


def tick_delay(failures: int, interval: float, jitter: float, cap: float = 10.0) -> float:
    """Wait before a loop's next tick: its interval while ticks succeed; after
    consecutive failures (the database is down) doubling up to ``cap``, with
    equal jitter (``jitter`` in [0, 1)) so replicas do not return in lockstep,
    and never shorter than the interval."""
    if failures <= 0:
        return interval
    return max(interval, equal_jitter(exponential(failures - 1, max(interval, 0.5), cap), jitter))


class Outcome(StrEnum):
    SUCCESS = "success"
    RETRYABLE = "retryable"
    FINAL = "final"


@dataclass(frozen=True, slots=True)
class LineOutcome:
    outcome: Outcome
    status_code: int | None
    error: dict[str, Any] | None


RETRYABLE_STATUS = frozenset({408, 409, 429})
RETRYABLE_LINE_CODES = frozenset({"batch_expired", "batch_cancelled", "request_timeout"})
FINAL_LINE_CODES = frozenset({"insufficient_quota", "invalid_request", "invalid_request_error"})
MISSING_ERROR = {"code": "missing_from_output", "message": "line absent from output and error"}


def classify_status(status: int, code: str | None) -> Outcome:
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if code == "insufficient_quota":
        return Outcome.FINAL  # a human must add credit; retrying only burns attempts
    if status in RETRYABLE_STATUS or status >= 500:
        return Outcome.RETRYABLE
    return Outcome.FINAL


def classify_line(line: dict[str, Any]) -> LineOutcome:
    """Outcome of one output- or error-file line (DESIGN section 2)."""
    response = line.get("response")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status: int = response["status_code"]
        body = response.get("body")
        err = body.get("error") if isinstance(body, dict) else None
        error = None
        if not 200 <= status < 300:
            error = dict(err) if isinstance(err, dict) else {"message": str(body)[:500]}
            error["status"] = status
        code = error.get("code") if error else None
        return LineOutcome(classify_status(status, code), status, error)
    err = line.get("error")
    error = dict(err) if isinstance(err, dict) else {"code": "unknown", "message": str(err)}
    code = error.get("code")
    if code in FINAL_LINE_CODES:
        return LineOutcome(Outcome.FINAL, None, error)
    # Never-ran lines cost nothing and are bounded by max attempts: retry
    # them, whether the code is known (expired, cancelled) or new to us.
    return LineOutcome(Outcome.RETRYABLE, None, error)


@dataclass(frozen=True, slots=True)
class BatchFailure:
    """How to treat the tasks of a batch the provider failed as a whole."""

    token_limited: bool
    final_lines: dict[int, dict[str, Any]]  # 1-based line -> error
    other_error: dict[str, Any]


def classify_batch_failure(errors: list[dict[str, Any]]) -> BatchFailure:
    if any(e.get("code") == "token_limit_exceeded" for e in errors):
        err = next(e for e in errors if e.get("code") == "token_limit_exceeded")
        return BatchFailure(True, {}, dict(err))
    final: dict[int, dict[str, Any]] = {}
    for e in errors:
        line = e.get("line")
        if isinstance(line, int) and line >= 1:
            final.setdefault(line, dict(e))
    unnamed = [e for e in errors if not isinstance(e.get("line"), int)]
    other = dict(unnamed[0]) if unnamed else {"code": "batch_failed", "message": "another line"}
    other.setdefault("code", "batch_failed")
    return BatchFailure(False, final, other)
