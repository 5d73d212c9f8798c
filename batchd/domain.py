"""Pure decisions: task validation, when a window is due, what a line's outcome
means, how long to back off. No I/O here, so each rule has a table-driven test."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
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


def route_provider(requested: str | None, endpoint: str, model: str,
                   routes: tuple[tuple[str, str], ...]) -> str:
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

    def __init__(self, index: int, custom_id: str | None, field: str, reason: str,
                 status: int = 400) -> None:
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


# Not frozen, though nothing changes one after parse_task (ingest derives
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
    out = body.get("max_completion_tokens") or body.get("max_output_tokens") or body.get(
        "max_tokens"
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
            raise InvalidTask(index, task.custom_id, "provider",
                              f"the task routes to provider {provider}, which is not "
                              f"configured here; set {provider_settings(provider)}, or send "
                              "the task to a configured provider")
        if task.endpoint not in provider_endpoints(provider):
            raise InvalidTask(index, task.custom_id, "provider",
                              f"the task routes to provider {provider}, which does not run "
                              f"{task.endpoint}; set provider or BATCHD_MODEL_ROUTES")
        return provider


def parse_task(obj: Any, index: int, limits: Limits = DEFAULT_LIMITS) -> TaskIn:
    """Validate one submitted task; raise InvalidTask naming the field.

    Everything the provider would reject for sure is refused here, so one bad
    task never fails a whole batch later. openapi.py states the same rules as
    JSON Schema; keep the two in step (schemathesis checks they agree).
    """
    if not isinstance(obj, dict):
        raise InvalidTask(index, None, "task", "must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise InvalidTask(index, None, "custom_id", "is required and must be a non-empty string")
    if len(cid) > limits.custom_id_chars:
        raise InvalidTask(index, cid[:40], "custom_id",
                          f"must be at most {limits.custom_id_chars} characters")
    if not limits.custom_id_regex.fullmatch(cid):
        raise InvalidTask(index, cid[:40], "custom_id",
                          f"may only hold characters matching {limits.custom_id_pattern}")
    if not TASK_FIELDS.issuperset(obj):
        unknown = set(obj) - TASK_FIELDS
        raise InvalidTask(index, cid, sorted(unknown)[0], "is not a known task field")
    endpoint = _endpoint(obj, index, cid)
    provider = obj.get("provider")
    if provider is not None:
        if not isinstance(provider, str) or not PROVIDER_NAME.match(provider):
            raise InvalidTask(index, cid, "provider", f"must be {PROVIDER_NAMES}")
        if endpoint not in provider_endpoints(provider):
            raise InvalidTask(index, cid, "provider", f"{provider} does not run {endpoint}")
    if obj.get("method", "POST") != "POST":
        raise InvalidTask(index, cid, "method", 'must be "POST" (the only method batches run)')
    body = obj.get("body")
    if not isinstance(body, dict):
        raise InvalidTask(index, cid, "body", "is required and must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not _NON_BLANK.search(model):
        raise InvalidTask(index, cid, "body.model", "is required and must be a non-empty string")
    if len(model) > MAX_MODEL or not _MODEL.fullmatch(model):
        # model is indexed (windows group by it) and becomes a provider
        # batch's key: a long or odd one must fail its own request, never
        # the commit it shares with other callers' requests.
        raise InvalidTask(index, cid, "body.model",
                          f"must be at most {MAX_MODEL} characters of letters, digits and "
                          "._:/@+- starting with a letter or digit")
    if body.get("stream") is True:
        raise InvalidTask(index, cid, "body.stream", "must not be true: batches cannot stream")
    _check_body_shape(endpoint, body, index, cid)
    body_json = _body_json(body, limits.body_depth, index, cid)
    metadata = obj.get("metadata")
    if metadata is not None:
        _check_metadata(metadata, index, cid, limits)
    lane = obj.get("lane")
    if lane is not None and lane not in LANES:
        raise InvalidTask(index, cid, "lane", 'must be "batch" or "sync"')
    deadline = _parse_deadline(obj.get("deadline"), index, cid)
    profile = (metadata or {}).get(PROFILE_KEY)
    if profile is not None and profile not in PROFILES:
        raise InvalidTask(index, cid, f"metadata.{PROFILE_KEY}",
                          f"must be one of {', '.join(PROFILES)}")
    callback_url = obj.get("callback_url")
    if callback_url is not None and (not isinstance(callback_url, str) or not callback_url):
        raise InvalidTask(index, cid, "callback_url", "must be an http(s) URL string")
    job = obj.get("job")
    if job is not None:
        problem = job_name_problem(job, limits)
        if problem:
            raise InvalidTask(index, cid, "job", problem)
    job_callback_url = obj.get("job_callback_url")
    if "job_callback_url" in obj and job is None:
        raise InvalidTask(index, cid, "job_callback_url", "needs a job on the same task")
    if job_callback_url is not None and (
            not isinstance(job_callback_url, str) or not job_callback_url):
        raise InvalidTask(index, cid, "job_callback_url", "must be an http(s) URL string")
    body_bytes = len(body_json)
    # The most len(input_line(line_id(...), endpoint, body)) can be, without
    # serialising the body twice: the file carries batchd's id, not the caller's.
    line_bytes = _LINE_FIXED + _LINE_ID_BYTES + _ENDPOINT_BYTES[endpoint] + body_bytes
    if body_bytes > limits.task_body_bytes:
        raise InvalidTask(index, cid, "body", f"is {body_bytes} bytes as JSON, more than "
                          f"the {limits.task_body_bytes} a task may hold", status=413)
    est_in, est_out = estimate_tokens(endpoint, body, body_bytes)
    return TaskIn(
        custom_id=cid,
        endpoint=endpoint,
        model=model,
        body=body,
        metadata=metadata,
        digest=body_digest(endpoint, body),
        line_bytes=line_bytes,
        est_input_tokens=est_in,
        est_output_tokens=est_out,
        requested_lane=lane,
        deadline=deadline,
        profile=profile,
        callback_url=callback_url,
        body_json=body_json.decode(),
        job=job,
        job_callback_url=job_callback_url,
        provider=provider,
    )


# Fields a task object may carry. ``method`` and ``url`` let a provider input
# line be posted as it is; ``url`` is another name for ``endpoint``.
TASK_FIELDS = frozenset({"custom_id", "body", "endpoint", "metadata", "method", "url", "lane",
                         "deadline", "callback_url", "job", "job_callback_url",
                         "provider"})
MAX_JOB_CHARS = 128


def job_name_problem(job: Any, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``job`` cannot name a job (1-128 characters of the custom_id
    alphabet), or None."""
    if not isinstance(job, str) or not job:
        return "must be a non-empty string"
    if len(job) > MAX_JOB_CHARS:
        return f"must be at most {MAX_JOB_CHARS} characters"
    if not limits.custom_id_regex.fullmatch(job):
        return f"may only hold characters matching {limits.custom_id_pattern}"
    return None
_NON_BLANK = re.compile(r"\S")
MAX_MODEL = 256
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"
_MODEL = re.compile(MODEL_PATTERN[1:-1])
# Bytes of an input line that are neither custom_id, endpoint nor body.
# The bytes of a line besides its serialised custom_id, url and body.
_LINE_FIXED = len(input_line("", "", {})) - len(b'""') * 2 - len(b"{}")
_LINE_ID_BYTES = LINE_ID_MAX_CHARS + 2  # quoted
_ENDPOINT_BYTES = {endpoint: len(orjson.dumps(endpoint)) for endpoint in ENDPOINTS}


def _endpoint(obj: dict[str, Any], index: int, cid: str) -> str:
    if "endpoint" not in obj and "url" not in obj:
        return DEFAULT_ENDPOINT
    given = [obj[k] for k in ("endpoint", "url") if k in obj]
    for value in given:
        if not isinstance(value, str) or value not in ENDPOINTS:
            field = "endpoint" if "endpoint" in obj and obj["endpoint"] == value else "url"
            raise InvalidTask(index, cid, field, f"must be one of {', '.join(ENDPOINTS)}")
    if len(given) == 2 and given[0] != given[1]:
        raise InvalidTask(index, cid, "url", "must equal endpoint when both are given")
    endpoint: str = given[0] if given else DEFAULT_ENDPOINT
    return endpoint


# The roles the provider's chat API knows; any other is refused for sure.
CHAT_ROLES = ("developer", "system", "user", "assistant", "tool", "function")


def _is_int(value: Any) -> bool:
    """JSON Schema's integer: 3 and 3.0, never true/false."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) for v in value)


def _check_body_shape(endpoint: str, body: dict[str, Any], index: int, cid: str) -> None:
    """The minimum each endpoint's body needs (openai-batch-protocol.md section 3)."""
    key = ENDPOINTS[endpoint]
    if key not in body:
        raise InvalidTask(index, cid, f"body.{key}", f"is required for {endpoint}")
    value = body[key]
    field = f"body.{key}"
    if endpoint == "/v1/chat/completions":
        if not isinstance(value, list) or not value:
            raise InvalidTask(index, cid, field, "must be a non-empty list of message objects")
        for n, msg in enumerate(value):
            if not isinstance(msg, dict) or msg.get("role") not in CHAT_ROLES:
                raise InvalidTask(index, cid, f"{field}[{n}].role",
                                  f"must be one of {', '.join(CHAT_ROLES)}")
    elif endpoint == "/v1/embeddings":
        ok = (isinstance(value, str) and value != "") or _is_tokens(value) or (
            isinstance(value, list) and bool(value) and all(
                (isinstance(v, str) and v != "") or _is_tokens(v) for v in value))
        if not ok:
            raise InvalidTask(index, cid, field, "must be a non-empty string, a list of "
                              "non-empty strings, or token arrays")
    elif endpoint == "/v1/completions":
        if not isinstance(value, str | list):
            raise InvalidTask(index, cid, field, "must be a string or a list")
    elif endpoint == MESSAGES:
        if not isinstance(value, list) or not value:
            raise InvalidTask(index, cid, field, "must be a non-empty list of message objects")
        for n, msg in enumerate(value):
            if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
                raise InvalidTask(index, cid, f"{field}[{n}].role",
                                  "must be user or assistant (the system prompt is body.system)")
        if not _is_int(body.get("max_tokens")) or body["max_tokens"] < 1:
            raise InvalidTask(index, cid, "body.max_tokens",
                              f"is required for {MESSAGES} and must be a positive integer")
    elif endpoint == GENERATE_CONTENT:
        if not isinstance(value, list) or not value or not all(
                isinstance(c, dict) for c in value):
            raise InvalidTask(index, cid, field, "must be a non-empty list of Content objects")
    elif not ((isinstance(value, str) and value != "") or (isinstance(value, list) and value)):
        raise InvalidTask(index, cid, field, "must be a non-empty string or a non-empty list")


def _body_json(body: dict[str, Any], depth: int, index: int, cid: str) -> bytes:
    """The body as compact JSON, once _check_json's rules hold for it.

    Walking the body costs more than the rest of a task's validation, so
    the serialised form is looked at first: if it opens no more containers
    than ``depth`` in all (brackets inside strings only add to the count),
    none nests deeper, and if it holds no ``\\u0000`` (how orjson writes
    NUL), no string holds a NUL. Only a body that fails that test, or that
    orjson cannot write (it stops at 254 levels), is walked.
    """
    try:
        body_json = orjson.dumps(body)
    except orjson.JSONEncodeError:
        _check_json(body, "body", depth, index, cid)
        return orjson.dumps(body)
    if body_json.count(b"{") + body_json.count(b"[") > depth or b"\\u0000" in body_json:
        _check_json(body, "body", depth, index, cid)
    return body_json


def _check_json(value: Any, field: str, depth: int, index: int, cid: str) -> None:
    """No nesting deeper than ``depth`` and no NUL character (PostgreSQL's jsonb
    cannot store one), walked without recursion so hostile input cannot
    exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise InvalidTask(index, cid, field, "must not contain a NUL (\\u0000) character")
        elif isinstance(item, dict | list):
            if level > depth:
                raise InvalidTask(index, cid, field, f"nests deeper than {depth} levels")
            if isinstance(item, dict):
                stack.extend((k, level) for k in item)
                stack.extend((v, level + 1) for v in item.values())
            else:
                stack.extend((v, level + 1) for v in item)


_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))")


def _parse_deadline(raw: Any, index: int, cid: str) -> datetime | None:
    """RFC 3339 (JSON Schema's date-time), the whole grammar: lower-case t/z,
    any number of fraction digits, and a leap second, read as :59."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidTask(index, cid, "deadline", "must be an RFC 3339 timestamp string")
    match = _RFC3339.fullmatch(raw)
    try:
        if match is None:
            raise ValueError(raw)
        y, mo, d, h, mi, sec, frac, z, sign, oh, om = match.groups()
        offset = timedelta(0) if z else (1 if sign == "+" else -1) * timedelta(
            hours=int(oh), minutes=int(om))
        if abs(offset) >= timedelta(days=1):
            raise ValueError(raw)
        return datetime(int(y), int(mo), int(d), int(h), int(mi), min(int(sec), 59),
                        int((frac or "0")[:6].ljust(6, "0")), tzinfo=timezone(offset))
    except ValueError:
        raise InvalidTask(index, cid, "deadline", "must be an RFC 3339 timestamp with a time "
                          "zone, such as 2026-11-23T18:00:00Z") from None


# ------------------------------------------------------------- callbacks

MAX_CALLBACK_URL = 2048
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
# An http(s) URL with a DNS name or IPv4 host, an optional port and no
# credentials; the OpenAPI document states the same pattern.
CALLBACK_URL_PATTERN = (rf"^[Hh][Tt][Tt][Pp][Ss]?://{_LABEL}(?:\.{_LABEL})*(?::{_PORT})?"
                        r"(?:[/?#][^\s\u0000]*)?$")
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


def callback_address_problem(address: IPAddress, allowed_hosts: tuple[str, ...]
                             ) -> str | None:
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
    return (f"reaches the non-public address {address}, which no CIDR entry of "
            "BATCHD_CALLBACK_ALLOWED_HOSTS allows")


def _host_matches(host: str, port: int | None, pattern: str) -> bool:
    if pattern == "*":
        return True
    if "/" in pattern:
        try:
            return ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(
                pattern, strict=False)
        except ValueError:
            return False
    want_host, _, want_port = pattern.rpartition(":") if pattern.count(":") == 1 else (
        pattern, "", "")
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


def _client_pairs(raw: str | None, example: str, value: Callable[[str, str], T]
                  ) -> dict[str, T]:
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
    if task.deadline is not None and task.deadline < now + timedelta(
            seconds=window) + PROVIDER_COMPLETION:
        return Placement("sync", "deadline", 0.0, None)
    # At a 100% share no bucket is past it: skip the hash.
    if (task.requested_lane != "batch" and batch_share < 100
            and canary_bucket(task.custom_id) >= batch_share):
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


def client_fit(estimates: Sequence[Decimal], clients: Sequence[str | None],
               left: dict[str, Decimal]) -> list[int]:
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


def _check_metadata(metadata: Any, index: int, cid: str, limits: Limits) -> None:
    if not isinstance(metadata, dict):
        raise InvalidTask(index, cid, "metadata", "must be an object of strings")
    if len(metadata) > limits.metadata_pairs:
        raise InvalidTask(index, cid, "metadata",
                          f"must hold at most {limits.metadata_pairs} pairs")
    for k, v in metadata.items():
        shown = k[:20].replace("\x00", "")
        if len(k) > limits.metadata_key_chars or "\x00" in k:
            raise InvalidTask(index, cid, f"metadata.{shown}",
                              f"key must be at most {limits.metadata_key_chars} characters, "
                              "without NUL")
        if not isinstance(v, str) or len(v) > limits.metadata_value_chars or "\x00" in v:
            raise InvalidTask(index, cid, f"metadata.{shown}", "must be a string of at most "
                              f"{limits.metadata_value_chars} characters, without NUL")


def file_byte_budget(max_file_bytes: int) -> int:
    """Bytes a batch input file may hold. A little under the provider's limit:
    the serialised line can differ by a few bytes from the size taken at
    ingest (number formatting). Ingest refuses a task past it, so one task
    always fits a file on its own."""
    return int(max_file_bytes * 0.995)


def flush_reason(
    count: int, oldest_age_seconds: float, window_seconds: float, max_items: int,
    window_bytes: int = 0, max_bytes: int | None = None,
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
