"""The OpenAPI 3.1 document of the HTTP API (DESIGN section 5), and its docs page.

Built from small pieces so a new field or path is one entry: a task field
goes into ``task_fields``, a response into ``schemas``, a path into
``operations``. The limits in the document are the configured ones, so the
spec a caller reads is the one the service enforces. tests/integration/
test_openapi.py keeps this document and the routes and replies of web.py in
step; schemathesis (tests/integration/test_fuzz.py) checks the rest.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import orjson

from batchd import __version__
from batchd.domain import (
    CALLBACK_URL_PATTERN,
    CHAT_ROLES,
    DEFAULT_ENDPOINT,
    ENDPOINTS,
    LANES,
    MAX_CALLBACK_URL,
    MAX_JOB_CHARS,
    MAX_MODEL,
    MESSAGES,
    MODEL_PATTERN,
    PROFILE_KEY,
    PROFILES,
    Limits,
    provider_endpoints,
)

Schema = dict[str, Any]

# Documents ``null`` besides ``schema``: JSON Schema 2020-12, as OpenAPI 3.1 has it.
def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


TIMESTAMP: Schema = {"type": "string", "format": "date-time"}
NO_NUL = r"^[^\u0000]*$"
MONEY: Schema = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$",
                 "description": "US dollars as a decimal string"}
UNPRICED: Schema = {"type": "boolean",
                    "description": "priced by the unknown-model rule (the price table's most "
                                   "expensive entry), not by an entry of its own"}
STATES = ("queued", "submitted", "succeeded", "failed", "dismissed", "cancelled")
FINISHED = ("succeeded", "failed", "dismissed", "cancelled")


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
    scalars: list[Schema] = [{"type": ["null", "number"]},
                             {"const": False} if but_true else {"type": "boolean"}]
    return {"anyOf": [
        *scalars, text(),
        {"type": "array", "items": JSON_VALUE},
        {"type": "object", "propertyNames": {"pattern": NO_NUL},
         "additionalProperties": JSON_VALUE}]}


def model_schema(priced: Sequence[str] | None) -> Schema:
    """``model``: with ``priced`` (no BATCHD_ALLOWED_MODELS), one of the price
    table's entries or an entry's dated snapshot, as ingest takes them."""
    base: Schema = {"type": "string", "pattern": MODEL_PATTERN, "maxLength": MAX_MODEL,
                    "description": "the model; one provider batch holds one model"}
    if not priced:
        return {**base, "description": base["description"] + " (the prices file's models "
                "and those BATCHD_ALLOWED_MODELS allows)"}
    names = "|".join(name.replace(".", "\\.") for name in priced)
    return {**base, "anyOf": [{"enum": list(priced)},
                              {"pattern": f"^({names})-[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}$"}],
            "description": base["description"] + ": a model of the prices file, or one of "
            "its dated snapshots"}


def body_schemas(priced: Sequence[str] | None = None) -> dict[str, Schema]:
    """Per endpoint, what its body needs (domain._check_body_shape)."""
    model = model_schema(priced)
    stream: Schema = {**json_value(but_true=True),
                      "description": "must not be true: batches cannot stream"}
    text_or_list: Schema = {"anyOf": [text(1), {"type": "array", "minItems": 1,
                                                "items": JSON_VALUE}]}
    required_value: dict[str, Schema] = {
        "/v1/chat/completions": {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "required": ["role"],
                      "properties": {"role": {"enum": list(CHAT_ROLES)}},
                      "additionalProperties": JSON_VALUE}},
        "/v1/responses": text_or_list,
        "/v1/embeddings": {"anyOf": [
            text(1), token_array(),
            {"type": "array", "minItems": 1, "items": {"anyOf": [text(1), token_array()]}}]},
        "/v1/completions": {"anyOf": [text(), {"type": "array", "items": JSON_VALUE}]},
        "/v1/moderations": text_or_list,
        MESSAGES: {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "required": ["role"],
                      "properties": {"role": {"enum": ["user", "assistant"]}},
                      "additionalProperties": JSON_VALUE}},
        "/v1beta/generateContent": {"type": "array", "minItems": 1,
                                    "items": {"type": "object",
                                              "additionalProperties": JSON_VALUE}},
    }
    out = {}
    for endpoint, key in ENDPOINTS.items():
        props: dict[str, Schema] = {"model": model, "stream": stream,
                                    key: required_value[endpoint]}
        required = ["model", key]
        if endpoint == MESSAGES:
            props["max_tokens"] = {"type": "integer", "minimum": 1}
            required.append("max_tokens")
        out[endpoint] = {
            "type": "object", "required": required,
            "description": f"the request body of POST {endpoint}, as the provider takes it",
            "properties": props,
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": JSON_VALUE,
        }
    return out


def task_fields(limits: Limits, callbacks: bool) -> dict[str, Schema]:
    """The fields every task may carry besides endpoint/url and body; null
    stands for absent in the optional ones.
    ``callback_url`` is only offered when BATCHD_CALLBACK_ALLOWED_HOSTS lets
    callbacks through; otherwise any task carrying one is refused."""
    metadata_value: Schema = {"type": "string", "maxLength": limits.metadata_value_chars,
                              "pattern": NO_NUL}
    optional: dict[str, Schema] = {}
    if callbacks:
        optional["callback_url"] = {
            "type": ["string", "null"], "maxLength": MAX_CALLBACK_URL,
            "pattern": CALLBACK_URL_PATTERN,
            "description": "where batchd POSTs the task's result once it is terminal, signed "
                           "with HMAC-SHA256 (headers Batchd-Timestamp, Batchd-Signature; see the "
                           "taskFinished webhook); "
                           "the host must be in BATCHD_CALLBACK_ALLOWED_HOSTS"}
        optional["job_callback_url"] = {
            "type": ["string", "null"], "maxLength": MAX_CALLBACK_URL,
            "pattern": CALLBACK_URL_PATTERN,
            "description": "with job: where batchd POSTs the job's counts once none of its "
                           "tasks is queued or submitted (the jobFinished webhook), signed as "
                           "task callbacks; taken from the job's first task (PUT /v1/jobs/{job} "
                           "changes it)"}
    return {
        "job": {**job_name(limits), "type": ["string", "null"],
                "description": "the job the task belongs to (yours only: names are per "
                               "client); GET /v1/jobs/{job} counts it"},
        **optional,
        "custom_id": {
            "type": "string", "minLength": 1, "maxLength": limits.custom_id_chars,
            "pattern": f"^{limits.custom_id_pattern}$",
            "description": "your id for the task, unique across batchd; its result is "
                           "stored under it once"},
        "method": {"const": "POST", "description": "accepted so provider input lines can be "
                                                   "posted as they are"},
        "metadata": {
            "type": ["object", "null"], "maxProperties": limits.metadata_pairs,
            "propertyNames": {"maxLength": limits.metadata_key_chars, "pattern": NO_NUL},
            "properties": {PROFILE_KEY: {"enum": list(PROFILES),
                                         "description": "latency tolerance of the workload"}},
            "additionalProperties": metadata_value,
            "description": "string pairs kept with the task"},
        "lane": {"enum": [*LANES, None], "description": '"sync" calls the provider at once, at the '
                                                     "synchronous price"},
        "deadline": {"type": ["string", "null"], "format": "date-time",
                     "description": "RFC 3339 time by which a result is needed; one a batch "
                                    "cannot meet goes to the synchronous lane"},
    }


def job_name(limits: Limits) -> Schema:
    return {"type": "string", "minLength": 1, "maxLength": MAX_JOB_CHARS,
            "pattern": f"^{limits.custom_id_pattern}$"}


def task_schema(limits: Limits, callbacks: bool,
                providers: frozenset[str] = frozenset({"openai"})) -> Schema:
    """A task: one variant per endpoint a configured provider runs, so each
    body is checked for its endpoint."""
    variants = []
    for endpoint in ENDPOINTS:
        serving = sorted(p for p in providers if endpoint in provider_endpoints(p))
        if not serving:
            continue
        this: Schema = {"const": endpoint}
        provider: Schema = {"enum": [*serving, None],
                            "description": "the provider to run it (DESIGN section 14); "
                                           "default: by endpoint, then BATCHD_MODEL_ROUTES"}
        variant: Schema = {
            "type": "object", "required": ["custom_id", "body"],
            "properties": {**task_fields(limits, callbacks), "endpoint": this,
                           "provider": provider,
                           "url": {**this, "description": "another name for endpoint"},
                           "body": ref(_body_name(endpoint))},
            "additionalProperties": False,
        }
        if callbacks:
            variant["dependentSchemas"] = {"job_callback_url": {
                "required": ["job"], "properties": {"job": {"type": "string"}}}}
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


# ----------------------------------------------------------------- responses

def schemas(limits: Limits, callbacks: bool,
            priced: Sequence[str] | None = None,
            providers: frozenset[str] = frozenset({"openai"})) -> dict[str, Schema]:
    error_detail: Schema = {
        "type": "object", "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "description": "stable, for programs"},
            "message": {"type": "string", "description": "a sentence that says what to do"},
            "index": {"type": "integer", "description": "0-based position of the bad task"},
            "custom_id": nullable({"type": "string"}),
            "field": {"type": "string", "description": "the bad field, e.g. body.messages"},
            "custom_ids": {"type": "array", "items": {"type": "string"}},
        },
    }
    state_row: Schema = {"type": "object", "required": ["custom_id", "state"],
                         "properties": {"custom_id": {"type": "string"},
                                        "state": {"enum": list(STATES)}}}
    task_view: Schema = {
        "type": "object",
        "required": ["custom_id", "endpoint", "model", "state", "attempts", "created_at"],
        "properties": {
            "custom_id": {"type": "string"},
            "endpoint": {"enum": list(ENDPOINTS)},
            "model": {"type": "string"},
            "state": {"enum": list(STATES)},
            "attempts": {"type": "integer", "minimum": 0,
                         "description": "submissions to the provider so far"},
            "batch_id": nullable({"type": "string"}),
            "last_error": nullable({"type": "object"}),
            "replay_count": {"type": "integer", "minimum": 0},
            "metadata": nullable({"type": "object",
                                  "additionalProperties": {"type": "string"}}),
            "created_at": TIMESTAMP, "updated_at": TIMESTAMP,
            "submitted_at": nullable(TIMESTAMP), "finished_at": nullable(TIMESTAMP),
            "not_before": TIMESTAMP,
            "status_code": nullable({"type": "integer"}),
            "response": nullable({"type": "object",
                                  "description": "the provider's response body"}),
            "cost_usd": nullable(MONEY),
            "unpriced": nullable(UNPRICED),
            "client": nullable({"type": "string",
                                "description": "the client the submitting token names"}),
            "callback_url": nullable({"type": "string"}),
            "location": {
                "type": "object", "required": ["stage"],
                "description": "where the task really is now: `queued` (waiting for a "
                               "window, a retry backoff or the budget), `uploading` (in a "
                               "batch being built or sent to the provider), `at_provider` "
                               "(in a provider batch, with its status), `routing` (its batch "
                               "finished, results being stored), `sync_call` (a synchronous "
                               "call in flight), `routed` (finished: succeeded or in the "
                               "manual queue)",
                "properties": {
                    "stage": {"enum": ["queued", "uploading", "at_provider", "routing",
                                       "sync_call", "routed"]},
                    "batch_id": nullable({"type": "string"}),
                    "batch_state": nullable({"type": "string"}),
                    "provider_batch_id": nullable({"type": "string"}),
                    "provider_status": nullable({"type": "string"}),
                    "eligible_at": nullable(TIMESTAMP),
                    "outcome": nullable({"enum": ["succeeded", "failed"]}),
                }},
        },
    }
    callback: Schema = {
        "type": "object", "required": ["id", "custom_id", "url", "state", "attempts"],
        "properties": {
            "id": {"type": "integer"}, "custom_id": nullable({"type": "string"}),
            "client": nullable({"type": "string"}), "url": {"type": "string"},
            "task_state": {"enum": [*FINISHED, "finished"],
                           "description": "the task's terminal state; finished for a job's"},
            "job": nullable({"type": "string"}),
            "state": {"enum": ["pending", "delivered", "failed"]},
            "attempts": {"type": "integer", "minimum": 0},
            "last_status": nullable({"type": "integer"}),
            "last_error": nullable({"type": "string"}),
            "replay_count": {"type": "integer", "minimum": 0},
            "created_at": TIMESTAMP, "updated_at": TIMESTAMP,
            "delivered_at": nullable(TIMESTAMP),
            "attempt_log": {"type": "array", "items": {"type": "object", "properties": {
                "attempt": {"type": "integer"}, "status_code": nullable({"type": "integer"}),
                "error": nullable({"type": "string"}),
                "duration_seconds": nullable({"type": "number"}), "at": TIMESTAMP}}},
        },
    }
    accepted: Schema = {
        "type": "object", "required": ["accepted", "duplicates", "tasks"],
        "properties": {
            "accepted": {"type": "integer", "minimum": 0, "description": "new tasks stored"},
            "duplicates": {"type": "integer", "minimum": 0,
                           "description": "tasks already stored with the same body"},
            "tasks": {"type": "array", "items": ref("TaskState")},
        },
    }
    finished = {**accepted, "properties": {**accepted["properties"],
                                           "tasks": {"type": "array", "items": ref("TaskView")}}}
    result: Schema = {
        "type": "object", "required": ["seq", "custom_id", "status_code", "created_at"],
        "properties": {"seq": {"type": "integer"}, "client": {"type": "string"},
                       "custom_id": {"type": "string"},
                       "batch_id": nullable({"type": "string"}),
                       "status_code": nullable({"type": "integer"}),
                       "response": nullable({"type": "object"}),
                       "cost_usd": nullable(MONEY),
                       "unpriced": UNPRICED,
                       "created_at": TIMESTAMP},
    }
    failed: Schema = {
        "type": "object", "required": ["id", "custom_id", "endpoint", "model", "attempts"],
        "properties": {"id": {"type": "integer"}, "client": {"type": "string"},
                       "custom_id": {"type": "string"},
                       "endpoint": {"type": "string"}, "model": {"type": "string"},
                       "attempts": {"type": "integer"}, "replay_count": {"type": "integer"},
                       "batch_id": nullable({"type": "string"}),
                       "last_error": nullable({"type": "object"}),
                       "created_at": TIMESTAMP, "finished_at": nullable(TIMESTAMP)},
    }

    def page(key: str, item: str) -> Schema:
        return {"type": "object", "required": [key, "next", "has_more"],
                "properties": {key: {"type": "array", "items": ref(item)},
                               "next": {"type": "string",
                                        "description": "pass as `after` for the next page"},
                               "has_more": {"type": "boolean"}}}

    lane: Schema = {"type": "object", "properties": {
        "finished": {"type": "integer"}, "succeeded": {"type": "integer"},
        "failed": {"type": "integer"}, "failure_ratio": {"type": "number"},
        "spend_usd": MONEY, "cost_per_task_usd": MONEY,
        "latency_p50_seconds": nullable({"type": "number"}),
        "latency_p95_seconds": nullable({"type": "number"})}}
    counts = ("tasks_in", "succeeded", "failed", "cancelled", "retried", "replayed",
              "manual_queue")
    report: Schema = {
        "type": "object",
        "required": ["date", *counts, "failure_ratio", "post_replay_success_ratio",
                     "spend_usd", "sync_equivalent_usd", "savings_usd", "alert"],
        "properties": {
            "date": {"type": "string", "format": "date"},
            **{k: {"type": "integer", "minimum": 0} for k in counts},
            "failure_ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "post_replay_success_ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "spend_usd": MONEY, "sync_equivalent_usd": MONEY, "savings_usd": MONEY,
            "unattributed_usd": {**MONEY, "description": "the part of spend_usd no result "
                                 "carries: billed lines no task kept"},
            "unpriced_models": {"type": "array", "items": {"type": "string"},
                                "description": "models priced by the unknown-model rule"},
            "alert": {"type": "boolean",
                      "description": "failure ratio above BATCHD_FAILURE_ALERT_RATIO"},
            "lanes": {"type": "object", "additionalProperties": ref("LaneReport")},
            "client": {"type": "string",
                       "description": "whose numbers these are (a one-client report)"},
            "clients": {"type": "object", "additionalProperties": ref("ClientReport"),
                        "description": "each client's share (the every-client report)"},
            "providers": {"type": "object", "additionalProperties": ref("ProviderReport"),
                          "description": "the day by provider; their spend adds up to "
                                         "spend_usd"},
        },
    }
    client_report: Schema = {"type": "object", "properties": {
        **{k: {"type": "integer", "minimum": 0} for k in counts},
        "failure_ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "spend_usd": MONEY, "sync_equivalent_usd": MONEY, "savings_usd": MONEY}}
    return {
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": error_detail}},
        "Task": task_schema(limits, callbacks, providers),
        "TaskList": {
            "type": "object", "required": ["tasks"], "additionalProperties": False,
            "properties": {"tasks": {"type": "array", "minItems": 1,
                                     "maxItems": limits.tasks_per_request,
                                     "items": ref("Task")}}},
        **{_body_name(e): s for e, s in body_schemas(priced).items()},
        "JsonValue": json_value(),
        "TaskState": state_row,
        "TaskView": task_view,
        "Accepted": accepted,
        "Finished": finished,
        "Result": result,
        "ResultPage": page("results", "Result"),
        "FailedTask": failed,
        "FailedPage": page("failed", "FailedTask"),
        "ReplayRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "custom_ids": {"type": "array", "maxItems": limits.tasks_per_request,
                               "items": {"type": "string", "maxLength": 512,
                                         "pattern": NO_NUL}},
                "all": {"type": "boolean"}},
            "anyOf": [{"required": ["custom_ids"]},
                      {"required": ["all"], "properties": {"all": {"const": True}}}]},
        "ReplayOutcome": {
            "type": "object", "required": ["replayed", "custom_ids", "skipped"],
            "properties": {
                "replayed": {"type": "integer", "minimum": 0},
                "custom_ids": {"type": "array", "items": {"type": "string"}},
                "skipped": {"type": "array", "items": {
                    "type": "object", "required": ["custom_id", "reason"],
                    "properties": {"custom_id": {"type": "string"},
                                   "reason": {"type": "string"}}}}}},
        "DismissOutcome": {
            "type": "object", "required": ["dismissed", "custom_ids", "skipped"],
            "properties": {
                "dismissed": {"type": "integer", "minimum": 0},
                "custom_ids": {"type": "array", "items": {"type": "string"}},
                "skipped": {"type": "array", "items": {
                    "type": "object", "required": ["custom_id", "reason"],
                    "properties": {"custom_id": {"type": "string"},
                                   "reason": {"type": "string"}}}}}},
        "Callback": callback,
        "CallbackPayload": callback_payload(),
        "TaskCallbacks": {"type": "object", "required": ["custom_id", "callbacks"],
                          "properties": {"custom_id": {"type": "string"},
                                         "callbacks": {"type": "array",
                                                       "items": ref("Callback")}}},
        "FailedCallbackPage": page("failed", "Callback"),
        "CallbackReplayRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "ids": {"type": "array", "maxItems": limits.tasks_per_request,
                        "items": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}},
                "custom_ids": {"type": "array", "maxItems": limits.tasks_per_request,
                               "items": {"type": "string", "maxLength": 512,
                                         "pattern": NO_NUL}},
                "all": {"type": "boolean"}},
            "anyOf": [{"required": ["ids"]}, {"required": ["custom_ids"]},
                      {"required": ["all"], "properties": {"all": {"const": True}}}]},
        "CallbackReplayOutcome": {
            "type": "object", "required": ["replayed", "ids"],
            "properties": {"replayed": {"type": "integer", "minimum": 0},
                           "ids": {"type": "array", "items": {"type": "integer"}}}},
        "DailyReport": report,
        **job_schemas(limits, callbacks),
        "LaneReport": lane,
        "ClientReport": client_report,
        "ProviderReport": {
            "type": "object",
            "required": ["succeeded", "failed", "spend_usd", "sync_equivalent_usd",
                         "savings_usd"],
            "properties": {"succeeded": {"type": "integer", "minimum": 0},
                           "failed": {"type": "integer", "minimum": 0},
                           "spend_usd": MONEY, "sync_equivalent_usd": MONEY,
                           "savings_usd": MONEY}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"const": "ok"}}},
        "Ready": {"type": "object", "required": ["status", "schema"],
                  "properties": {
                      "status": {"enum": ["ready", "degraded"],
                                 "description": "degraded: serving, but something needs a "
                                                "person (see provider)"},
                      "schema": {"type": "string"},
                      "provider": {
                          "type": "object",
                          "description": "providers refusing batchd's credentials (401/403), "
                                         "each with what to fix",
                          "additionalProperties": {
                              "type": "object",
                              "required": ["credentials", "status", "fix"],
                              "properties": {
                                  "credentials": {"const": "rejected"},
                                  "status": {"enum": [401, 403]},
                                  "operation": {"type": "string"},
                                  "code": nullable({"type": "string"}),
                                  "since": {"type": "number"},
                                  "fix": {"type": "string"}}}}}},
    }


# ------------------------------------------------------------------ webhooks

def callback_payload() -> Schema:
    """What batchd POSTs to a callback_url (callbacks.payload)."""
    return {
        "type": "object",
        "required": ["delivery_id", "custom_id", "state", "attempts", "finished_at",
                     "status_code", "response", "last_error"],
        "properties": {
            "delivery_id": {"type": "string", "description": "the same on every retry of one "
                                                             "delivery: deduplicate on it"},
            "custom_id": {"type": "string"},
            "state": {"enum": list(FINISHED)},
            "attempts": {"type": "integer", "minimum": 0,
                         "description": "the task's submissions to the provider"},
            "finished_at": TIMESTAMP,
            "endpoint": nullable({"enum": list(ENDPOINTS)}),
            "model": nullable({"type": "string"}),
            "metadata": nullable({"type": "object",
                                  "additionalProperties": {"type": "string"}}),
            "status_code": nullable({"type": "integer"}),
            "response": nullable({"type": "object",
                                  "description": "the provider's response body (succeeded)"}),
            "last_error": nullable({"type": "object", "description": "why it failed (failed)"}),
        },
    }


def job_view() -> Schema:
    count: Schema = {"type": "integer", "minimum": 0}
    return {
        "type": "object",
        "required": ["job", "tasks", "queued", "submitted", "succeeded", "failed", "cancelled",
                     "spend_usd", "sync_equivalent_usd", "savings_usd", "created_at",
                     "finished_at"],
        "properties": {
            "job": {"type": "string"},
            "tasks": count, "queued": count, "submitted": count, "succeeded": count,
            "failed": count, "cancelled": count,
            "spend_usd": {**MONEY, "description": "what the job's stored results cost"},
            "sync_equivalent_usd": {**MONEY, "description": "what they would have cost "
                                                            "synchronously"},
            "savings_usd": MONEY,
            "created_at": TIMESTAMP,
            "finished_at": nullable({**TIMESTAMP, "description": "null while any task is "
                                                                 "queued or submitted"}),
            "cancelled_at": nullable(TIMESTAMP),
            "callback_url": nullable({"type": "string"}),
        },
    }


def job_schemas(limits: Limits, callbacks: bool) -> dict[str, Schema]:
    url: Schema = ({"type": ["string", "null"], "maxLength": MAX_CALLBACK_URL,
                    "pattern": CALLBACK_URL_PATTERN} if callbacks else {"type": "null"})
    return {
        "Job": job_view(),
        "JobPage": {"type": "object", "required": ["jobs", "next", "has_more"],
                    "properties": {"jobs": {"type": "array", "items": ref("Job")},
                                   "next": nullable({"type": "string", "description":
                                                     "pass as `after` for the next page"}),
                                   "has_more": {"type": "boolean"}}},
        "JobCancelled": {"allOf": [ref("Job"), {
            "type": "object", "required": ["cancelled_now"],
            "properties": {"cancelled_now": {"type": "integer", "minimum": 0,
                                             "description": "queued tasks this call "
                                                            "cancelled"}}}]},
        "JobUpdate": {"type": "object", "required": ["callback_url"],
                      "additionalProperties": False,
                      "properties": {"callback_url": {
                          **url, "description": "where the job's counts are POSTed when it "
                                                "finishes (null: nowhere)"}}},
        "JobResult": {
            "type": "object", "required": ["custom_id", "state", "attempts"],
            "description": "one line of GET /v1/jobs/{job}/results",
            "properties": {
                "custom_id": {"type": "string"}, "state": {"enum": list(FINISHED)},
                "attempts": {"type": "integer", "minimum": 0},
                "response": {"type": "object", "description": "the provider's response "
                                                              "body (succeeded)"},
                "error": {"type": "object", "description": "why it failed or was "
                                                           "cancelled"}}},
        "JobCallbackPayload": {"allOf": [ref("Job"), {
            "type": "object", "required": ["delivery_id", "type"],
            "properties": {"delivery_id": {"type": "string"}, "type": {"const": "job"}}}]},
    }


def webhooks() -> dict[str, Any]:
    def header(name: str, description: str) -> Schema:
        return {"name": name, "in": "header", "required": True, "description": description,
                "schema": {"type": "string"}}

    return {"taskFinished": {"post": {
        "operationId": "taskFinished", "tags": ["callbacks"],
        "summary": "batchd POSTs a task's result to its callback_url once it is terminal",
        "description": (
            "Signed with the client's callback secret: Batchd-Signature is v1= followed by "
            "the hex HMAC-SHA256 of the Batchd-Timestamp digits, a dot, and the raw body. "
            "Any 2xx answer is delivered; anything else, a timeout or a refused connection "
            "is retried with exponential backoff and jitter (at least once: deduplicate on "
            "delivery_id). batchd.client.verify_callback checks a request."),
        "parameters": [
            header("Batchd-Timestamp", "unix seconds when this attempt was signed"),
            header("Batchd-Signature", "v1=<hex HMAC-SHA256 of timestamp.body>"),
            header("Batchd-Delivery", "the delivery id, as in the body"),
            header("Batchd-Attempt", "1 for the first attempt, then 2, 3, ...")],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref("CallbackPayload")}}},
        "responses": {"2XX": {"description": "delivered; batchd stops sending it"},
                      "default": {"description": "not delivered; batchd tries again later"}},
    }}, "jobFinished": {"post": {
        "operationId": "jobFinished", "tags": ["callbacks", "jobs"],
        "summary": "batchd POSTs a job's counts to its callback_url when none of its tasks is "
                   "queued or submitted any more",
        "description": (
            "Signed, retried and deduplicated as taskFinished. Sent again if the job finishes "
            "again (tasks added to it, or failed ones replayed)."),
        "parameters": [
            header("Batchd-Timestamp", "unix seconds when this attempt was signed"),
            header("Batchd-Signature", "v1=<hex HMAC-SHA256 of timestamp.body>"),
            header("Batchd-Delivery", "the delivery id, as in the body"),
            header("Batchd-Attempt", "1 for the first attempt, then 2, 3, ...")],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref("JobCallbackPayload")}}},
        "responses": {"2XX": {"description": "delivered; batchd stops sending it"},
                      "default": {"description": "not delivered; batchd tries again later"}},
    }}}


# ---------------------------------------------------------------- operations

def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                               "schema": {"type": "integer", "minimum": 0}}}


def error(description: str, *codes: str, retry_after: bool = False) -> dict[str, Any]:
    """A documented error reply; ``codes`` are the ``error.code`` values it can carry."""
    listed = ", ".join(f"`{c}`" for c in codes)
    reply: dict[str, Any] = {"description": f"{description} (code {listed})",
                             "content": json_content(ref("Error"))}
    if retry_after:
        reply["headers"] = RETRY_AFTER
    return reply


def ok(description: str, schema: Schema) -> dict[str, Any]:
    return {"description": description, "content": json_content(schema)}


UNAUTHORIZED = error("no valid bearer token", "unauthorized")
UNAVAILABLE = error("the database is unreachable or too slow, or its schema is missing or "
                    "behind (`schema_missing`: run `batchd migrate`); retry after Retry-After",
                    "unavailable", "overloaded", "schema_missing", retry_after=True)
BAD_PARAMETER = error("a query parameter is invalid", "invalid_parameter")
FORBIDDEN = error("?client= names another client and the token is not an admin token",
                  "forbidden")
CLIENT = {"name": "client", "in": "query", "required": False,
          "schema": {"type": "string", "maxLength": 200, "pattern": NO_NUL},
          "description": "admin tokens only (any other token may name only its own client): "
                         "the client whose tasks to read or act on; without it, an admin "
                         "lists every client's and names its own tasks by custom_id"}


def query(name: str, schema: Schema, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def cursor_params() -> list[dict[str, Any]]:
    return [query("after", {"type": "integer", "minimum": 0, "maximum": 2**62},
                  "cursor: the `next` of the previous page (0 = from the start)"),
            query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                  "page size (default 100)")]


DATE: Schema = {"type": "string", "format": "date", "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}
WAIT: Schema = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m)?$"}


def operations(limits: Limits) -> dict[str, dict[str, Any]]:
    open_op: dict[str, Any] = {"security": []}
    return {
        "/v1/tasks": {"post": {
            "operationId": "submitTasks", "tags": ["tasks"],
            "summary": "Submit one task, a list of tasks, or NDJSON lines",
            "description": (
                "All or nothing: any invalid task refuses the whole request (400 naming the "
                "task and the field) and nothing of it is stored. A 202 means every task is "
                "committed to the database. The same custom_id with the same body counts as a "
                f"duplicate; with another body it is a 409. At most "
                f"{limits.tasks_per_request} tasks per request."),
            "parameters": [query("wait", WAIT, "with ?wait=30s (or 500ms, 2m; capped at "
                                               "BATCHD_MAX_WAIT_SECONDS) the reply is 200 with "
                                               "the finished tasks when all of them (at most "
                                               "100) finish within the wait")],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"oneOf": [ref("Task"), ref("TaskList")]}},
                "application/x-ndjson": {"schema": {
                    "type": "array", "minItems": 1, "maxItems": limits.tasks_per_request,
                    "items": ref("Task"),
                    "description": "one Task per line"}}}},
            "responses": {
                "200": ok("every task finished within ?wait", ref("Finished")),
                "202": ok("stored (committed); or already stored with the same body",
                          ref("Accepted")),
                "400": error("the body is not valid JSON, or a task is invalid",
                             "invalid_json", "invalid_request", "invalid_task",
                             "invalid_parameter"),
                "401": UNAUTHORIZED,
                "408": error("the body stopped coming for BATCHD_INGEST_TIMEOUT_SECONDS; "
                             "nothing was stored", "request_timeout"),
                "409": error("a custom_id is already stored with a different body, or a "
                             "task names a job that was cancelled", "conflict",
                             "job_cancelled"),
                "413": error("the body, the task count or one task is too large",
                             "payload_too_large", "too_many_tasks", "task_too_large"),
                "429": error("more than BATCHD_MAX_QUEUED_TASKS tasks are queued, or more than "
                             "the client's BATCHD_CLIENT_MAX_QUEUED, or (with ?wait) "
                             "BATCHD_MAX_WAITERS requests are already waiting; nothing was "
                             "stored", "queue_full", "too_many_waiters", retry_after=True),
                "503": error("shutting down, or the database is unreachable or too slow, or "
                             "its schema is missing or behind (`schema_missing`: run `batchd "
                             "migrate`); nothing of the request was stored", "draining",
                             "unavailable", "overloaded", "schema_missing", retry_after=True),
            }}},
        "/v1/tasks/{custom_id}": {"get": {
            "operationId": "getTask", "tags": ["tasks"],
            "summary": "One task: state, attempts, batch, timestamps, last error, response",
            "description": "Another client's custom_id is a 404, as one never sent.",
            "parameters": [{"name": "custom_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}, CLIENT],
            "responses": {"200": ok("the task", ref("TaskView")),
                          "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "404": error("no task with that custom_id", "not_found"),
                          "503": UNAVAILABLE}}},
        "/v1/tasks/{custom_id}/callbacks": {"get": {
            "operationId": "getTaskCallbacks", "tags": ["callbacks"],
            "summary": "Every result delivery of a task, with each attempt",
            "parameters": [{"name": "custom_id", "in": "path", "required": True,
                            "schema": {"type": "string"}}, CLIENT],
            "responses": {"200": ok("the task's deliveries", ref("TaskCallbacks")),
                          "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "404": error("no task with that custom_id", "not_found"),
                          "503": UNAVAILABLE}}},
        "/v1/callbacks/failed": {"get": {
            "operationId": "listFailedCallbacks", "tags": ["callbacks"],
            "summary": "Deliveries that used up their attempts, oldest first",
            "parameters": [*cursor_params(), CLIENT],
            "responses": {"200": ok("a page of failed deliveries", ref("FailedCallbackPage")),
                          "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "503": UNAVAILABLE}}},
        "/v1/callbacks/replay": {"post": {
            "operationId": "replayCallbacks", "tags": ["callbacks"],
            "summary": "Deliver failed callbacks again (by id, by task, or all)",
            "parameters": [CLIENT],
            "requestBody": {"required": True,
                            "content": json_content(ref("CallbackReplayRequest"))},
            "responses": {"200": ok("the deliveries due again", ref("CallbackReplayOutcome")),
                          "400": error("the body names no deliveries", "invalid_json",
                                       "invalid_request", "invalid_parameter"),
                          "401": UNAUTHORIZED, "403": FORBIDDEN, "503": UNAVAILABLE}}},
        "/v1/results": {"get": {
            "operationId": "listResults", "tags": ["results"],
            "summary": "Stored results in completion order, paged by cursor",
            "parameters": [*cursor_params(), CLIENT],
            "responses": {"200": ok("a page of results", ref("ResultPage")),
                          "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "503": UNAVAILABLE}}},
        "/v1/failed": {"get": {
            "operationId": "listFailed", "tags": ["manual queue"],
            "summary": "The manual queue: tasks that failed for good",
            "parameters": [
                *cursor_params(),
                query("reason", {"type": "string", "maxLength": 200, "pattern": NO_NUL},
                      "only this last_error.code"),
                query("day", DATE, "only tasks that failed on this UTC day"),
                query("endpoint", {"enum": list(ENDPOINTS)}, "only this endpoint"), CLIENT],
            "responses": {"200": ok("a page of failed tasks", ref("FailedPage")),
                          "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "503": UNAVAILABLE}}},
        "/v1/failed/replay": {"post": {
            "operationId": "replayFailed", "tags": ["manual queue"],
            "summary": "Re-queue chosen (or all) failed tasks, attempts reset",
            "description": ('custom_ids name the caller\'s own tasks (an admin\'s ?client= '
                            'names another client\'s); {"all": true} replays all of the '
                            "caller's failed tasks, every client's for an admin without "
                            "?client=."),
            "parameters": [CLIENT],
            "requestBody": {"required": True,
                            "content": json_content(ref("ReplayRequest"))},
            "responses": {"200": ok("what was re-queued and what was skipped, and why",
                                    ref("ReplayOutcome")),
                          "400": error("the body names no tasks", "invalid_json",
                                       "invalid_request", "invalid_parameter"),
                          "401": UNAUTHORIZED, "403": FORBIDDEN, "503": UNAVAILABLE}}},
        "/v1/failed/dismiss": {"post": {
            "operationId": "dismissFailed", "tags": ["manual queue"],
            "summary": "Take chosen (or all) failed tasks out of the manual queue for good "
                       "(export them first); retention then deletes them",
            "description": "Chosen as replay chooses them.",
            "parameters": [CLIENT],
            "requestBody": {"required": True,
                            "content": json_content(ref("ReplayRequest"))},
            "responses": {"200": ok("what was dismissed and what was skipped, and why",
                                    ref("DismissOutcome")),
                          "400": error("the body names no tasks", "invalid_json",
                                       "invalid_request", "invalid_parameter"),
                          "401": UNAUTHORIZED, "403": FORBIDDEN, "503": UNAVAILABLE}}},
        "/v1/report/daily": {"get": {
            "operationId": "dailyReport", "tags": ["report"],
            "summary": "The daily report (one object; a list with days > 1)",
            "parameters": [query("date", DATE, "last UTC day (default today)"),
                           query("days", {"type": "integer", "minimum": 1, "maximum": 366},
                                 "how many days up to date (default 1)"), CLIENT],
            "description": "A client's token sees its own numbers; an admin token every "
                           "client's (and ?client= narrows).",
            "responses": {"200": ok("the report", {"anyOf": [
                              ref("DailyReport"),
                              {"type": "array", "items": ref("DailyReport")}]}),
                          "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "503": UNAVAILABLE}}},
        **job_operations(limits),
        "/healthz": {"get": {
            **open_op, "operationId": "healthz", "tags": ["operations"],
            "summary": "Liveness: the event loop answers; never touches the database",
            "responses": {"200": ok("alive", ref("Health"))}}},
        "/readyz": {"get": {
            **open_op, "operationId": "readyz", "tags": ["operations"],
            "summary": "Readiness: database reachable and schema at head",
            "responses": {"200": ok("ready", ref("Ready")),
                          "503": error("not ready", "database_unavailable", "schema_missing",
                                       "schema_outdated", "draining", retry_after=True)}}},
        "/metrics": {"get": {
            **open_op, "operationId": "metrics", "tags": ["operations"],
            "summary": "Prometheus text format",
            "responses": {"200": {"description": "metrics",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/openapi.json": {"get": {
            **open_op, "operationId": "openapi", "tags": ["operations"],
            "summary": "This document",
            "responses": {"200": ok("OpenAPI 3.1", {"type": "object"})}}},
        "/docs": {"get": {
            **open_op, "operationId": "docs", "tags": ["operations"],
            "summary": "This document in Swagger UI (served from batchd, no CDN)",
            "description": "Markdown rendered, schemas expandable, and *Try it out* with a "
                           "bearer token entered under **Authorize**.",
            "responses": {"200": {"description": "HTML",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/docs/plain": {"get": {
            **open_op, "operationId": "docsPlain", "tags": ["operations"],
            "summary": "This document as one plain page that needs no JavaScript",
            "responses": {"200": {"description": "HTML",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}}}},
    }


MISDIRECTED = error("no ingest tokens are configured and the Host header names another "
                    "address than the loopback one batchd listens on (DNS rebinding)",
                    "misdirected_request")
NOT_JSON = error("no ingest tokens are configured and the body is not declared JSON or NDJSON "
                 "(a cross-site form)", "unsupported_media_type")


def with_edge_replies(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Replies the middleware can give to any operation in no-token mode."""
    for path in paths.values():
        for method, op in path.items():
            op["responses"].setdefault("421", MISDIRECTED)
            if method == "post":
                op["responses"].setdefault("415", NOT_JSON)
    return paths


# A job is (client, name): ?client= names whose job, for admin tokens.
JOB_CLIENT = {**CLIENT, "description": (
    "admin tokens only (any other token may name only its own client): the client whose "
    "jobs these are. Without it a job name means the caller's own job, an admin's too.")}


def job_operations(limits: Limits) -> dict[str, dict[str, Any]]:
    path = [{"name": "job", "in": "path", "required": True, "schema": job_name(limits)},
            JOB_CLIENT]
    missing = error("you (or the client ?client= names) have no job with that name",
                    "not_found")
    return {
        "/v1/jobs": {"get": {
            "operationId": "listJobs", "tags": ["jobs"],
            "summary": "Your jobs, newest first, with their counts and money",
            "parameters": [
                query("after", job_name(limits), "the `next` of the previous page"),
                query("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                      "page size (default 100)"), JOB_CLIENT],
            "responses": {"200": ok("a page of jobs", ref("JobPage")),
                          "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "503": UNAVAILABLE}}},
        "/v1/jobs/{job}": {
            "get": {
                "operationId": "getJob", "tags": ["jobs"],
                "summary": "One job's counts and money, kept as its tasks move (the cost of "
                           "this call does not grow with the job)",
                "parameters": path,
                "responses": {"200": ok("the job", ref("Job")), "400": BAD_PARAMETER,
                              "401": UNAUTHORIZED, "403": FORBIDDEN, "404": missing,
                              "503": UNAVAILABLE}},
            "put": {
                "operationId": "updateJob", "tags": ["jobs"],
                "summary": "Set or clear the job's callback_url",
                "parameters": path,
                "requestBody": {"required": True, "content": json_content(ref("JobUpdate"))},
                "responses": {"200": ok("the job", ref("Job")),
                              "400": error("the body is not a JobUpdate, or the URL cannot "
                                           "be used (it is checked against the job's "
                                           "client's callback settings), or ?client= is "
                                           "not a client name", "invalid_json",
                                           "invalid_request", "invalid_parameter"),
                              "401": UNAUTHORIZED, "403": FORBIDDEN, "404": missing,
                              "503": UNAVAILABLE}}},
        "/v1/jobs/{job}/cancel": {"post": {
            "operationId": "cancelJob", "tags": ["jobs"],
            "summary": "Cancel the job's queued tasks; tasks already at the provider finish",
            "description": (
                "Queued tasks become cancelled: never sent, not failed, not in the manual "
                "queue. Tasks of the job that come back to the queue later (a retry of a "
                "task that was at the provider) are cancelled too, and no new task may "
                "join the job (409 job_cancelled). Calling it again is harmless."),
            "parameters": path,
            "responses": {"200": ok("the job after the cancel", ref("JobCancelled")),
                          "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                          "404": missing, "503": UNAVAILABLE}}},
        "/v1/jobs/{job}/results": {"get": {
            "operationId": "jobResults", "tags": ["jobs"],
            "summary": "The job's finished tasks as NDJSON, streamed",
            "description": (
                "One JobResult per line, in the order the tasks were accepted (task id). "
                "Resume an interrupted read with ?after=<the last custom_id read>. Tasks "
                "still queued or submitted are left out."),
            "parameters": [
                *path,
                query("state", {"enum": list(FINISHED)}, "only tasks in this state"),
                query("after", {"type": "string", "pattern": f"^{limits.custom_id_pattern}$",
                                "maxLength": limits.custom_id_chars},
                      "resume after this task's line")],
            "responses": {
                "200": {"description": "the lines",
                        "content": {"application/x-ndjson": {"schema": {
                            "type": "array", "items": ref("JobResult"),
                            "description": "one JobResult per line"}}}},
                "400": BAD_PARAMETER, "401": UNAUTHORIZED, "403": FORBIDDEN,
                "404": error("you (or the client ?client= names) have no job with that "
                             "name, or ?after names no task of it", "not_found"),
                "503": UNAVAILABLE}}},
    }


def build(limits: Limits, *, callbacks: bool = False,
          priced: Sequence[str] | None = None,
          providers: frozenset[str] = frozenset({"openai"})) -> dict[str, Any]:
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
                "Retry-After."),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": with_edge_replies(operations(limits)),
        **({"webhooks": webhooks()} if callbacks else {}),
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "one of BATCHD_INGEST_TOKENS; not needed when they are unset "
                               "(the API then listens on loopback only)"}},
            "schemas": schemas(limits, callbacks, priced, providers),
        },
    }


# ------------------------------------------------------------------ the page

def render_html(spec: dict[str, Any]) -> str:
    """The document as one self-contained page: no scripts, nothing fetched."""
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(spec['info']['title'])}"
           " API</title><style>body{font:15px/1.45 system-ui,sans-serif;max-width:60em;"
           "margin:2em auto;padding:0 1em}code,pre{font:13px ui-monospace,monospace}"
           "pre{background:#f6f6f6;padding:.6em;overflow:auto}h2{border-top:1px solid #ccc;"
           "padding-top:.8em}.m{font-weight:bold;text-transform:uppercase}</style></head><body>",
           f"<h1>{esc(spec['info']['title'])} {esc(spec['info']['version'])}</h1>",
           f"<p>{esc(spec['info']['description'])}</p>",
           "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> (OpenAPI 3.1).</p>"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            out.append(f"<h2><span class='m'>{esc(method)}</span> <code>{esc(path)}</code></h2>"
                       f"<p>{esc(op.get('summary', ''))}</p>")
            if op.get("description"):
                out.append(f"<p>{esc(op['description'])}</p>")
            if op.get("security") == []:
                out.append("<p><em>No token needed.</em></p>")
            params = op.get("parameters", [])
            if params:
                out.append("<h3>Parameters</h3><ul>")
                out += [f"<li><code>{esc(p['name'])}</code> ({esc(p['in'])}): "
                        f"{esc(p.get('description', ''))} <code>"
                        f"{esc(orjson.dumps(p['schema']).decode())}</code></li>" for p in params]
                out.append("</ul>")
            body = op.get("requestBody")
            if body:
                out.append("<h3>Request body</h3><ul>")
                out += [f"<li><code>{esc(mt)}</code>: <code>"
                        f"{esc(orjson.dumps(c['schema']).decode())}</code></li>"
                        for mt, c in body["content"].items()]
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
        out.append(f"<h2>Webhook <code>{esc(name)}</code></h2><p>{esc(op['summary'])}</p>"
                   f"<p>{esc(op['description'])}</p><h3>Headers</h3><ul>")
        out += [f"<li><code>{esc(p['name'])}</code>: {esc(p['description'])}</li>"
                for p in op["parameters"]]
        out.append("</ul><p>Body: <a href='#CallbackPayload'>CallbackPayload</a></p>")
    out.append("<h2>Schemas</h2>")
    for name, schema in spec["components"]["schemas"].items():
        out.append(f"<h3 id='{esc(name)}'>{esc(name)}</h3><pre>"
                   f"{esc(orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode())}</pre>")
    out.append("</body></html>")
    return "\n".join(out)
