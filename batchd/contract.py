"""The HTTP API's types: what a request may hold and what a reply holds, as
msgspec Structs. Decoding, validation and the OpenAPI document's components
(openapi.py) all come from here, so a rule is written once.

The types whose limits are settings (``domain.Limits``: custom_id length and
alphabet, metadata sizes, tasks per request) are built from the configured
Limits at start-up (``contract_for``); decoding a body into them checks those
limits in the same pass. What a type cannot state stays a small plain function
run right after decoding: rules that read two fields at once, the body each
endpoint needs, the body's depth and size as stored. Those and the sentences
errors are told in (``invalid``) are the only hand-written checks of a task.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Any, Literal, cast

import msgspec
import orjson
from msgspec import UNSET, Meta, UnsetType

from batchd.domain import (
    CALLBACK_URL_PATTERN,
    DEFAULT_ENDPOINT,
    DEFAULT_LIMITS,
    ENDPOINTS,
    GENERATE_CONTENT,
    LINE_ID_MAX_CHARS,
    MAX_CALLBACK_URL,
    MESSAGES,
    PROFILE_KEY,
    PROFILES,
    PROVIDER_NAME,
    PROVIDER_NAMES,
    InvalidTask,
    Limits,
    TaskIn,
    body_digest,
    estimate_tokens,
    input_line,
    provider_endpoints,
)

# A string PostgreSQL can store (jsonb and text refuse NUL).
NO_NUL = r"^[^\u0000]*$"
MAX_JOB_CHARS = 128
MAX_MODEL = 256
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"
# The roles the provider's chat API knows; any other is refused for sure.
CHAT_ROLES = ("developer", "system", "user", "assistant", "tool", "function")

# The URL's length and form are documented here but checked with the allow-list
# (domain.callback_url_problem), whose sentences say what is wrong with it.
CallbackUrl = Annotated[
    str,
    Meta(
        min_length=1,
        extra_json_schema={"maxLength": MAX_CALLBACK_URL, "pattern": CALLBACK_URL_PATTERN},
    ),
]
ProviderName = Annotated[str, Meta(pattern=PROVIDER_NAME.pattern)]
EndpointName = Literal[tuple(ENDPOINTS)]  # type: ignore[valid-type]
Deadline = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]


def whole(pattern: str) -> str:
    """``pattern`` matching a whole string, in Python and in JSON Schema alike
    (Python's ``$`` also matches before a final newline: ``admit`` refuses
    that one)."""
    return f"^(?:{pattern})$"


# ------------------------------------------------------------------ requests


class TaskRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One task as submitted. The fields' limits come from the settings
    (``task_type``); this is the shape code reads. ``method`` and ``url``
    let a provider input line be posted as it is (``url`` is another name
    for ``endpoint``)."""

    custom_id: str
    body: dict[str, Any]
    endpoint: str | UnsetType = UNSET
    url: str | UnsetType = UNSET
    method: Literal["POST"] = "POST"
    provider: str | None = None
    metadata: dict[str, str] | None = None
    lane: Literal["batch", "sync"] | None = None
    deadline: str | None = None
    callback_url: str | None = None
    job: str | None = None
    # Present (even null) only with a job: UNSET tells absent from null.
    job_callback_url: str | UnsetType | None = UNSET


def _described(annotation: Any, description: str) -> Any:
    return Annotated[annotation, Meta(description=description)]


def task_type(limits: Limits) -> type[TaskRequest]:
    """TaskRequest with the configured limits on its fields."""
    custom_id = _described(
        custom_id_type(limits),
        "your id for the task, unique across batchd; its result is stored under it once",
    )
    endpoint = EndpointName
    metadata = Annotated[
        dict[
            Annotated[str, Meta(max_length=limits.metadata_key_chars, pattern=NO_NUL)],
            Annotated[str, Meta(max_length=limits.metadata_value_chars, pattern=NO_NUL)],
        ],
        Meta(
            max_length=limits.metadata_pairs,
            description="string pairs kept with the task",
            extra_json_schema={
                "properties": {
                    PROFILE_KEY: {
                        "enum": list(PROFILES),
                        "description": "latency tolerance of the workload",
                    }
                }
            },
        ),
    ]
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = [
        ("custom_id", custom_id),
        ("body", dict[str, Any]),
        ("endpoint", endpoint | UnsetType, UNSET),
        ("url", _described(endpoint, "another name for endpoint") | UnsetType, UNSET),
        (
            "method",
            _described(
                Literal["POST"], "accepted so provider input lines can be posted as they are"
            ),
            "POST",
        ),
        (
            "provider",
            _described(
                ProviderName,
                "the provider to run it (DESIGN section 14); "
                "default: by endpoint, then BATCHD_MODEL_ROUTES",
            )
            | None,
            None,
        ),
        ("metadata", metadata | None, None),
        (
            "lane",
            _described(
                Literal["batch", "sync"],
                '"sync" calls the provider at once, at the synchronous price',
            )
            | None,
            None,
        ),
        (
            "deadline",
            _described(
                Deadline,
                "RFC 3339 time by which a result is needed; one a "
                "batch cannot meet goes to the synchronous lane",
            )
            | None,
            None,
        ),
        (
            "callback_url",
            _described(
                CallbackUrl,
                "where batchd POSTs the task's result once "
                "it is terminal, signed with HMAC-SHA256 (headers "
                "Batchd-Timestamp, Batchd-Signature; see the taskFinished "
                "webhook); the host must be in "
                "BATCHD_CALLBACK_ALLOWED_HOSTS",
            )
            | None,
            None,
        ),
        (
            "job",
            _described(
                job_type(limits),
                "the job the task belongs to (yours only: "
                "names are per client); GET /v1/jobs/{job} counts it",
            )
            | None,
            None,
        ),
        (
            "job_callback_url",
            _described(
                CallbackUrl,
                "with job: where batchd POSTs the job's "
                "counts once none of its tasks is queued or "
                "submitted (the jobFinished webhook), signed as task "
                "callbacks; taken from the job's first task (PUT "
                "/v1/jobs/{job} changes it)",
            )
            | None
            | UnsetType,
            UNSET,
        ),
    ]
    return cast(
        type[TaskRequest],
        msgspec.defstruct(
            "Task",
            fields,
            bases=(TaskRequest,),
            kw_only=True,
            forbid_unknown_fields=True,
            omit_defaults=True,
        ),
    )


def custom_id_type(limits: Limits) -> Any:
    """A custom_id: the configured length and alphabet."""
    return Annotated[
        str,
        Meta(
            min_length=1, max_length=limits.custom_id_chars, pattern=whole(limits.custom_id_pattern)
        ),
    ]


def job_type(limits: Limits) -> Any:
    """A job name: 1-128 characters of the custom_id alphabet."""
    return Annotated[
        str, Meta(min_length=1, max_length=MAX_JOB_CHARS, pattern=whole(limits.custom_id_pattern))
    ]


class ReplayRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Tasks of the manual queue to replay or dismiss: named, or all."""

    custom_ids: list[str] | UnsetType = UNSET
    all: bool = False


class CallbackReplayRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Failed callback deliveries to try again: by id, by task, or all."""

    ids: list[int] | UnsetType = UNSET
    custom_ids: list[str] | UnsetType = UNSET
    all: bool = False


class JobUpdate(msgspec.Struct, forbid_unknown_fields=True):
    """PUT /v1/jobs/{job}: set (or, with null, clear) the job's callback_url."""

    callback_url: (
        Annotated[
            CallbackUrl,
            Meta(description="where the job's counts are POSTed when it finishes (null: nowhere)"),
        ]
        | None
    )


# ---------------------------------------------------------- query parameters
# The type each parameter's text is converted into (web.query), which is also
# its schema in the OpenAPI document.

PageAfter = Annotated[int, Meta(ge=0, le=2**62)]
PageSize = Annotated[int, Meta(ge=1, le=1000)]
ReportDays = Annotated[int, Meta(ge=1, le=366)]
Day = Annotated[date, Meta(extra_json_schema={"pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"})]
ErrorCode = Annotated[str, Meta(max_length=200, pattern=NO_NUL)]
ClientName = Annotated[str, Meta(max_length=200, pattern=NO_NUL)]
Wait = Annotated[str, Meta(pattern=r"^[0-9]+(\.[0-9]+)?(ms|s|m)?$")]

# ------------------------------------------------------------------- replies
# What the API answers, as documented (openapi.py generates the components
# from these). A field that is absent from some replies defaults to UNSET; one
# that may be null says ``| None``.

STATES = ("queued", "submitted", "succeeded", "failed", "dismissed", "cancelled")
FINISHED = ("succeeded", "failed", "dismissed", "cancelled")
State = Literal["queued", "submitted", "succeeded", "failed", "dismissed", "cancelled"]
Terminal = Literal["succeeded", "failed", "dismissed", "cancelled"]
Count = Annotated[int, Meta(ge=0)]
Ratio = Annotated[float, Meta(ge=0, le=1)]
Money = Annotated[
    str, Meta(pattern=r"^-?[0-9]+(\.[0-9]+)?$", description="US dollars as a decimal string")
]
Unpriced = Annotated[
    bool,
    Meta(
        description="priced by the unknown-model rule (the price "
        "table's most expensive entry), not by an entry of its own"
    ),
]
JsonObject = dict[str, Any]
Cursor = Annotated[str, Meta(description="pass as `after` for the next page")]
# Always with a time zone (JSON Schema's date-time).
Timestamp = Annotated[datetime, Meta(tz=True)]


class ErrorDetail(msgspec.Struct, omit_defaults=True):
    code: Annotated[str, Meta(description="stable, for programs")]
    message: Annotated[str, Meta(description="a sentence that says what to do")]
    index: Annotated[int, Meta(description="0-based position of the bad task")] | UnsetType = UNSET
    custom_id: str | UnsetType | None = UNSET
    field: Annotated[str, Meta(description="the bad field, e.g. body.messages")] | UnsetType = UNSET
    custom_ids: list[str] | UnsetType = UNSET


class Error(msgspec.Struct):
    error: ErrorDetail


class TaskState(msgspec.Struct):
    custom_id: str
    state: State


class Location(msgspec.Struct, omit_defaults=True):
    """Where the task really is now: `queued` (waiting for a window, a retry
    backoff or the budget), `uploading` (in a batch being built or sent to the
    provider), `at_provider` (in a provider batch, with its status), `routing`
    (its batch finished, results being stored), `sync_call` (a synchronous call
    in flight), `routed` (finished: succeeded or in the manual queue)"""

    stage: Literal["queued", "uploading", "at_provider", "routing", "sync_call", "routed"]
    batch_id: str | UnsetType | None = UNSET
    batch_state: str | UnsetType | None = UNSET
    provider_batch_id: str | UnsetType | None = UNSET
    provider_status: str | UnsetType | None = UNSET
    eligible_at: Timestamp | UnsetType | None = UNSET
    outcome: Literal["succeeded", "failed"] | UnsetType | None = UNSET


class TaskView(msgspec.Struct, omit_defaults=True):
    custom_id: str
    endpoint: EndpointName  # type: ignore[valid-type]
    model: str
    state: State
    attempts: Annotated[int, Meta(ge=0, description="submissions to the provider so far")]
    created_at: Timestamp
    batch_id: str | UnsetType | None = UNSET
    last_error: JsonObject | UnsetType | None = UNSET
    replay_count: Count | UnsetType = UNSET
    metadata: dict[str, str] | UnsetType | None = UNSET
    updated_at: Timestamp | UnsetType = UNSET
    submitted_at: Timestamp | UnsetType | None = UNSET
    finished_at: Timestamp | UnsetType | None = UNSET
    not_before: Timestamp | UnsetType = UNSET
    status_code: int | UnsetType | None = UNSET
    response: (
        Annotated[JsonObject, Meta(description="the provider's response body")] | UnsetType | None
    ) = UNSET
    cost_usd: Money | UnsetType | None = UNSET
    unpriced: Unpriced | UnsetType | None = UNSET
    client: (
        Annotated[str, Meta(description="the client the submitting token names")] | UnsetType | None
    ) = UNSET
    callback_url: str | UnsetType | None = UNSET
    location: Location | UnsetType = UNSET


class Accepted(msgspec.Struct):
    accepted: Annotated[int, Meta(ge=0, description="new tasks stored")]
    duplicates: Annotated[int, Meta(ge=0, description="tasks already stored with the same body")]
    tasks: list[TaskState]


class Finished(msgspec.Struct):
    """Every task of the request, finished within ?wait."""

    accepted: Annotated[int, Meta(ge=0, description="new tasks stored")]
    duplicates: Annotated[int, Meta(ge=0, description="tasks already stored with the same body")]
    tasks: list[TaskView]


class Result(msgspec.Struct, omit_defaults=True):
    seq: int
    custom_id: str
    status_code: int | None
    created_at: Timestamp
    client: str | UnsetType = UNSET
    batch_id: str | UnsetType | None = UNSET
    response: JsonObject | UnsetType | None = UNSET
    cost_usd: Money | UnsetType | None = UNSET
    unpriced: Unpriced | UnsetType = UNSET


class ResultPage(msgspec.Struct):
    results: list[Result]
    next: Cursor
    has_more: bool


class FailedTask(msgspec.Struct, omit_defaults=True):
    id: int
    custom_id: str
    endpoint: str
    model: str
    attempts: int
    client: str | UnsetType = UNSET
    replay_count: int | UnsetType = UNSET
    batch_id: str | UnsetType | None = UNSET
    last_error: JsonObject | UnsetType | None = UNSET
    created_at: Timestamp | UnsetType = UNSET
    finished_at: Timestamp | UnsetType | None = UNSET


class FailedPage(msgspec.Struct):
    failed: list[FailedTask]
    next: Cursor
    has_more: bool


class Skipped(msgspec.Struct):
    custom_id: str
    reason: str


class ReplayOutcome(msgspec.Struct):
    replayed: Count
    custom_ids: list[str]
    skipped: list[Skipped]


class DismissOutcome(msgspec.Struct):
    dismissed: Count
    custom_ids: list[str]
    skipped: list[Skipped]


class DeliveryAttempt(msgspec.Struct, omit_defaults=True):
    attempt: int | UnsetType = UNSET
    status_code: int | UnsetType | None = UNSET
    error: str | UnsetType | None = UNSET
    duration_seconds: float | UnsetType | None = UNSET
    at: Timestamp | UnsetType = UNSET


class Callback(msgspec.Struct, omit_defaults=True):
    id: int
    url: str
    state: Literal["pending", "delivered", "failed"]
    attempts: Count
    custom_id: str | None
    client: str | UnsetType | None = UNSET
    task_state: (
        Annotated[
            Literal["succeeded", "failed", "dismissed", "cancelled", "finished"],
            Meta(description="the task's terminal state; finished for a job's"),
        ]
        | UnsetType
    ) = UNSET
    job: str | UnsetType | None = UNSET
    last_status: int | UnsetType | None = UNSET
    last_error: str | UnsetType | None = UNSET
    replay_count: Count | UnsetType = UNSET
    created_at: Timestamp | UnsetType = UNSET
    updated_at: Timestamp | UnsetType = UNSET
    delivered_at: Timestamp | UnsetType | None = UNSET
    attempt_log: list[DeliveryAttempt] | UnsetType = UNSET


class CallbackPayload(msgspec.Struct, omit_defaults=True):
    """What batchd POSTs to a callback_url (callbacks.payload)."""

    delivery_id: Annotated[
        str, Meta(description="the same on every retry of one delivery: deduplicate on it")
    ]
    custom_id: str
    state: Terminal
    attempts: Annotated[int, Meta(ge=0, description="the task's submissions to the provider")]
    finished_at: Timestamp
    status_code: int | None
    response: (
        Annotated[JsonObject, Meta(description="the provider's response body (succeeded)")] | None
    )
    last_error: Annotated[JsonObject, Meta(description="why it failed (failed)")] | None
    endpoint: EndpointName | UnsetType | None = UNSET  # type: ignore[valid-type]
    model: str | UnsetType | None = UNSET
    metadata: dict[str, str] | UnsetType | None = UNSET


class TaskCallbacks(msgspec.Struct):
    custom_id: str
    callbacks: list[Callback]


class FailedCallbackPage(msgspec.Struct):
    failed: list[Callback]
    next: Cursor
    has_more: bool


class CallbackReplayOutcome(msgspec.Struct):
    replayed: Count
    ids: list[int]


class LaneReport(msgspec.Struct, omit_defaults=True):
    finished: int | UnsetType = UNSET
    succeeded: int | UnsetType = UNSET
    failed: int | UnsetType = UNSET
    failure_ratio: float | UnsetType = UNSET
    spend_usd: Money | UnsetType = UNSET
    cost_per_task_usd: Money | UnsetType = UNSET
    latency_p50_seconds: float | UnsetType | None = UNSET
    latency_p95_seconds: float | UnsetType | None = UNSET


class ClientReport(msgspec.Struct, omit_defaults=True):
    tasks_in: Count | UnsetType = UNSET
    succeeded: Count | UnsetType = UNSET
    failed: Count | UnsetType = UNSET
    cancelled: Count | UnsetType = UNSET
    retried: Count | UnsetType = UNSET
    replayed: Count | UnsetType = UNSET
    manual_queue: Count | UnsetType = UNSET
    failure_ratio: Ratio | UnsetType = UNSET
    spend_usd: Money | UnsetType = UNSET
    sync_equivalent_usd: Money | UnsetType = UNSET
    savings_usd: Money | UnsetType = UNSET


class ProviderReport(msgspec.Struct):
    succeeded: Count
    failed: Count
    spend_usd: Money
    sync_equivalent_usd: Money
    savings_usd: Money


class DailyReport(msgspec.Struct, omit_defaults=True):
    date: date
    tasks_in: Count
    succeeded: Count
    failed: Count
    cancelled: Count
    retried: Count
    replayed: Count
    manual_queue: Count
    failure_ratio: Ratio
    post_replay_success_ratio: Ratio
    spend_usd: Money
    sync_equivalent_usd: Money
    savings_usd: Money
    alert: Annotated[bool, Meta(description="failure ratio above BATCHD_FAILURE_ALERT_RATIO")]
    unattributed_usd: (
        Annotated[
            str,
            Meta(
                pattern=r"^-?[0-9]+(\.[0-9]+)?$",
                description="the part of spend_usd no result carries: billed lines no task kept",
            ),
        ]
        | UnsetType
    ) = UNSET
    unpriced_models: (
        Annotated[list[str], Meta(description="models priced by the unknown-model rule")]
        | UnsetType
    ) = UNSET
    lanes: dict[str, LaneReport] | UnsetType = UNSET
    client: (
        Annotated[str, Meta(description="whose numbers these are (a one-client report)")]
        | UnsetType
    ) = UNSET
    clients: (
        Annotated[
            dict[str, ClientReport],
            Meta(description="each client's share (the every-client report)"),
        ]
        | UnsetType
    ) = UNSET
    providers: (
        Annotated[
            dict[str, ProviderReport],
            Meta(description="the day by provider; their spend adds up to spend_usd"),
        ]
        | UnsetType
    ) = UNSET


class Job(msgspec.Struct, omit_defaults=True):
    job: str
    tasks: Count
    queued: Count
    submitted: Count
    succeeded: Count
    failed: Count
    cancelled: Count
    spend_usd: Annotated[
        str,
        Meta(pattern=r"^-?[0-9]+(\.[0-9]+)?$", description="what the job's stored results cost"),
    ]
    sync_equivalent_usd: Annotated[
        str,
        Meta(
            pattern=r"^-?[0-9]+(\.[0-9]+)?$", description="what they would have cost synchronously"
        ),
    ]
    savings_usd: Money
    created_at: Timestamp
    finished_at: (
        Annotated[Timestamp, Meta(description="null while any task is queued or submitted")] | None
    )
    cancelled_at: Timestamp | UnsetType | None = UNSET
    callback_url: str | UnsetType | None = UNSET


class JobPage(msgspec.Struct):
    jobs: list[Job]
    next: Cursor | None
    has_more: bool


class JobCancelled(Job, kw_only=True, omit_defaults=True):
    cancelled_now: Annotated[int, Meta(ge=0, description="queued tasks this call cancelled")]


class JobResult(msgspec.Struct, omit_defaults=True):
    """one line of GET /v1/jobs/{job}/results"""

    custom_id: str
    state: Terminal
    attempts: Count
    response: (
        Annotated[JsonObject, Meta(description="the provider's response body (succeeded)")]
        | UnsetType
    ) = UNSET
    error: Annotated[JsonObject, Meta(description="why it failed or was cancelled")] | UnsetType = (
        UNSET
    )


class JobCallbackPayload(Job, kw_only=True, omit_defaults=True):
    delivery_id: str
    type: Literal["job"]


class Health(msgspec.Struct):
    status: Literal["ok"]


class CredentialsProblem(msgspec.Struct, omit_defaults=True):
    credentials: Literal["rejected"]
    status: Literal[401, 403]
    fix: str
    operation: str | UnsetType = UNSET
    code: str | UnsetType | None = UNSET
    since: float | UnsetType = UNSET


class Ready(msgspec.Struct, omit_defaults=True):
    status: Annotated[
        Literal["ready", "degraded"],
        Meta(description="degraded: serving, but something needs a person (see provider)"),
    ]
    schema: str | None
    provider: (
        Annotated[
            dict[str, CredentialsProblem],
            Meta(
                description="providers refusing batchd's credentials (401/403), each with what to "
                "fix"
            ),
        ]
        | UnsetType
    ) = UNSET


# The replies, each a component of the OpenAPI document under its own name.
REPLIES: tuple[type[msgspec.Struct], ...] = (
    Error,
    TaskState,
    TaskView,
    Accepted,
    Finished,
    Result,
    ResultPage,
    FailedTask,
    FailedPage,
    ReplayOutcome,
    DismissOutcome,
    Callback,
    CallbackPayload,
    TaskCallbacks,
    FailedCallbackPage,
    CallbackReplayOutcome,
    DailyReport,
    LaneReport,
    ClientReport,
    ProviderReport,
    Job,
    JobPage,
    JobCancelled,
    JobResult,
    JobCallbackPayload,
    Health,
    Ready,
)


# ------------------------------------------------------ the configured types


@dataclass(frozen=True, slots=True)
class Contract:
    """The request types built from one Limits, with their decoders."""

    limits: Limits
    task: type[TaskRequest]
    custom_id: Any
    # ``{"tasks": [...]}``, as documented; decode.py reads it a piece at a
    # time, to the same rules.
    task_list: type[msgspec.Struct]
    tasks: msgspec.json.Decoder[list[TaskRequest]]
    lines: msgspec.json.Decoder[TaskRequest]
    job: Any
    replay: type[ReplayRequest]
    callback_replay: type[CallbackReplayRequest]

    def decode_lines(self, data: bytes) -> list[TaskRequest]:
        """NDJSON lines into tasks (blank lines skipped); raises ValueError
        (msgspec's DecodeError or ValidationError) for anything else."""
        return self.lines.decode_lines(data)

    def decode_list(self, data: bytes) -> list[TaskRequest]:
        """A JSON array of tasks; raises ValueError as decode_lines."""
        return self.tasks.decode(data)

    def convert(self, items: list[Any], start: int) -> list[TaskRequest | InvalidTask]:
        """Decoded JSON values into tasks, in order, up to the first that is not
        one: that one is an InvalidTask in the list, raised when the caller
        reaches it (after the tasks before it, as their checks come first)."""
        out: list[TaskRequest | InvalidTask] = []
        for n, item in enumerate(items):
            try:
                out.append(msgspec.convert(item, self.task))
            except msgspec.ValidationError as exc:
                out.append(invalid(exc, item, start + n, self.limits))
                break
        return out

    def job_name_problem(self, job: Any) -> str | None:
        """Why ``job`` cannot name a job, or None."""
        try:
            msgspec.convert(job, self.job)
        except msgspec.ValidationError as exc:
            return _reason("job", _kind(str(exc)), self.limits)
        if job.endswith("\n"):  # the one string Python's $ lets through
            return _reason("job", "pattern", self.limits)
        return None


@functools.cache
def contract_for(limits: Limits) -> Contract:
    task = task_type(limits)
    # Replay and callback replay name tasks the same way.
    custom_ids = (
        "custom_ids",
        Annotated[
            list[Annotated[str, Meta(max_length=512, pattern=NO_NUL)]],
            Meta(max_length=limits.tasks_per_request),
        ]
        | UnsetType,
        UNSET,
    )
    replay = msgspec.defstruct(
        "ReplayRequest",
        [
            custom_ids,
        ],
        bases=(ReplayRequest,),
        forbid_unknown_fields=True,
        omit_defaults=True,
    )
    callback_replay = msgspec.defstruct(
        "CallbackReplayRequest",
        [
            (
                "ids",
                Annotated[
                    list[Annotated[int, Meta(ge=1, le=2**63 - 1)]],
                    Meta(max_length=limits.tasks_per_request),
                ]
                | UnsetType,
                UNSET,
            ),
            custom_ids,
        ],
        bases=(CallbackReplayRequest,),
        forbid_unknown_fields=True,
        omit_defaults=True,
    )
    task_list = msgspec.defstruct(
        "TaskList",
        [
            (
                "tasks",
                Annotated[
                    list[task],  # type: ignore[valid-type]
                    Meta(min_length=1, max_length=limits.tasks_per_request),
                ],
            )
        ],
        forbid_unknown_fields=True,
    )
    return Contract(
        limits,
        task,
        custom_id_type(limits),
        task_list,
        msgspec.json.Decoder(list[task]),  # type: ignore[valid-type]
        msgspec.json.Decoder(task),
        job_type(limits),
        cast(type[ReplayRequest], replay),
        cast(type[CallbackReplayRequest], callback_replay),
    )


def parse_task(obj: Any, index: int, limits: Limits = DEFAULT_LIMITS) -> TaskIn:
    """One task given as a decoded JSON value, validated; raises InvalidTask."""
    got = contract_for(limits).convert([obj], index)[0]
    if isinstance(got, InvalidTask):
        raise got
    return admit(got, index, limits)


def job_name_problem(job: Any, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """Why ``job`` cannot name a job (1-128 characters of the custom_id
    alphabet), or None."""
    return contract_for(limits).job_name_problem(job)


# ------------------------------------------------- errors, told as sentences

_ERROR = re.compile(
    r"(?P<what>.*?)(?: - at (?P<key>`key` in )?`\$(?:\[\d+\])?(?P<path>[^`]*)`)?", re.S
)
_NAMED = re.compile(r"Object (?:missing required|contains unknown) field `(?P<name>[^`]*)`")


def _top(path: str) -> str:
    """The top field of a msgspec path after ``$`` (``.metadata[...]``: metadata)."""
    return path.lstrip(".").split(".", 1)[0].split("[", 1)[0]


def error_field(exc: msgspec.ValidationError) -> str:
    """The top field msgspec's error is about; "" for the value as a whole
    (not an object, a field missing or unknown)."""
    match = _ERROR.fullmatch(str(exc))
    assert match is not None  # the pattern matches any text
    return _top(match["path"] or "")


def _kind(what: str) -> str:
    """Which rule a msgspec message says was broken: "max" (too long or too
    many), "pattern", or "type" (absent, wrong type, empty, not allowed)."""
    if "length <=" in what:
        return "max"
    if "matching regex" in what:
        return "pattern"
    return "type"


def _reason(field: str, kind: str, limits: Limits) -> str:
    """The sentence for a field whose ``kind`` of rule was broken."""
    if kind == "max" and field in ("custom_id", "job", "metadata"):
        return {
            "custom_id": f"must be at most {limits.custom_id_chars} characters",
            "job": f"must be at most {MAX_JOB_CHARS} characters",
            "metadata": f"must hold at most {limits.metadata_pairs} pairs",
        }[field]
    if kind == "pattern" and field in ("custom_id", "job"):
        return f"may only hold characters matching {limits.custom_id_pattern}"
    return _REASONS.get(field, "is not a known task field")


_REASONS = {
    "task": "must be a JSON object",
    "custom_id": "is required and must be a non-empty string",
    "job": "must be a non-empty string",
    "metadata": "must be an object of strings",
    "body": "is required and must be a JSON object",
    "endpoint": f"must be one of {', '.join(ENDPOINTS)}",
    "url": f"must be one of {', '.join(ENDPOINTS)}",
    "provider": f"must be {PROVIDER_NAMES}",
    "method": 'must be "POST" (the only method batches run)',
    "lane": 'must be "batch" or "sync"',
    "deadline": "must be an RFC 3339 timestamp string",
    "callback_url": "must be an http(s) URL string",
    "job_callback_url": "must be an http(s) URL string",
}


def invalid(exc: msgspec.ValidationError, item: Any, index: int, limits: Limits) -> InvalidTask:
    """msgspec's complaint about task ``index`` (``item``: the task as decoded
    JSON) as the API tells it: ``task 3 ('a'): custom_id must be ...``, with
    the field named as the task's own keys name it."""
    match = _ERROR.fullmatch(str(exc))
    assert match is not None  # the pattern matches any text
    what, path = match["what"], match["path"] or ""
    cid = item.get("custom_id") if isinstance(item, dict) else None
    cid = cid if isinstance(cid, str) and cid else None
    field = _top(path)
    if not field:
        named = _NAMED.match(what)
        if named is None:
            return InvalidTask(index, None, "task", _REASONS["task"])
        field = named["name"]
        if field == "custom_id":
            return InvalidTask(index, None, field, _reason(field, "type", limits))
    kind = _kind(what)
    if field == "custom_id":
        return InvalidTask(
            index, cid[:40] if cid and kind != "type" else None, field, _reason(field, kind, limits)
        )
    if field == "metadata" and (match["key"] or path != ".metadata"):
        return _metadata_entry(item["metadata"], index, cid, limits)
    return InvalidTask(index, cid, field, _reason(field, kind, limits))


def _metadata_entry(
    metadata: dict[str, Any], index: int, cid: str | None, limits: Limits
) -> InvalidTask:
    """The first metadata pair past a limit (msgspec names the map, not the key)."""
    for k, v in metadata.items():
        shown = k[:20].replace("\x00", "")
        if len(k) > limits.metadata_key_chars or "\x00" in k:
            return InvalidTask(
                index,
                cid,
                f"metadata.{shown}",
                f"key must be at most {limits.metadata_key_chars} characters, without NUL",
            )
        if not isinstance(v, str) or len(v) > limits.metadata_value_chars or "\x00" in v:
            return InvalidTask(
                index,
                cid,
                f"metadata.{shown}",
                "must be a string of at most "
                f"{limits.metadata_value_chars} characters, without NUL",
            )
    return InvalidTask(index, cid, "metadata", "must be an object of strings")


# ----------------------------------------- rules a type cannot state, then TaskIn

_NON_BLANK = re.compile(r"\S")
_MODEL = re.compile(MODEL_PATTERN[1:-1])
# The bytes of a line besides its serialised custom_id, url and body.
_LINE_FIXED = len(input_line("", "", {})) - len(b'""') * 2 - len(b"{}")
_LINE_ID_BYTES = LINE_ID_MAX_CHARS + 2  # quoted
_ENDPOINT_BYTES = {endpoint: len(orjson.dumps(endpoint)) for endpoint in ENDPOINTS}


def admit(req: TaskRequest, index: int, limits: Limits) -> TaskIn:
    """A decoded task, checked for what its type cannot say, as a TaskIn.

    Everything the provider would reject for sure is refused here or by the
    type, so one bad task never fails a whole batch later.
    """
    cid = req.custom_id
    if cid[-1] == "\n":  # the one string Python's $ lets through the type's pattern
        raise InvalidTask(index, cid[:40], "custom_id", _reason("custom_id", "pattern", limits))
    endpoint = _endpoint(req, index)
    provider = req.provider
    if provider is not None and endpoint not in provider_endpoints(provider):
        raise InvalidTask(index, cid, "provider", f"{provider} does not run {endpoint}")
    body = req.body
    model = body.get("model")
    if not isinstance(model, str) or not _NON_BLANK.search(model):
        raise InvalidTask(index, cid, "body.model", "is required and must be a non-empty string")
    if len(model) > MAX_MODEL or not _MODEL.fullmatch(model):
        # model is indexed (windows group by it) and becomes a provider
        # batch's key: a long or odd one must fail its own request, never
        # the commit it shares with other callers' requests.
        raise InvalidTask(
            index,
            cid,
            "body.model",
            f"must be at most {MAX_MODEL} characters of letters, digits and "
            "._:/@+- starting with a letter or digit",
        )
    if body.get("stream") is True:
        raise InvalidTask(index, cid, "body.stream", "must not be true: batches cannot stream")
    check_body_shape(endpoint, body, index, cid)
    body_json = _body_json(body, limits.body_depth, index, cid)
    metadata = req.metadata
    profile = metadata.get(PROFILE_KEY) if metadata else None
    if profile is not None and profile not in PROFILES:
        raise InvalidTask(
            index, cid, f"metadata.{PROFILE_KEY}", f"must be one of {', '.join(PROFILES)}"
        )
    deadline = parse_deadline(req.deadline, index, cid)
    job = req.job
    if job is not None and job[-1] == "\n":
        raise InvalidTask(index, cid, "job", _reason("job", "pattern", limits))
    job_callback_url = req.job_callback_url
    if job_callback_url is not UNSET and job is None:
        raise InvalidTask(index, cid, "job_callback_url", "needs a job on the same task")
    body_bytes = len(body_json)
    # The most len(input_line(line_id(...), endpoint, body)) can be, without
    # serialising the body twice: the file carries batchd's id, not the caller's.
    line_bytes = _LINE_FIXED + _LINE_ID_BYTES + _ENDPOINT_BYTES[endpoint] + body_bytes
    if body_bytes > limits.task_body_bytes:
        raise InvalidTask(
            index,
            cid,
            "body",
            f"is {body_bytes} bytes as JSON, more than "
            f"the {limits.task_body_bytes} a task may hold",
            status=413,
        )
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
        requested_lane=req.lane,
        deadline=deadline,
        profile=profile,
        callback_url=req.callback_url,
        body_json=body_json.decode(),
        job=job,
        job_callback_url=None if job_callback_url is UNSET else job_callback_url,
        provider=provider,
    )


def _endpoint(req: TaskRequest, index: int) -> str:
    endpoint, url = req.endpoint, req.url
    if endpoint is UNSET:
        return DEFAULT_ENDPOINT if url is UNSET else url
    if url is not UNSET and url != endpoint:
        raise InvalidTask(index, req.custom_id, "url", "must equal endpoint when both are given")
    return endpoint


def _is_int(value: Any) -> bool:
    """JSON Schema's integer: 3 and 3.0, never true/false."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) for v in value)


def check_body_shape(endpoint: str, body: dict[str, Any], index: int, cid: str) -> None:
    """The minimum each endpoint's body needs (openai-batch-protocol.md section 3);
    openapi.body_schemas states the same as JSON Schema."""
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
                raise InvalidTask(
                    index, cid, f"{field}[{n}].role", f"must be one of {', '.join(CHAT_ROLES)}"
                )
    elif endpoint == "/v1/embeddings":
        ok = (
            (isinstance(value, str) and value != "")
            or _is_tokens(value)
            or (
                isinstance(value, list)
                and bool(value)
                and all((isinstance(v, str) and v != "") or _is_tokens(v) for v in value)
            )
        )
        if not ok:
            raise InvalidTask(
                index,
                cid,
                field,
                "must be a non-empty string, a list of non-empty strings, or token arrays",
            )
    elif endpoint == "/v1/completions":
        if not isinstance(value, str | list):
            raise InvalidTask(index, cid, field, "must be a string or a list")
    elif endpoint == MESSAGES:
        if not isinstance(value, list) or not value:
            raise InvalidTask(index, cid, field, "must be a non-empty list of message objects")
        for n, msg in enumerate(value):
            if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
                raise InvalidTask(
                    index,
                    cid,
                    f"{field}[{n}].role",
                    "must be user or assistant (the system prompt is body.system)",
                )
        if not _is_int(body.get("max_tokens")) or body["max_tokens"] < 1:
            raise InvalidTask(
                index,
                cid,
                "body.max_tokens",
                f"is required for {MESSAGES} and must be a positive integer",
            )
    elif endpoint == GENERATE_CONTENT:
        if not isinstance(value, list) or not value or not all(isinstance(c, dict) for c in value):
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
    orjson cannot write, is walked.
    """
    try:
        body_json = orjson.dumps(body)
    except orjson.JSONEncodeError:
        _check_json(body, "body", depth, index, cid)
        _as_orjson_reads(body)
        return orjson.dumps(body)
    if body_json.count(b"{") + body_json.count(b"[") > depth or b"\\u0000" in body_json:
        _check_json(body, "body", depth, index, cid)
    return body_json


_ORJSON_INTS = range(-(2**63), 2**64)


def _as_orjson_reads(value: Any) -> None:
    """Integers past 64 bits as floats, as orjson reads them (msgspec keeps
    them exact, and orjson cannot write them), in place."""
    stack = [value]
    while stack:
        item = stack.pop()
        pairs = item.items() if isinstance(item, dict) else enumerate(item)
        for k, v in pairs:
            if isinstance(v, int) and not isinstance(v, bool) and v not in _ORJSON_INTS:
                item[k] = float(v)
            elif isinstance(v, dict | list):
                stack.append(v)


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


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_deadline(raw: str | None, index: int, cid: str) -> datetime | None:
    """RFC 3339 (JSON Schema's date-time), the whole grammar: lower-case t/z,
    any number of fraction digits, and a leap second, read as :59."""
    if raw is None:
        return None
    match = _RFC3339.fullmatch(raw)
    try:
        if match is None:
            raise ValueError(raw)
        y, mo, d, h, mi, sec, frac, z, sign, oh, om = match.groups()
        offset = (
            timedelta(0)
            if z
            else (1 if sign == "+" else -1) * timedelta(hours=int(oh), minutes=int(om))
        )
        if abs(offset) >= timedelta(days=1):
            raise ValueError(raw)
        return datetime(
            int(y),
            int(mo),
            int(d),
            int(h),
            int(mi),
            min(int(sec), 59),
            int((frac or "0")[:6].ljust(6, "0")),
            tzinfo=timezone(offset),
        )
    except ValueError:
        raise InvalidTask(
            index,
            cid,
            "deadline",
            "must be an RFC 3339 timestamp with a time zone, such as 2026-11-23T18:00:00Z",
        ) from None
