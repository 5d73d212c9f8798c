"""The OpenAPI 3.1 document of the HTTP API (DESIGN section 5), and its docs page.

The components are generated from the API's types (batchd/contract.py): a
new field or reply is a field or Struct there, a path an entry of
``operations``. What here is written by hand is what no type states: the
task's variant per endpoint and the body each endpoint needs (as
contract.check_body_shape checks it). The limits in the document are the
configured ones, so the spec a caller reads is the one the service
enforces. tests/integration/
test_openapi.py keeps this document and the routes and replies of web.py in
step; schemathesis (tests/integration/test_fuzz.py) checks the rest.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import msgspec
import orjson

from batchd import __version__
from batchd.contract import (
    CHAT_ROLES,
    MAX_MODEL,
    MODEL_PATTERN,
    NO_NUL,
    REPLIES,
    ClientName,
    Day,
    EndpointName,
    ErrorCode,
    JobUpdate,
    PageAfter,
    PageSize,
    ReportDays,
    Terminal,
    Wait,
    contract_for,
    job_type,
)
from batchd.domain import (
    DEFAULT_ENDPOINT,
    ENDPOINTS,
    MESSAGES,
    Limits,
    provider_endpoints,
)

Schema = dict[str, Any]


# Documents ``null`` besides ``schema``: JSON Schema 2020-12, as OpenAPI 3.1 has it.
def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# ------------------------------------------------------------------ requests


def text(min_length: int = 0) -> Schema:
    return {"type": "string", "minLength": min_length, "pattern": NO_NUL}


def token_array() -> Schema:
    return {"type": "array", "minItems": 1, "items": {"type": "integer"}}


JSON_VALUE = ref("JsonValue")


def json_value(*, but_true: bool = False) -> Schema:
    """Any JSON without a NUL character in a string or key (PostgreSQL's
    jsonb cannot store one, so ingest refuses it); ``but_true`` leaves out
    ``true``. (No allOf around it: openapi-spec-validator recurses forever
    into a recursive schema under allOf.)"""
    scalars: list[Schema] = [
        {"type": ["null", "number"]},
        {"const": False} if but_true else {"type": "boolean"},
    ]
    return {
        "anyOf": [
            *scalars,
            text(),
            {"type": "array", "items": JSON_VALUE},
            {
                "type": "object",
                "propertyNames": {"pattern": NO_NUL},
                "additionalProperties": JSON_VALUE,
            },
        ]
    }


def model_schema(priced: Sequence[str] | None) -> Schema:
    """``model``: with ``priced`` (no BATCHD_ALLOWED_MODELS), one of the price
    table's entries or an entry's dated snapshot, as ingest takes them."""
    base: Schema = {
        "type": "string",
        "pattern": MODEL_PATTERN,
        "maxLength": MAX_MODEL,
        "description": "the model; one provider batch holds one model",
    }
    if not priced:
        return {
            **base,
            "description": base["description"] + " (the prices file's models "
            "and those BATCHD_ALLOWED_MODELS allows)",
        }
    names = "|".join(name.replace(".", "\\.") for name in priced)
    return {
        **base,
        "anyOf": [
            {"enum": list(priced)},
            {"pattern": f"^({names})-[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}$"},
        ],
        "description": base["description"] + ": a model of the prices file, or one of "
        "its dated snapshots",
    }


def body_schemas(priced: Sequence[str] | None = None) -> dict[str, Schema]:
    """Per endpoint, what its body needs (contract.check_body_shape)."""
    model = model_schema(priced)
    stream: Schema = {
        **json_value(but_true=True),
        "description": "must not be true: batches cannot stream",
    }
    text_or_list: Schema = {
        "anyOf": [text(1), {"type": "array", "minItems": 1, "items": JSON_VALUE}]
    }

    def message(roles: Sequence[str]) -> Schema:
        # Its keys, as every key of the body, hold no NUL (jsonb cannot store one).
        return {
            "type": "object",
            "required": ["role"],
            "properties": {"role": {"enum": list(roles)}},
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": JSON_VALUE,
        }

    required_value: dict[str, Schema] = {
        "/v1/chat/completions": {"type": "array", "minItems": 1, "items": message(CHAT_ROLES)},
        "/v1/responses": text_or_list,
        "/v1/embeddings": {
            "anyOf": [
                text(1),
                token_array(),
                {"type": "array", "minItems": 1, "items": {"anyOf": [text(1), token_array()]}},
            ]
        },
        "/v1/completions": {"anyOf": [text(), {"type": "array", "items": JSON_VALUE}]},
        "/v1/moderations": text_or_list,
        MESSAGES: {"type": "array", "minItems": 1, "items": message(("user", "assistant"))},
        "/v1beta/generateContent": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "propertyNames": {"pattern": NO_NUL},
                "additionalProperties": JSON_VALUE,
            },
        },
    }
    out = {}
    for endpoint, key in ENDPOINTS.items():
        props: dict[str, Schema] = {"model": model, "stream": stream, key: required_value[endpoint]}
        required = ["model", key]
        if endpoint == MESSAGES:
            props["max_tokens"] = {"type": "integer", "minimum": 1}
            required.append("max_tokens")
        out[endpoint] = {
            "type": "object",
            "required": required,
            "description": f"the request body of POST {endpoint}, as the provider takes it",
            "properties": props,
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": JSON_VALUE,
        }
    return out


def schema_of(kind: Any) -> Schema:
    """A type of batchd.contract (a query parameter's, a job name's) as JSON Schema."""
    schema: Schema = msgspec.json.schema(kind)
    return schema


def job_name(limits: Limits) -> Schema:
    return schema_of(job_type(limits))


def task_schema(
    fields: Schema,
    limits: Limits,
    callbacks: bool,
    providers: frozenset[str] = frozenset({"openai"}),
) -> Schema:
    """A task: one variant per endpoint a configured provider runs, so each
    body is checked for its endpoint (contract.check_body_shape). ``fields``
    is the task type's own schema. ``callback_url`` is only offered when
    BATCHD_CALLBACK_ALLOWED_HOSTS lets callbacks through; otherwise any task
    carrying one is refused."""
    common = {
        k: v
        for k, v in fields["properties"].items()
        if callbacks or k not in ("callback_url", "job_callback_url")
    }
    variants = []
    for endpoint in ENDPOINTS:
        serving = sorted(p for p in providers if endpoint in provider_endpoints(p))
        if not serving:
            continue
        this: Schema = {"const": endpoint}
        provider: Schema = {
            "enum": [*serving, None],
            "description": "the provider to run it (DESIGN section 14); "
            "default: by endpoint, then BATCHD_MODEL_ROUTES",
        }
        variant: Schema = {
            "type": "object",
            "required": fields["required"],
            "properties": {
                **common,
                "endpoint": this,
                "provider": provider,
                "url": {**this, "description": "another name for endpoint"},
                "body": ref(_body_name(endpoint)),
            },
            "additionalProperties": False,
        }
        if callbacks:
            # contract.admit's rule: a job_callback_url needs a job.
            variant["dependentSchemas"] = {
                "job_callback_url": {"required": ["job"], "properties": {"job": {"type": "string"}}}
            }
        if endpoint != DEFAULT_ENDPOINT:
            variant["anyOf"] = [{"required": ["endpoint"]}, {"required": ["url"]}]
        variants.append(variant)
    return {
        "oneOf": variants,
        "description": f"endpoint defaults to {DEFAULT_ENDPOINT}; the body, serialised, "
        f"may hold at most {limits.task_body_bytes} bytes and nest at most "
        f"{limits.body_depth} levels",
    }


def _body_name(endpoint: str) -> str:
    return "Body" + "".join(p.title() for p in endpoint.removeprefix("/v1/").split("/"))


# ------------------------------------------------------------- the components

# Either names tasks or says all (the check after decoding in web.py).
NAMES_OR_ALL: list[Schema] = [{"required": ["all"], "properties": {"all": {"const": True}}}]


def schemas(
    limits: Limits,
    callbacks: bool,
    priced: Sequence[str] | None = None,
    providers: frozenset[str] = frozenset({"openai"}),
) -> dict[str, Schema]:
    """The components: generated from the contract's types (contract.py), the
    task's variants by endpoint composed around them, and the bodies each
    endpoint needs."""
    contract = contract_for(limits)
    _, out = msgspec.json.schema_components(
        (
            *REPLIES,
            contract.task,
            contract.task_list,
            contract.replay,
            contract.callback_replay,
            JobUpdate,
        ),
        ref_template="#/components/schemas/{name}",
    )
    out["Task"] = task_schema(out["Task"], limits, callbacks, providers)
    out["ReplayRequest"]["anyOf"] = [{"required": ["custom_ids"]}, *NAMES_OR_ALL]
    out["CallbackReplayRequest"]["anyOf"] = [
        {"required": ["ids"]},
        {"required": ["custom_ids"]},
        *NAMES_OR_ALL,
    ]
    if not callbacks:
        out["JobUpdate"]["properties"]["callback_url"] = {
            "type": "null",
            "description": "callbacks are off here (BATCHD_CALLBACK_ALLOWED_HOSTS is unset)",
        }
    out.update({_body_name(e): s for e, s in body_schemas(priced).items()})
    out["JsonValue"] = json_value()
    return out


# ------------------------------------------------------------------ webhooks


def webhooks() -> dict[str, Any]:
    def header(name: str, description: str) -> Schema:
        return {
            "name": name,
            "in": "header",
            "required": True,
            "description": description,
            "schema": {"type": "string"},
        }

    # Task and job callbacks are signed and delivered alike.
    headers = [
        header("Batchd-Timestamp", "unix seconds when this attempt was signed"),
        header("Batchd-Signature", "v1=<hex HMAC-SHA256 of timestamp.body>"),
        header("Batchd-Delivery", "the delivery id, as in the body"),
        header("Batchd-Attempt", "1 for the first attempt, then 2, 3, ..."),
    ]
    responses = {
        "2XX": {"description": "delivered; batchd stops sending it"},
        "default": {"description": "not delivered; batchd tries again later"},
    }
    return {
        "taskFinished": {
            "post": {
                "operationId": "taskFinished",
                "tags": ["callbacks"],
                "summary": "batchd POSTs a task's result to its callback_url once it is terminal",
                "description": (
                    "Signed with the client's callback secret: Batchd-Signature is v1= followed by "
                    "the hex HMAC-SHA256 of the Batchd-Timestamp digits, a dot, and the raw body. "
                    "Any 2xx answer is delivered; anything else, a timeout or a refused connection "
                    "is retried with exponential backoff and jitter (at least once: deduplicate on "
                    "delivery_id). batchd.client.verify_callback checks a request."
                ),
                "parameters": headers,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("CallbackPayload")}},
                },
                "responses": responses,
            }
        },
        "jobFinished": {
            "post": {
                "operationId": "jobFinished",
                "tags": ["callbacks", "jobs"],
                "summary": "batchd POSTs a job's counts to its callback_url when none of its "
                "tasks is queued or submitted any more",
                "description": (
                    "Signed, retried and deduplicated as taskFinished. Sent again if the job "
                    "finishes again (tasks added to it, or failed ones replayed)."
                ),
                "parameters": headers,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": ref("JobCallbackPayload")}},
                },
                "responses": responses,
            }
        },
    }


# ---------------------------------------------------------------- operations


def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again",
        "schema": {"type": "integer", "minimum": 0},
    }
}


def error(description: str, *codes: str, retry_after: bool = False) -> dict[str, Any]:
    """A documented error reply; ``codes`` are the ``error.code`` values it can carry."""
    listed = ", ".join(f"`{c}`" for c in codes)
    reply: dict[str, Any] = {
        "description": f"{description} (code {listed})",
        "content": json_content(ref("Error")),
    }
    if retry_after:
        reply["headers"] = RETRY_AFTER
    return reply


def ok(description: str, schema: Schema) -> dict[str, Any]:
    return {"description": description, "content": json_content(schema)}


UNAUTHORIZED = error("no valid bearer token", "unauthorized")
UNAVAILABLE = error(
    "the database is unreachable or too slow, or its schema is missing or "
    "behind (`schema_missing`: run `batchd migrate`); retry after Retry-After",
    "unavailable",
    "overloaded",
    "schema_missing",
    retry_after=True,
)
BAD_PARAMETER = error("a query parameter is invalid", "invalid_parameter")
FORBIDDEN = error("?client= names another client and the token is not an admin token", "forbidden")
# What every read or action scoped to a client may answer besides its own.
SCOPED = {"400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN}
TASK_PATH = {"name": "custom_id", "in": "path", "required": True, "schema": {"type": "string"}}
NO_TASK = error("no task with that custom_id", "not_found")
CLIENT = {
    "name": "client",
    "in": "query",
    "required": False,
    "schema": schema_of(ClientName),
    "description": "admin tokens only (any other token may name only its own client): "
    "the client whose tasks to read or act on; without it, an admin "
    "lists every client's and names its own tasks by custom_id",
}


def query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def cursor_params() -> list[dict[str, Any]]:
    return [
        query(
            "after",
            schema_of(PageAfter),
            "cursor: the `next` of the previous page (0 = from the start)",
        ),
        query("limit", schema_of(PageSize), "page size (default 100)"),
    ]


DATE = schema_of(Day)


def operations(limits: Limits) -> dict[str, dict[str, Any]]:
    open_op: dict[str, Any] = {"security": []}
    return {
        "/v1/tasks": {
            "post": {
                "operationId": "submitTasks",
                "tags": ["tasks"],
                "summary": "Submit one task, a list of tasks, or NDJSON lines",
                "description": (
                    "All or nothing: any invalid task refuses the whole request (400 naming the "
                    "task and the field) and nothing of it is stored. A 202 means every task is "
                    "committed to the database. The same custom_id with the same body counts as a "
                    f"duplicate; with another body it is a 409. At most "
                    f"{limits.tasks_per_request} tasks per request."
                ),
                "parameters": [
                    query(
                        "wait",
                        schema_of(Wait),
                        "with ?wait=30s (or 500ms, 2m; capped at "
                        "BATCHD_MAX_WAIT_SECONDS) the reply is 200 with "
                        "the finished tasks when all of them (at most "
                        "100) finish within the wait",
                    )
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"oneOf": [ref("Task"), ref("TaskList")]}},
                        "application/x-ndjson": {
                            "schema": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": limits.tasks_per_request,
                                "items": ref("Task"),
                                "description": "one Task per line",
                            }
                        },
                    },
                },
                "responses": {
                    "200": ok("every task finished within ?wait", ref("Finished")),
                    "202": ok(
                        "stored (committed); or already stored with the same body", ref("Accepted")
                    ),
                    "400": error(
                        "the body is not valid JSON, or a task is invalid",
                        "invalid_json",
                        "invalid_request",
                        "invalid_task",
                        "invalid_parameter",
                    ),
                    "401": UNAUTHORIZED,
                    "408": error(
                        "the body stopped coming for BATCHD_INGEST_TIMEOUT_SECONDS; "
                        "nothing was stored",
                        "request_timeout",
                    ),
                    "409": error(
                        "a custom_id is already stored with a different body, or a "
                        "task names a job that was cancelled",
                        "conflict",
                        "job_cancelled",
                    ),
                    "413": error(
                        "the body, the task count or one task is too large",
                        "payload_too_large",
                        "too_many_tasks",
                        "task_too_large",
                    ),
                    "429": error(
                        "more than BATCHD_MAX_QUEUED_TASKS tasks are queued, or more than "
                        "the client's BATCHD_CLIENT_MAX_QUEUED, or (with ?wait) "
                        "BATCHD_MAX_WAITERS requests are already waiting; nothing was "
                        "stored",
                        "queue_full",
                        "too_many_waiters",
                        retry_after=True,
                    ),
                    "503": error(
                        "shutting down, or the database is unreachable or too slow, or "
                        "its schema is missing or behind (`schema_missing`: run `batchd "
                        "migrate`); nothing of the request was stored",
                        "draining",
                        "unavailable",
                        "overloaded",
                        "schema_missing",
                        retry_after=True,
                    ),
                },
            }
        },
        "/v1/tasks/{custom_id}": {
            "get": {
                "operationId": "getTask",
                "tags": ["tasks"],
                "summary": "One task: state, attempts, batch, timestamps, last error, response",
                "description": "Another client's custom_id is a 404, as one never sent.",
                "parameters": [TASK_PATH, CLIENT],
                "responses": {
                    "200": ok("the task", ref("TaskView")),
                    **SCOPED,
                    "404": NO_TASK,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/tasks/{custom_id}/callbacks": {
            "get": {
                "operationId": "getTaskCallbacks",
                "tags": ["callbacks"],
                "summary": "Every result delivery of a task, with each attempt",
                "parameters": [TASK_PATH, CLIENT],
                "responses": {
                    "200": ok("the task's deliveries", ref("TaskCallbacks")),
                    **SCOPED,
                    "404": NO_TASK,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/callbacks/failed": {
            "get": {
                "operationId": "listFailedCallbacks",
                "tags": ["callbacks"],
                "summary": "Deliveries that used up their attempts, oldest first",
                "parameters": [*cursor_params(), CLIENT],
                "responses": {
                    "200": ok("a page of failed deliveries", ref("FailedCallbackPage")),
                    **SCOPED,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/callbacks/replay": {
            "post": {
                "operationId": "replayCallbacks",
                "tags": ["callbacks"],
                "summary": "Deliver failed callbacks again (by id, by task, or all)",
                "parameters": [CLIENT],
                "requestBody": {
                    "required": True,
                    "content": json_content(ref("CallbackReplayRequest")),
                },
                "responses": {
                    "200": ok("the deliveries due again", ref("CallbackReplayOutcome")),
                    "400": error(
                        "the body names no deliveries",
                        "invalid_json",
                        "invalid_request",
                        "invalid_parameter",
                    ),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/results": {
            "get": {
                "operationId": "listResults",
                "tags": ["results"],
                "summary": "Stored results in completion order, paged by cursor",
                "parameters": [*cursor_params(), CLIENT],
                "responses": {
                    "200": ok("a page of results", ref("ResultPage")),
                    **SCOPED,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/failed": {
            "get": {
                "operationId": "listFailed",
                "tags": ["manual queue"],
                "summary": "The manual queue: tasks that failed for good",
                "parameters": [
                    *cursor_params(),
                    query("reason", schema_of(ErrorCode), "only this last_error.code"),
                    query("day", DATE, "only tasks that failed on this UTC day"),
                    query("endpoint", schema_of(EndpointName), "only this endpoint"),
                    CLIENT,
                ],
                "responses": {
                    "200": ok("a page of failed tasks", ref("FailedPage")),
                    **SCOPED,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/failed/replay": {
            "post": {
                "operationId": "replayFailed",
                "tags": ["manual queue"],
                "summary": "Re-queue chosen (or all) failed tasks, attempts reset",
                "description": (
                    "custom_ids name the caller's own tasks (an admin's ?client= "
                    'names another client\'s); {"all": true} replays all of the '
                    "caller's failed tasks, every client's for an admin without "
                    "?client=."
                ),
                "parameters": [CLIENT],
                "requestBody": {"required": True, "content": json_content(ref("ReplayRequest"))},
                "responses": {
                    "200": ok(
                        "what was re-queued and what was skipped, and why", ref("ReplayOutcome")
                    ),
                    "400": error(
                        "the body names no tasks",
                        "invalid_json",
                        "invalid_request",
                        "invalid_parameter",
                    ),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/failed/dismiss": {
            "post": {
                "operationId": "dismissFailed",
                "tags": ["manual queue"],
                "summary": "Take chosen (or all) failed tasks out of the manual queue for good "
                "(export them first); retention then deletes them",
                "description": "Chosen as replay chooses them.",
                "parameters": [CLIENT],
                "requestBody": {"required": True, "content": json_content(ref("ReplayRequest"))},
                "responses": {
                    "200": ok(
                        "what was dismissed and what was skipped, and why", ref("DismissOutcome")
                    ),
                    "400": error(
                        "the body names no tasks",
                        "invalid_json",
                        "invalid_request",
                        "invalid_parameter",
                    ),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/report/daily": {
            "get": {
                "operationId": "dailyReport",
                "tags": ["report"],
                "summary": "The daily report (one object; a list with days > 1)",
                "parameters": [
                    query("date", DATE, "last UTC day (default today)"),
                    query("days", schema_of(ReportDays), "how many days up to date (default 1)"),
                    CLIENT,
                ],
                "description": "A client's token sees its own numbers; an admin token every "
                "client's (and ?client= narrows).",
                "responses": {
                    "200": ok(
                        "the report",
                        {
                            "anyOf": [
                                ref("DailyReport"),
                                {"type": "array", "items": ref("DailyReport")},
                            ]
                        },
                    ),
                    **SCOPED,
                    "503": UNAVAILABLE,
                },
            }
        },
        **job_operations(limits),
        "/healthz": {
            "get": {
                **open_op,
                "operationId": "healthz",
                "tags": ["operations"],
                "summary": "Liveness: the event loop answers; never touches the database",
                "responses": {"200": ok("alive", ref("Health"))},
            }
        },
        "/readyz": {
            "get": {
                **open_op,
                "operationId": "readyz",
                "tags": ["operations"],
                "summary": "Readiness: database reachable and schema at head",
                "responses": {
                    "200": ok("ready", ref("Ready")),
                    "503": error(
                        "not ready",
                        "database_unavailable",
                        "schema_missing",
                        "schema_outdated",
                        "draining",
                        retry_after=True,
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                **open_op,
                "operationId": "metrics",
                "tags": ["operations"],
                "summary": "Prometheus text format",
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                **open_op,
                "operationId": "openapi",
                "tags": ["operations"],
                "summary": "This document",
                "responses": {"200": ok("OpenAPI 3.1", {"type": "object"})},
            }
        },
        "/docs": {
            "get": {
                **open_op,
                "operationId": "docs",
                "tags": ["operations"],
                "summary": "This document in Swagger UI (served from batchd, no CDN)",
                "description": "Markdown rendered, schemas expandable, and *Try it out* with a "
                "bearer token entered under **Authorize**.",
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/docs/plain": {
            "get": {
                **open_op,
                "operationId": "docsPlain",
                "tags": ["operations"],
                "summary": "This document as one plain page that needs no JavaScript",
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


MISDIRECTED = error(
    "no ingest tokens are configured and the Host header names another "
    "address than the loopback one batchd listens on (DNS rebinding)",
    "misdirected_request",
)
NOT_JSON = error(
    "no ingest tokens are configured and the body is not declared JSON or NDJSON "
    "(a cross-site form)",
    "unsupported_media_type",
)


def with_edge_replies(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Replies the middleware can give to any operation in no-token mode."""
    for path in paths.values():
        for method, op in path.items():
            op["responses"].setdefault("421", MISDIRECTED)
            if method == "post":
                op["responses"].setdefault("415", NOT_JSON)
    return paths


# A job is (client, name): ?client= names whose job, for admin tokens.
JOB_CLIENT = {
    **CLIENT,
    "description": (
        "admin tokens only (any other token may name only its own client): the client whose "
        "jobs these are. Without it a job name means the caller's own job, an admin's too."
    ),
}


def job_operations(limits: Limits) -> dict[str, dict[str, Any]]:
    path = [{"name": "job", "in": "path", "required": True, "schema": job_name(limits)}, JOB_CLIENT]
    missing = error("you (or the client ?client= names) have no job with that name", "not_found")
    return {
        "/v1/jobs": {
            "get": {
                "operationId": "listJobs",
                "tags": ["jobs"],
                "summary": "Your jobs, newest first, with their counts and money",
                "parameters": [
                    query("after", job_name(limits), "the `next` of the previous page"),
                    query("limit", schema_of(PageSize), "page size (default 100)"),
                    JOB_CLIENT,
                ],
                "responses": {
                    "200": ok("a page of jobs", ref("JobPage")),
                    **SCOPED,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/jobs/{job}": {
            "get": {
                "operationId": "getJob",
                "tags": ["jobs"],
                "summary": "One job's counts and money, kept as its tasks move (the cost of "
                "this call does not grow with the job)",
                "parameters": path,
                "responses": {
                    "200": ok("the job", ref("Job")),
                    "400": BAD_PARAMETER,
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": missing,
                    "503": UNAVAILABLE,
                },
            },
            "put": {
                "operationId": "updateJob",
                "tags": ["jobs"],
                "summary": "Set or clear the job's callback_url",
                "parameters": path,
                "requestBody": {"required": True, "content": json_content(ref("JobUpdate"))},
                "responses": {
                    "200": ok("the job", ref("Job")),
                    "400": error(
                        "the body is not a JobUpdate, or the URL cannot "
                        "be used (it is checked against the job's "
                        "client's callback settings), or ?client= is "
                        "not a client name",
                        "invalid_json",
                        "invalid_request",
                        "invalid_parameter",
                    ),
                    "401": UNAUTHORIZED,
                    "403": FORBIDDEN,
                    "404": missing,
                    "503": UNAVAILABLE,
                },
            },
        },
        "/v1/jobs/{job}/cancel": {
            "post": {
                "operationId": "cancelJob",
                "tags": ["jobs"],
                "summary": "Cancel the job's queued tasks; tasks already at the provider finish",
                "description": (
                    "Queued tasks become cancelled: never sent, not failed, not in the manual "
                    "queue. Tasks of the job that come back to the queue later (a retry of a "
                    "task that was at the provider) are cancelled too, and no new task may "
                    "join the job (409 job_cancelled). Calling it again is harmless."
                ),
                "parameters": path,
                "responses": {
                    "200": ok("the job after the cancel", ref("JobCancelled")),
                    **SCOPED,
                    "404": missing,
                    "503": UNAVAILABLE,
                },
            }
        },
        "/v1/jobs/{job}/results": {
            "get": {
                "operationId": "jobResults",
                "tags": ["jobs"],
                "summary": "The job's finished tasks as NDJSON, streamed",
                "description": (
                    "One JobResult per line, in the order the tasks were accepted (task id). "
                    "Resume an interrupted read with ?after=<the last custom_id read>. Tasks "
                    "still queued or submitted are left out, or, with ?stop_at_open=true, end "
                    "the stream: the lines are then exactly the start of what a read after the "
                    "job finished gives, so a running job's results can be read as they come, "
                    "each read resuming after the last line of the one before "
                    "(`batchd submit --wait --out` does). Once every task of the job is stored "
                    "no task can appear before the last line read; a task replayed or dismissed "
                    "after its line was read reads differently later."
                ),
                "parameters": [
                    *path,
                    query("state", schema_of(Terminal), "only tasks in this state"),
                    query(
                        "after",
                        schema_of(contract_for(limits).custom_id),
                        "resume after this task's line",
                    ),
                    query(
                        "stop_at_open",
                        {"type": "boolean", "default": False},
                        "end before the first task (in this order) still queued or submitted",
                    ),
                ],
                "responses": {
                    "200": {
                        "description": "the lines",
                        "content": {
                            "application/x-ndjson": {
                                "schema": {
                                    "type": "array",
                                    "items": ref("JobResult"),
                                    "description": "one JobResult per line",
                                }
                            }
                        },
                    },
                    **SCOPED,
                    "404": error(
                        "you (or the client ?client= names) have no job with that "
                        "name, or ?after names no task of it",
                        "not_found",
                    ),
                    "503": UNAVAILABLE,
                },
            }
        },
    }


def build(
    limits: Limits,
    *,
    callbacks: bool = False,
    priced: Sequence[str] | None = None,
    providers: frozenset[str] = frozenset({"openai"}),
) -> dict[str, Any]:
    """The document; ``priced`` lists the models ingest takes (with their
    dated snapshots) when BATCHD_ALLOWED_MODELS is unset; ``providers`` the
    configured providers, whose endpoints tasks may name."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "batchd",
            "version": __version__,
            "description": (
                "Takes offline LLM tasks over HTTP, stores them durably and runs them on the "
                "batch APIs of OpenAI, Anthropic, Gemini, Azure OpenAI and OpenAI-compatible "
                "providers at half the synchronous price. Every error is "
                '`{"error": {"code": "...", "message": "..."}}`; 429 and 503 carry '
                "Retry-After."
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": with_edge_replies(operations(limits)),
        **({"webhooks": webhooks()} if callbacks else {}),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "one of BATCHD_INGEST_TOKENS; not needed when they are unset "
                    "(the API then listens on loopback only)",
                }
            },
            "schemas": schemas(limits, callbacks, priced, providers),
        },
    }


# ------------------------------------------------------------------ the page


def render_html(spec: dict[str, Any]) -> str:
    """The document as one self-contained page: no scripts, nothing fetched."""
    esc = html.escape
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(spec['info']['title'])}"
        " API</title><style>body{font:15px/1.45 system-ui,sans-serif;max-width:60em;"
        "margin:2em auto;padding:0 1em}code,pre{font:13px ui-monospace,monospace}"
        "pre{background:#f6f6f6;padding:.6em;overflow:auto}h2{border-top:1px solid #ccc;"
        "padding-top:.8em}.m{font-weight:bold;text-transform:uppercase}</style></head><body>",
        f"<h1>{esc(spec['info']['title'])} {esc(spec['info']['version'])}</h1>",
        f"<p>{esc(spec['info']['description'])}</p>",
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1).</p>",
    ]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            out.append(
                f"<h2><span class='m'>{esc(method)}</span> <code>{esc(path)}</code></h2>"
                f"<p>{esc(op.get('summary', ''))}</p>"
            )
            if op.get("description"):
                out.append(f"<p>{esc(op['description'])}</p>")
            if op.get("security") == []:
                out.append("<p><em>No token needed.</em></p>")
            params = op.get("parameters", [])
            if params:
                out.append("<h3>Parameters</h3><ul>")
                out += [
                    f"<li><code>{esc(p['name'])}</code> ({esc(p['in'])}): "
                    f"{esc(p.get('description', ''))} <code>"
                    f"{esc(orjson.dumps(p['schema']).decode())}</code></li>"
                    for p in params
                ]
                out.append("</ul>")
            body = op.get("requestBody")
            if body:
                out.append("<h3>Request body</h3><ul>")
                out += [
                    f"<li><code>{esc(mt)}</code>: <code>"
                    f"{esc(orjson.dumps(c['schema']).decode())}</code></li>"
                    for mt, c in body["content"].items()
                ]
                out.append("</ul>")
            out.append("<h3>Responses</h3><ul>")
            for status, reply in op["responses"].items():
                contents: list[dict[str, Any]] = list(reply.get("content", {}).values())
                schema = contents[0].get("schema") if contents else None
                shown = f" <code>{esc(orjson.dumps(schema).decode())}</code>" if schema else ""
                out.append(f"<li><b>{esc(status)}</b> {esc(reply['description'])}{shown}</li>")
            out.append("</ul>")
    for name, item in spec.get("webhooks", {}).items():
        op = item["post"]
        out.append(
            f"<h2>Webhook <code>{esc(name)}</code></h2><p>{esc(op['summary'])}</p>"
            f"<p>{esc(op['description'])}</p><h3>Headers</h3><ul>"
        )
        out += [
            f"<li><code>{esc(p['name'])}</code>: {esc(p['description'])}</li>"
            for p in op["parameters"]
        ]
        out.append("</ul><p>Body: <a href='#CallbackPayload'>CallbackPayload</a></p>")
    out.append("<h2>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        out.append(
            f"<h3 id='{esc(name)}'>{esc(name)}</h3><pre>"
            f"{esc(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())}</pre>"
        )
    out.append("</body></html>")
    return "\n".join(out)
