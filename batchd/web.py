"""The HTTP API (DESIGN section 5). Handlers translate HTTP to domain calls."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
import orjson
from aiohttp import web
from msgspec import UNSET
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine

from batchd import decode, logs, metrics, openapi
from batchd.clients import NO_TOKEN_CLIENT, Client, Clients
from batchd.contract import (
    Accepted,
    CallbackReplayOutcome,
    ClientName,
    CredentialsProblem,
    Day,
    EndpointName,
    ErrorCode,
    Health,
    PageAfter,
    PageSize,
    Ready,
    ReportDays,
    Wait,
    error_field,
)
from batchd.domain import ENDPOINTS, TaskIn
from batchd.health import HEALTH
from batchd.ingest import (
    OVERLOADED_RETRY_AFTER,
    Decoded,
    Ingest,
    IngestError,
)
from batchd.jobs import Jobs
from batchd.replay import Replayer
from batchd.report import Reporter
from batchd.store.callbacks import callbacks_of_task, page_failed_callbacks, replay_callbacks
from batchd.store.engine import schema_version
from batchd.store.tasks import get_task as read_task
from batchd.store.tasks import get_tasks, page_failed, page_results
from batchd.waiters import Waiters

log = logs.get("batchd.web")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/plain"}
)


@dataclass(slots=True)
class ApiState:
    engine: AsyncEngine
    ingest: Ingest
    waiters: Waiters
    replayer: Replayer
    reporter: Reporter
    clients: Clients
    jobs: Jobs
    schema_head: str
    known_revisions: frozenset[str]
    max_queued: int | None = None
    max_wait: float = 300.0
    queued_estimate: int = 0  # refreshed by the service's snapshot loop
    # BATCHD_CLIENT_MAX_QUEUED, and each limited client's queued tasks
    # (refreshed by the snapshot loop, counted up by ingest between).
    client_max_queued: dict[str, int] = field(default_factory=dict)
    client_queued: dict[str, int] = field(default_factory=dict)
    # The models ingest takes, for the OpenAPI document (None: any allowed).
    spec_models: list[str] | None = None
    draining: bool = False
    # The port the API listens on, once bound (no-token mode checks Host against it).
    port: int | None = None
    max_request_bytes: int = 64 * 1024 * 1024


STATE = web.AppKey("state", ApiState)
# The Client the request's bearer token names (``local`` for a plain token
# and in no-token mode); every read and action is scoped by it.
CLIENT = web.RequestKey("client", Client)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise TypeError


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, default=_default),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def reply(value: msgspec.Struct, status: int = 200) -> web.Response:
    """A reply of one of batchd.contract's types, encoded by msgspec."""
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


def decode_body(raw: bytes, kind: type[T], refused: Callable[[str], str]) -> T:
    """A request body as ``kind`` (a type of batchd.contract; an empty body
    reads as ``{}``): JSON that does not parse is ``invalid_json``; JSON
    that is no ``kind`` is ``invalid_request``, told by ``refused`` given the
    field at fault ("" for the body itself)."""
    try:
        return msgspec.json.decode(raw if raw.strip() else b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise IngestError(400, "invalid_request", refused(error_field(exc))) from None
    except ValueError:
        raise IngestError(400, "invalid_json", "the body is not valid JSON") from None


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    return json_response({"error": {"code": code, "message": message, **extra}}, status, headers)


# undefined_table, undefined_column, undefined_function: the database was
# never migrated, or is behind this build.
_SCHEMA_SQLSTATES = frozenset({"42P01", "42703", "42883"})
SCHEMA_MESSAGE = (
    "the database schema is missing or behind this build of batchd: run "
    "`batchd migrate` (with the same BATCHD_DATABASE_URL), then retry"
)


def schema_missing(exc: BaseException) -> bool:
    """Whether a database error says the schema is missing or behind."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in _SCHEMA_SQLSTATES


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except IngestError as exc:
        return error_response(exc.status, exc.code, str(exc), **exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        if exc.status == 413:
            message = "the request body is too large; send fewer tasks per request"
        reply = error_response(exc.status, code, message or code)
        if "Allow" in exc.headers:
            reply.headers["Allow"] = exc.headers["Allow"]
        return reply
    except PoolTimeout:
        log.warning("api.database_slow", path=request.path, error="pool_timeout")
        return error_response(
            503,
            "overloaded",
            "the task store is too slow to answer now; retry later",
            retry_after=OVERLOADED_RETRY_AFTER,
        )
    except (OSError, OperationalError, InterfaceError, DBAPIError) as exc:
        if schema_missing(exc):
            log.error(
                "api.schema_missing",
                path=request.path,
                sqlstate=getattr(getattr(exc, "orig", None), "sqlstate", None),
                fix="run `batchd migrate`",
            )
            return error_response(503, "schema_missing", SCHEMA_MESSAGE, retry_after=30)
        log.warning("api.database_unavailable", path=request.path, error=type(exc).__name__)
        return error_response(
            503, "unavailable", "the task store is unavailable; retry later", retry_after=5
        )
    except Exception:
        log.exception("api.unhandled", path=request.path)
        return error_response(500, "internal", "internal error; see the server log")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    clients = state.clients
    if not clients.required:
        refusal = _local_only_problem(request, state.port)
        if refusal is not None:
            return refusal
    # The console checks its own session cookie (or the same bearer token).
    elif request.path not in _OPEN_PATHS and not is_console_path(request.path):
        client = clients.authenticate(bearer_token(request.headers))
        if client is None:
            return error_response(
                401, "unauthorized", "send Authorization: Bearer <token> with a valid ingest token"
            )
        request[CLIENT] = client
    return await handler(request)


def is_console_path(path: str) -> bool:
    """Paths of the console (batchd/console.py), which authenticates its own
    requests (session cookie or the same bearer token) and posts forms."""
    return path == "/ui" or path.startswith("/ui/")


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>``, or "" for a missing,
    empty or other-scheme header (never an exception: any such header is a
    401). The scheme is case-insensitive (RFC 9110)."""
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# Content types a POST must declare in no-token mode. A browser sends a
# cross-site form or fetch without a CORS preflight only as text/plain,
# form-urlencoded or multipart, so insisting on JSON refuses all of them.
_JSON_TYPES = (
    "application/json",
    "application/x-ndjson",
    "application/jsonl",
    "application/x-jsonl",
)


def _local_only_problem(request: web.Request, port: int | None) -> web.Response | None:
    """No-token mode trusts whoever can reach loopback, which a web page in
    the operator's browser can too: refuse a Host header naming another
    name (DNS rebinding) and a POST that is not JSON (a cross-site form)."""
    host = request.headers.get("Host", "").lower()
    if port is None or host not in {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}:
        return error_response(
            421,
            "misdirected_request",
            "with no ingest tokens batchd answers only requests addressed to "
            f"127.0.0.1:{port}, localhost:{port} or [::1]:{port}",
        )
    # The console's forms are urlencoded; its CSRF token refuses cross-site ones.
    if (
        request.method == "POST"
        and request.content_type not in _JSON_TYPES
        and not is_console_path(request.path)
    ):
        return error_response(
            415,
            "unsupported_media_type",
            "send Content-Type: application/json or application/x-ndjson",
        )
    return None


def _client(request: web.Request) -> Client:
    client: Client = request.get(CLIENT, NO_TOKEN_CLIENT)
    return client


def _client_param(request: web.Request) -> str | None:
    """``?client=``: only an admin token may name a client other than its own."""
    raw = request.query.get("client")
    if raw is None or raw == "":
        return None
    caller = _client(request)
    if raw != caller.name and not caller.admin:
        # Says nothing about whether that client or its tasks exist.
        raise web.HTTPForbidden(
            text="only an admin token may pass another client's name; "
            "leave out ?client= to see your own"
        )
    named: str = query(request, "client", ClientName, "client must be a client name")
    return named


def _scope(request: web.Request) -> str | None:
    """Whose tasks a listing shows: the caller's own; for an admin every
    client's (None) unless ``?client=`` names one."""
    named = _client_param(request)
    caller = _client(request)
    return named if caller.admin else caller.name


def _owner(request: web.Request) -> str:
    """Whose custom_ids a request names: the caller's own; an admin's
    ``?client=`` names another client's."""
    return _client_param(request) or _client(request).name


async def post_tasks(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return error_response(
            503, "draining", "batchd is shutting down; retry on another replica", retry_after=5
        )
    wait = _wait_param(request)
    # The place is taken before anything is stored, so a refusal stores nothing.
    if wait and not state.waiters.reserve():
        return error_response(
            429,
            "too_many_waiters",
            f"{state.waiters.max_waiters} requests are already waiting with "
            "?wait; retry later, or send without ?wait and page "
            "/v1/results",
            retry_after=TOO_MANY_WAITERS_RETRY_AFTER,
        )
    waited = False
    try:
        accepted = await _ingest(request, state)
        if not isinstance(accepted, Accepted):
            return accepted
        if wait and len(accepted.tasks) <= _MAX_WAITED_TASKS:
            waited = True
            ids = [t.custom_id for t in accepted.tasks]
            mine = _client(request).name  # the caller waits on its own tasks only
            if await state.waiters.wait(mine, ids, wait, lambda: _gone(request)):
                async with state.engine.connect() as conn:
                    found = await get_tasks(conn, mine, ids)
                # Finished: the tasks as stored now (TaskView rows).
                return json_response(
                    {
                        "accepted": accepted.accepted,
                        "duplicates": accepted.duplicates,
                        "tasks": [found[c] for c in ids if c in found],
                    },
                    status=200,
                )
    finally:
        if wait and not waited:
            state.waiters.release()
    return reply(accepted, status=202)


def _gone(request: web.Request) -> bool:
    """Whether the caller hung up (its connection is closed or closing)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def _ingest(request: web.Request, state: ApiState) -> Accepted | web.Response:
    """Decode, validate and store the body, a piece at a time (decode.py):
    a body of one piece goes through the group commit; a longer one is
    stored in one transaction, each piece inserted while the next is read."""
    limit = state.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise decode.too_large(limit)
    limits = state.ingest.limits
    pieces = decode.BodyPieces(
        request.content.iter_any(),
        request.content_type,
        state.ingest.contract,
        max_bytes=limit,
        max_tasks=limits.tasks_per_request,
        max_task_bytes=decode.task_bytes_cap(limits),
        stall_seconds=state.ingest.timeout,
    )
    first = await pieces.next()
    if not first:
        raise IngestError(400, "invalid_request", "the request holds no tasks")
    client = _client(request)
    if pieces.at_end():
        return await _store_small(state, first, client)
    added = 0

    def admit(tasks: list[TaskIn]) -> list[TaskIn]:
        nonlocal added
        _admit(state, client.name, len(tasks))
        added += len(tasks)
        return tasks

    seen: dict[str, str] = {}

    async def rest() -> AsyncIterator[list[TaskIn]]:
        while (items := await pieces.next()) is not None:
            yield admit(
                await state.ingest.prepare_piece(items, pieces.tasks - len(items), seen, client)
            )

    try:
        head = admit(await state.ingest.prepare_piece(first, 0, seen, client))
        accepted = await state.ingest.store_stream(head, rest(), lambda: pieces.tasks, client)
    except BaseException:
        _count_queued(state, client.name, -added)
        raise
    _count_queued(state, client.name, accepted.accepted - added)
    return accepted


async def _store_small(
    state: ApiState, items: list[Decoded], client: Client
) -> Accepted | web.Response:
    tasks = await state.ingest.prepare(items, client)
    _admit(state, client.name, len(tasks))
    try:
        accepted = await state.ingest.store(tasks, len(items), client)
    except BaseException:
        _count_queued(state, client.name, -len(tasks))
        raise
    _count_queued(state, client.name, accepted.accepted - len(tasks))
    return accepted


def _admit(state: ApiState, client: str, n: int) -> None:
    """Refuse ``n`` more queued tasks past BATCHD_MAX_QUEUED_TASKS, or past
    this client's BATCHD_CLIENT_MAX_QUEUED (only that client waits; others go
    on); else count them now, before the commit, so concurrent requests
    cannot all pass on the same stale count (handed back for what was not
    stored)."""
    if state.max_queued is not None and state.queued_estimate + n > state.max_queued:
        raise IngestError(
            429,
            "queue_full",
            f"more than {state.max_queued} tasks are queued; retry later",
            {"retry_after": QUEUE_FULL_RETRY_AFTER},
        )
    limit = state.client_max_queued.get(client)
    if limit is not None and state.client_queued.get(client, 0) + n > limit:
        raise IngestError(
            429,
            "queue_full",
            f"client {client!r} has more than {limit} tasks "
            "queued (BATCHD_CLIENT_MAX_QUEUED); retry later",
            {"retry_after": QUEUE_FULL_RETRY_AFTER},
        )
    _count_queued(state, client, n)


def _count_queued(state: ApiState, client: str, n: int) -> None:
    state.queued_estimate += n
    if client in state.client_max_queued:
        state.client_queued[client] = state.client_queued.get(client, 0) + n


_MAX_WAITED_TASKS = 100
# A waiter's place frees when its tasks finish or its wait ends.
TOO_MANY_WAITERS_RETRY_AFTER = 5
# A full queue drains as windows flush (BATCHD_WINDOW_SECONDS); half a minute
# keeps callers from hammering without leaving them idle for a whole window.
QUEUE_FULL_RETRY_AFTER = 30
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def _wait_param(request: web.Request) -> float:
    """``?wait=30s`` (also ``500ms``, ``2m`` or plain seconds), capped at
    BATCHD_MAX_WAIT_SECONDS: a longer wait is not an error, the reply is the
    usual 202 once the cap has passed."""
    raw = query(request, "wait", Wait, "wait must look like 30s, 500ms or 2m")
    if raw is None:
        return 0.0
    match = _WAIT.fullmatch(raw)
    assert match is not None  # the Wait type's pattern
    return min(float(match[1]) * _UNITS[match[2] or "s"], request.app[STATE].max_wait)


async def get_task(request: web.Request) -> web.Response:
    state = request.app[STATE]
    custom_id = request.match_info["custom_id"]
    if not state.ingest.limits.custom_id_regex.fullmatch(custom_id):
        # Ingest never stores such an id, and a NUL would not even reach the query.
        return error_response(404, "not_found", "no task with that custom_id")
    owner = _owner(request)
    async with state.engine.connect() as conn:
        task = await read_task(conn, owner, custom_id)
    if task is None:
        # Another client's custom_id reads exactly like one never sent.
        return error_response(404, "not_found", "no task with that custom_id")
    return json_response(task)


_INTEGER = re.compile(r"-?[0-9]{1,20}")
_WAIT = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m)?")


def query(request: web.Request, name: str, kind: Any, says: str) -> Any:
    """Query parameter ``name`` converted into ``kind`` (a type of
    batchd.contract), or None when absent; ``says`` why one that is not."""
    raw = request.query.get(name)
    return None if raw is None else query_value(raw, kind, says)


def int_query(request: web.Request, name: str, kind: Any, default: int) -> int:
    """An integer query parameter in the range of ``kind`` (an annotated int
    of batchd.contract): decimal digits, leading zeros allowed."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw):
        raise IngestError(400, "invalid_parameter", f"{name} must be an integer")
    bounds = kind.__metadata__[0]
    value: int = query_value(int(raw), kind, f"{name} must be between {bounds.ge} and {bounds.le}")
    return value


def query_value(value: Any, kind: Any, says: str) -> Any:
    """``value`` as ``kind``; a 400 that ``says`` why when it is not one."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError:
        raise IngestError(400, "invalid_parameter", says) from None


async def get_results(request: web.Request) -> web.Response:
    after = int_query(request, "after", PageAfter, 0)
    limit = int_query(request, "limit", PageSize, 100)
    client = _scope(request)
    async with request.app[STATE].engine.connect() as conn:
        rows = await page_results(conn, after, limit, client)
    nxt = rows[-1]["seq"] if rows else after
    return json_response({"results": rows, "next": str(nxt), "has_more": len(rows) == limit})


async def get_failed(request: web.Request) -> web.Response:
    after = int_query(request, "after", PageAfter, 0)
    limit = int_query(request, "limit", PageSize, 100)
    day = query(request, "day", Day, "day must be YYYY-MM-DD")
    reason = query(request, "reason", ErrorCode, "reason must be an error code")
    endpoint = query(
        request, "endpoint", EndpointName, f"endpoint must be one of {', '.join(ENDPOINTS)}"
    )
    client = _scope(request)
    async with request.app[STATE].engine.connect() as conn:
        rows = await page_failed(
            conn, after, limit, reason=reason, day=day, endpoint=endpoint, client=client
        )
    nxt = rows[-1]["id"] if rows else after
    return json_response({"failed": rows, "next": str(nxt), "has_more": len(rows) == limit})


async def _manual_queue_ids(request: web.Request, verb: str) -> list[str] | None:
    """The tasks a replay or dismissal names: a list, or None for all."""
    usage = f'name tasks with {{"custom_ids": [...]}} or {verb} all with {{"all": true}}'
    contract = request.app[STATE].ingest.contract
    limit = contract.limits.tasks_per_request
    req = decode_body(
        await request.read(),
        contract.replay,
        lambda field: (
            f"custom_ids must be a list of at most {limit} custom_id strings"
            if field == "custom_ids"
            else usage
        ),
    )
    if req.custom_ids is UNSET:
        if not req.all:
            raise IngestError(400, "invalid_request", usage)
        return None
    return req.custom_ids


def _manual_queue_scope(request: web.Request, ids: list[str] | None) -> str | None:
    """Named tasks are the caller's own (an admin's ?client= names another's);
    "all" is all of the caller's, every client's for an admin without ?client=."""
    return _owner(request) if ids is not None else _scope(request)


async def post_replay(request: web.Request) -> web.Response:
    ids = await _manual_queue_ids(request, "replay")
    outcome = await request.app[STATE].replayer.replay(_manual_queue_scope(request, ids), ids)
    return json_response(outcome.as_json())


async def post_dismiss(request: web.Request) -> web.Response:
    ids = await _manual_queue_ids(request, "dismiss")
    outcome = await request.app[STATE].replayer.dismiss(_manual_queue_scope(request, ids), ids)
    return json_response(outcome.as_json("dismissed"))


async def get_failed_callbacks(request: web.Request) -> web.Response:
    after = int_query(request, "after", PageAfter, 0)
    limit = int_query(request, "limit", PageSize, 100)
    client = _scope(request)
    async with request.app[STATE].engine.connect() as conn:
        rows = await page_failed_callbacks(conn, after, limit, client=client)
    nxt = rows[-1]["id"] if rows else after
    return json_response({"failed": rows, "next": str(nxt), "has_more": len(rows) == limit})


async def get_task_callbacks(request: web.Request) -> web.Response:
    custom_id = request.match_info["custom_id"]
    if not request.app[STATE].ingest.limits.custom_id_regex.fullmatch(custom_id):
        return error_response(404, "not_found", "no task with that custom_id")
    owner = _owner(request)
    async with request.app[STATE].engine.connect() as conn:
        if await read_task(conn, owner, custom_id) is None:
            return error_response(404, "not_found", "no task with that custom_id")
        rows = await callbacks_of_task(conn, owner, custom_id)
    return json_response({"custom_id": custom_id, "callbacks": rows})


async def post_callbacks_replay(request: web.Request) -> web.Response:
    usage = (
        'name deliveries with {"ids": [...]} or {"custom_ids": [...]}, or replay all '
        'with {"all": true}'
    )
    refused = {
        "ids": "ids must be a list of delivery ids",
        "custom_ids": "custom_ids must be a list of strings",
    }
    req = decode_body(
        await request.read(),
        request.app[STATE].ingest.contract.callback_replay,
        lambda field: refused.get(field, usage),
    )
    ids = None if req.ids is UNSET else req.ids
    cids = None if req.custom_ids is UNSET else req.custom_ids
    if ids is None and cids is None and not req.all:
        raise IngestError(400, "invalid_request", usage)
    # Delivery ids and "all" reach only deliveries the caller may see;
    # custom_ids name the caller's own tasks (an admin's ?client=, another's).
    scope, owner = _scope(request), _owner(request)
    async with request.app[STATE].engine.begin() as conn:
        replayed = await replay_callbacks(
            conn,
            ids or [],
            cids or [],
            everything=ids is None and cids is None,
            client=scope,
            owner=owner,
        )
    log.info("callbacks.replayed", count=len(replayed))
    return reply(CallbackReplayOutcome(len(replayed), replayed))


async def get_daily_report(request: web.Request) -> web.Response:
    reporter = request.app[STATE].reporter
    days = int_query(request, "days", ReportDays, 1)
    end = query(request, "date", Day, "date must be YYYY-MM-DD")
    rows = await reporter.daily(end, days, _scope(request))
    return json_response(rows[0] if days == 1 else rows)


async def healthz(_request: web.Request) -> web.Response:
    return reply(Health("ok"))


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        async with state.engine.connect() as conn:
            version = await schema_version(conn)
    except Exception as exc:
        if schema_missing(exc):
            return error_response(
                503,
                "schema_missing",
                "the database has no batchd schema "
                "(never migrated): run `batchd migrate` (with the same "
                "BATCHD_DATABASE_URL)",
                retry_after=30,
            )
        return error_response(
            503,
            "database_unavailable",
            f"database unreachable: {type(exc).__name__}",
            retry_after=5,
        )
    # A schema newer than this build (a rolling upgrade ran its migration
    # first) is fine; one this build knows to be older is not.
    if version != state.schema_head and (version is None or version in state.known_revisions):
        return error_response(
            503,
            "schema_outdated",
            f"the database schema is behind this build (at {version}, "
            f"this build needs {state.schema_head}): run `batchd migrate`",
            retry_after=30,
        )
    if state.draining:
        return error_response(503, "draining", "shutting down", retry_after=5)
    # Refused provider credentials do not make the replica unready (ingest
    # still takes and keeps tasks while a person fixes the key) but are shown
    # here, with what to fix, so a look at /readyz finds them.
    problems = HEALTH.problems()
    if problems:
        return reply(
            Ready("degraded", version, msgspec.convert(problems, dict[str, CredentialsProblem]))
        )
    return reply(Ready("ready", version))


async def metrics_handler(_request: web.Request) -> web.Response:
    body = generate_latest(metrics.REGISTRY)
    # The classic text format every Prometheus 2.x scraper parses.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


SPEC = web.AppKey("spec", bytes)
DOCS = web.AppKey("docs", str)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[SPEC], content_type="application/json")


async def docs_page(request: web.Request) -> web.Response:
    return web.Response(text=request.app[DOCS], content_type="text/html")


def build_app(state: ApiState, max_request_bytes: int) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, auth_middleware], client_max_size=max_request_bytes
    )
    app[STATE] = state
    state.max_request_bytes = max_request_bytes
    spec = openapi.build(
        state.ingest.limits,
        callbacks=bool(state.ingest.callback_hosts),
        priced=state.spec_models,
        providers=state.ingest.routing.configured,
    )
    app[SPEC] = orjson.dumps(spec)
    app[DOCS] = openapi.render_html(spec)
    app.router.add_post("/v1/tasks", post_tasks)
    app.router.add_get("/v1/tasks/{custom_id}", get_task)
    app.router.add_get("/v1/tasks/{custom_id}/callbacks", get_task_callbacks)
    app.router.add_get("/v1/callbacks/failed", get_failed_callbacks)
    app.router.add_post("/v1/callbacks/replay", post_callbacks_replay)
    app.router.add_get("/v1/results", get_results)
    app.router.add_get("/v1/failed", get_failed)
    app.router.add_post("/v1/failed/replay", post_replay)
    app.router.add_post("/v1/failed/dismiss", post_dismiss)
    app.router.add_get("/v1/report/daily", get_daily_report)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/docs/plain", docs_page)
    from batchd import web_jobs  # it builds on this module's helpers

    web_jobs.add_routes(app)
    return app
