"""Table definitions (SQLAlchemy Core). Alembic migrations build the same schema."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeEngine

metadata = MetaData()

NOW = text("now()")
MONEY = Numeric(24, 12)


# The counts of a daily_rollups row (store/rollups.py adds the sync lane's).
ROLLUP_COUNTS = (
    "tasks_in",
    "succeeded",
    "failed",
    "cancelled",
    "retried",
    "replayed",
    "dismissed",
    "finished",
    "finished_ok",
)


def zeros(kind: type[TypeEngine[Any]] | TypeEngine[Any], *names: str) -> list[Column[Any]]:
    """Counter or money columns that start at zero (jobs, their deltas, rollups)."""
    return [Column(name, kind, nullable=False, server_default="0") for name in names]


tasks = Table(
    "tasks",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("custom_id", Text, nullable=False),
    Column("endpoint", Text, nullable=False),
    Column("model", Text, nullable=False),
    # NULL once the task succeeded in a batch: the archive holds its input
    # line, and only failed tasks are replayed from their body (migration 0010).
    Column("body", JSONB),
    Column("body_digest", Text, nullable=False),
    Column("metadata", JSONB),
    Column("line_bytes", Integer, nullable=False),
    Column("est_input_tokens", Integer, nullable=False, server_default="0"),
    Column("est_output_tokens", Integer, nullable=False, server_default="0"),
    Column("state", Text, nullable=False, server_default="queued"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # When the task may join a window; a window's age is measured from the
    # oldest not_before in it, so a retried task waits out its backoff first.
    Column("not_before", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("batch_id", Text),
    Column("last_error", JSONB),
    Column("replay_count", Integer, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("submitted_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    # The lane decided at ingest (domain.place); fallback_at is when a batch
    # task still unanswered moves to the sync lane (profile or deadline).
    Column("lane", Text, nullable=False, server_default="batch"),
    Column("deadline", DateTime(timezone=True)),
    Column("fallback_at", DateTime(timezone=True)),
    # The client whose token sent the task ('local': an anonymous token or
    # no-token mode): with custom_id, the task's key (migration 0011). And
    # where its result is POSTed when it reaches a terminal state.
    Column("client", Text, nullable=False, server_default="local"),
    Column("callback_url", Text),
    # What happens at fallback_at: 'sync' (call it synchronously) or
    # 'resubmit' (into a fresh batch); NULL reads as 'sync'.
    Column("fallback_action", Text),
    # 1-based line of the task in its batch's input file, fixed when the
    # batch is built, so validation errors naming lines find their task even
    # after another task left the batch.
    Column("batch_line", Integer),
    # The job the task belongs to (per client, DESIGN section 13); NULL: none.
    Column("job", Text),
    # The provider the task was routed to at ingest (DESIGN section 14).
    Column("provider", Text, nullable=False, server_default="openai"),
    # dismissed: taken out of the manual queue by an operator, not replayed.
    # cancelled: queued when its job was cancelled, never sent (migration 0009).
    CheckConstraint(
        "state IN ('queued','submitted','succeeded','failed','dismissed','cancelled')",
        name="task_state",
    ),
    CheckConstraint("lane IN ('batch','sync')", name="task_lane"),
    # Windows: distinct (provider, endpoint, model) by skip scan, then each
    # window's batch-lane tasks oldest first, counted index-only (migration 0013).
    Index(
        "tasks_queued_provider",
        "provider",
        "endpoint",
        "model",
        "lane",
        "not_before",
        "id",
        postgresql_where=text("state = 'queued'"),
    ),
    # A batch's tasks still in it, failed in it or dismissed: a succeeded task
    # is found through its result, so its entry does not outlive it (~110
    # bytes a settled task, migration 0012).
    Index(
        "tasks_batch_held",
        "batch_id",
        "id",
        postgresql_where=text("batch_id IS NOT NULL AND state <> 'succeeded'"),
    ),
    Index("tasks_client_custom_id", "client", "custom_id", unique=True),
    Index("tasks_failed", "finished_at", postgresql_where=text("state = 'failed'")),
    # A client's manual queue, paged by id.
    Index("tasks_failed_client", "client", "id", postgresql_where=text("state = 'failed'")),
    Index(
        "tasks_sync_queue",
        "not_before",
        "id",
        postgresql_where=text("state = 'queued' AND lane = 'sync'"),
    ),
    Index(
        "tasks_fallback",
        "fallback_at",
        postgresql_where=text("fallback_at IS NOT NULL AND state IN ('queued', 'submitted')"),
    ),
    Index("tasks_created", "created_at"),
    # The console's manual queue, newest first; the report's day of finished
    # tasks; retention walks finished tasks oldest first.
    Index("tasks_manual", "id", postgresql_where=text("state = 'failed'")),
    Index("tasks_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
    # A job's tasks in id order: its results stream and its cancel (migration 0009).
    Index("tasks_job", "client", "job", "id", postgresql_where=text("job IS NOT NULL")),
)

batches = Table(
    "batches",
    metadata,
    Column("id", Text, primary_key=True),  # ours: goes into file name and metadata
    Column("provider_batch_id", Text, unique=True),
    Column("provider", Text, nullable=False, server_default="openai"),
    Column("endpoint", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("state", Text, nullable=False, server_default="building"),
    Column("provider_status", Text),
    Column("flush_reason", Text, nullable=False),
    Column("item_count", Integer, nullable=False),
    Column("input_bytes", BigInteger, nullable=False),
    # What the batch holds for the provider's queued-token cap (estimated).
    Column("est_input_tokens", BigInteger, nullable=False, server_default="0"),
    # When its latest create call started: a provider batch without metadata
    # (Anthropic) is told apart by it (scheduler._find_remote).
    Column("create_started_at", DateTime(timezone=True)),
    Column("input_file_id", Text),
    Column("output_file_id", Text),
    Column("error_file_id", Text),
    Column("request_counts", JSONB),
    Column("usage", JSONB),
    Column("errors", JSONB),
    Column("token_limited", Boolean, nullable=False, server_default="false"),
    # The input file's custom_ids are batchd's per-attempt line ids
    # (domain.line_id); false for a batch built before them (migration
    # 0010), whose lines carry the caller's custom_id.
    Column("own_line_ids", Boolean, nullable=False, server_default="false"),
    # Spend ledger: reserved at submit from a high estimate, settled at routing.
    Column("spend_day", Date, nullable=False),
    Column("reserved_usd", MONEY, nullable=False, server_default="0"),
    Column("cost_usd", MONEY),
    Column("sync_cost_usd", MONEY),
    # Billed lines no task kept (a task that left for the sync lane, a
    # duplicate or unreadable line): part of cost_usd, in no result's cost.
    Column("unattributed_cost_usd", MONEY, nullable=False, server_default="0"),
    Column("unattributed_lines", Integer, nullable=False, server_default="0"),
    # Priced by the unknown-model rule (the table's most expensive entry).
    Column("unpriced", Boolean, nullable=False, server_default="false"),
    Column("submit_attempts", Integer, nullable=False, server_default="0"),
    Column("lease_owner", Text),
    Column("lease_until", DateTime(timezone=True)),
    Column("next_poll_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("submitted_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("routed_at", DateTime(timezone=True)),
    # Set when retention deleted some of its tasks' results: from then on its
    # cost no longer equals the results it kept (batchd check skips it).
    Column("pruned_at", DateTime(timezone=True)),
    CheckConstraint(
        "state IN ('building','uploading','submitted','completed','failed','expired',"
        "'cancelled','routed')",
        name="batch_state",
    ),
    Index("batches_live", "next_poll_at", postgresql_where=text("state <> 'routed'")),
    # Which row's create at a provider started last before a time (a batch
    # without metadata, scheduler._find_remote; migration 0013).
    Index(
        "batches_create_started",
        "provider",
        "create_started_at",
        postgresql_where=text("create_started_at IS NOT NULL"),
    ),
    Index("batches_spend_day", "spend_day"),
    Index("batches_routed", "routed_at", postgresql_where=text("state = 'routed'")),
)

results = Table(
    "results",
    metadata,
    # Completion order for GET /v1/results cursors.
    Column("seq", BigInteger, Identity(), primary_key=True),
    # The task (NULL only for a result whose task was gone before migration
    # 0010); client and custom_id are the caller's key, kept for reading (a
    # replica of the release before reads them from here while an upgrade
    # rolls out, so they stay written).
    Column("task_id", BigInteger),
    Column("client", Text, nullable=False),
    Column("custom_id", Text, nullable=False),
    Column("batch_id", Text, nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response", JSONB, nullable=False),
    Column("usage", JSONB),
    Column("cost_usd", MONEY, nullable=False, server_default="0"),
    Column("sync_cost_usd", MONEY, nullable=False, server_default="0"),
    Column("replay_count", Integer, nullable=False, server_default="0"),
    Column("unpriced", Boolean, nullable=False, server_default="false"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    # Settling a batch sums and rounds its results (migration 0006); without it
    # that is a scan of every result ever stored, once per batch.
    Index("results_batch", "batch_id"),
    # A day of the report reads that day's results only.
    Index("results_created", "created_at"),
    Index("results_task", "task_id", unique=True),
    # A client's results in completion order (GET /v1/results).
    Index("results_client", "client", "seq"),
)

task_events = Table(
    "task_events",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("task_id", BigInteger),  # NULL: an event of a task gone before migration 0011
    # The task's key, copied by rows stored before migration 0012 only:
    # readers join tasks by task_id.
    Column("client", Text),
    Column("custom_id", Text),
    Column("batch_id", Text),
    Column("attempt", Integer, nullable=False),
    # accepted | succeeded | retried | failed | requeued | replayed | fallback |
    # resubmitted | dismissed
    Column("outcome", Text, nullable=False),
    Column("error", JSONB),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("task_events_day", "created_at", "outcome"),
    Index("task_events_task", "task_id"),
    # The manual queue as of any day's end: each task's last failure, and the
    # last replay or dismissal that took it out again.
    Index(
        "task_events_left_manual_task",
        "task_id",
        "id",
        postgresql_where=text("outcome IN ('failed', 'replayed', 'dismissed')"),
    ),
)

# The callback outbox: one row per terminal state reached by a task with a
# callback_url, written in the transaction that makes the state terminal, so a
# crash between the two can never lose a delivery.
# Synchronous calls against the daily budget: reserved from a high estimate
# at the sync price when a call is claimed, settled to its cost after it.
sync_spend = Table(
    "sync_spend",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("claim_id", Text, nullable=False),
    Column("task_id", BigInteger),
    Column("custom_id", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("spend_day", Date, nullable=False),
    Column("reserved_usd", MONEY, nullable=False),
    Column("cost_usd", MONEY),  # NULL until settled: the reservation counts
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("settled_at", DateTime(timezone=True)),
    Index("sync_spend_day", "spend_day"),
    Index("sync_spend_claim_task", "claim_id", "task_id"),
    Index("sync_spend_settled", "settled_at"),
)

# Per-client spend for BATCHD_CLIENT_BUDGETS: a batch or sync claim reserves
# each client's share (reserved_usd); routing or the call's answer moves it
# to cost_usd (the client's results, exact). Counted = reserved + cost.
# Billed lines no task kept are in the day's spend but in no client's.
client_spend = Table(
    "client_spend",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("spend_day", Date, nullable=False),
    Column("client", Text, nullable=False),
    Column("batch_id", Text, nullable=False),  # a batch's id or a sync claim's
    Column("reserved_usd", MONEY, nullable=False, server_default="0"),
    Column("cost_usd", MONEY, nullable=False, server_default="0"),
    Index("client_spend_day", "spend_day", "client"),
    Index("client_spend_batch", "batch_id"),
)

callbacks = Table(
    "callbacks",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("task_id", BigInteger),
    Column("custom_id", Text),  # NULL for a job's callback
    Column("client", Text),
    Column("url", Text, nullable=False),
    # A job's callback: the job and its counts when it finished.
    Column("job", Text),
    Column("job_summary", JSONB),
    # The terminal state as it was reached (the task may be replayed later).
    Column("task_state", Text, nullable=False),
    Column("task_attempts", Integer, nullable=False),
    Column("task_error", JSONB),
    Column("finished_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("state", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # Due time while pending; a claim pushes it out by the delivery lease, so
    # a replica that dies mid-POST leaves the row due again, not lost.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("replay_count", Integer, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("delivered_at", DateTime(timezone=True)),
    CheckConstraint("state IN ('pending','delivered','failed')", name="callback_state"),
    Index("callbacks_due", "next_attempt_at", postgresql_where=text("state = 'pending'")),
    Index("callbacks_failed", "id", postgresql_where=text("state = 'failed'")),
    Index("callbacks_custom_id", "custom_id"),
    Index("callbacks_task", "task_id"),
)

callback_attempts = Table(
    "callback_attempts",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column(
        "callback_id", BigInteger, ForeignKey("callbacks.id", ondelete="CASCADE"), nullable=False
    ),
    Column("attempt", Integer, nullable=False),
    Column("status_code", Integer),  # NULL: no HTTP answer (refused, timeout, ...)
    Column("error", Text),
    Column("duration_seconds", Float, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("callback_attempts_callback", "callback_id", "id"),
)


# One row per operator action in the console (replay, dismiss, export): who,
# for which client, how many tasks were asked for and how many it changed.
console_actions = Table(
    "console_actions",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("actor", Text, nullable=False),
    Column("client", Text),
    Column("action", Text, nullable=False),
    Column("requested", Integer, nullable=False),
    Column("affected", Integer, nullable=False),
    Column("detail", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("console_actions_client", "client", "id"),
)

# One row per (client, job): its counters as of the last fold of job_deltas.
# Every statement that adds or moves a job's tasks writes one delta row per
# job it touched, in the same statement (store/jobs.py moved_deltas);
# batchd.jobs folds them in; a read adds the ones not folded yet.
jobs = Table(
    "jobs",
    metadata,
    Column("client", Text, primary_key=True),
    Column("job", Text, primary_key=True),
    *zeros(BigInteger, "tasks", "queued", "submitted", "succeeded", "failed", "cancelled"),
    *zeros(MONEY, "spend_usd", "sync_equivalent_usd"),
    Column("callback_url", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Column("finished_at", DateTime(timezone=True)),
    Column("cancelled_at", DateTime(timezone=True)),
    Index("jobs_newest", "client", "created_at", "job"),
    Index("jobs_open", "client", postgresql_where=text("finished_at IS NULL")),
)

job_deltas = Table(
    "job_deltas",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("client", Text, nullable=False),
    Column("job", Text, nullable=False),
    *zeros(BigInteger, "tasks", "queued", "submitted", "succeeded", "failed", "cancelled"),
    *zeros(MONEY, "spend_usd", "sync_usd"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=NOW),
    Index("job_deltas_job", "client", "job"),
)

# The daily report of each closed UTC day, stored once (migration 0010): the
# report of a day reads these rows, so it outlives the rows retention deletes.
# Client '' holds what belongs to no client (billed lines no task kept).
daily_rollups = Table(
    "daily_rollups",
    metadata,
    Column("day", Date, primary_key=True),
    Column("client", Text, primary_key=True),
    Column("provider", Text, primary_key=True),
    Column("model", Text, primary_key=True),
    Column("lane", Text, primary_key=True),
    *zeros(BigInteger, *ROLLUP_COUNTS),
    *zeros(MONEY, "spend_usd", "sync_usd", "unattributed_usd"),
    Column("unpriced", Boolean, nullable=False, server_default="false"),
    *zeros(BigInteger, "lane_succeeded", "lane_failed"),
    *zeros(MONEY, "lane_spend_usd"),
    # Ingest-to-finish seconds as a log histogram {bucket: count}, which adds
    # up across rows as percentiles do not (report.LATENCY_BUCKETS_PER_DOUBLING).
    Column("latency", JSONB, nullable=False, server_default="{}"),
)

rollup_days = Table(
    "rollup_days",
    metadata,
    Column("day", Date, primary_key=True),
    Column("rolled_at", DateTime(timezone=True), nullable=False, server_default=NOW),
)
