"""Prometheus metrics (DESIGN section 9). Base units, no per-task labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)

# Batch sizes run from one task to the provider's 50,000-line cap.
_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000)
_BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 29, 2))  # 1 KiB .. 256 MiB
# Provider turnaround and task latency reach the 24 h completion window.
_TIME_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 7200, 14_400, 28_800, 43_200, 86_400, 172_800)

# ``client`` takes configured client names, "anonymous" and "other" only
# (batchd.clients), so its cardinality is bounded by the configuration.
# ``lane`` is "batch" or "sync": where the task was placed at ingest, and
# where the attempt, spend, tokens and latency happened.
TASKS_RECEIVED = Counter(
    "batchd_tasks_received", "Tasks accepted by ingest", ["client", "lane"], registry=REGISTRY
)
TASKS_COMPLETED = Counter(
    "batchd_tasks_completed", "Task attempt outcomes", ["outcome", "client", "lane"],
    registry=REGISTRY,
)
QUEUE_TASKS = Gauge("batchd_queue_tasks", "Tasks by state", ["state"], registry=REGISTRY)
QUEUE_OLDEST = Gauge(
    "batchd_queue_oldest_task_created_timestamp_seconds",
    # A retried task counts from when its backoff ended, as the scheduler
    # ages windows, so one retry does not look like a stuck queue.
    "When the oldest queued task became eligible for a window (0 when none)",
    registry=REGISTRY,
)
FLUSHES = Counter("batchd_flushes", "Windows flushed into batches", ["reason"], registry=REGISTRY)
BATCH_TASKS = Histogram(
    "batchd_batch_tasks", "Tasks per submitted batch", buckets=_SIZE_BUCKETS, registry=REGISTRY
)
BATCH_INPUT_BYTES = Histogram(
    "batchd_batch_input_bytes", "Input file size per batch", buckets=_BYTES_BUCKETS,
    registry=REGISTRY,
)
BATCHES_IN_FLIGHT = Gauge(
    "batchd_batches_in_flight", "Batches not yet routed", registry=REGISTRY
)
BATCH_OLDEST_IN_FLIGHT = Gauge(
    "batchd_batch_oldest_in_flight_submitted_timestamp_seconds",
    "Submission time of the oldest live batch (0 when none)", registry=REGISTRY,
)
BATCHES_FINISHED = Counter(
    "batchd_batches_finished", "Batches routed, by provider status", ["status"],
    registry=REGISTRY,
)
BATCH_TURNAROUND = Histogram(
    "batchd_batch_turnaround_seconds", "Submission to terminal status", buckets=_TIME_BUCKETS,
    registry=REGISTRY,
)
TASK_LATENCY = Histogram(
    "batchd_task_latency_seconds", "Ingest to stored result", ["lane"], buckets=_TIME_BUCKETS,
    registry=REGISTRY,
)
PROVIDER_REQUESTS = Counter(
    "batchd_provider_requests", "Provider API calls", ["operation", "code"], registry=REGISTRY
)
TOKENS = Counter("batchd_tokens", "Tokens used", ["model", "kind", "lane"], registry=REGISTRY)
SPEND = Counter(
    "batchd_spend_dollars", "Spend: batch price in the batch lane, sync price in the sync lane",
    ["model", "lane"], registry=REGISTRY,
)
SAVINGS = Counter(
    "batchd_savings_dollars", "Synchronous price minus what was paid (0 in the sync lane)",
    ["model", "lane"], registry=REGISTRY,
)
# Priced by the unknown-model rule (the table's most expensive entry), never
# as zero; the report's unpriced_models names the models.
UNPRICED_RESULTS = Counter(
    "batchd_unpriced_results", "Results priced by the unknown-model rule", ["lane"],
    registry=REGISTRY,
)
UNPRICED_ESTIMATES = Counter(
    "batchd_unpriced_estimates", "Budget reservations priced by the unknown-model rule",
    registry=REGISTRY,
)
BUDGET_LIMIT = Gauge(
    "batchd_budget_limit_dollars", "Daily budget (0 when unset)", registry=REGISTRY
)
BUDGET_SPENT = Gauge(
    "batchd_budget_spent_dollars", "Spent and reserved today (UTC)", registry=REGISTRY
)
POLLER_LAST_SUCCESS = Gauge(
    "batchd_poller_last_success_timestamp_seconds", "Last poller tick that finished",
    registry=REGISTRY,
)
CONFIG_WINDOW = Gauge(
    "batchd_config_window_seconds", "BATCHD_WINDOW_SECONDS", registry=REGISTRY
)
CONFIG_MAX_TASKS = Gauge(
    "batchd_config_max_batch_tasks", "BATCHD_MAX_BATCH_ITEMS", registry=REGISTRY
)
CALLBACK_DELIVERIES = Counter(
    "batchd_callback_deliveries", "Callback POST attempts: delivered, retried later, failed for "
    "good", ["outcome", "client"], registry=REGISTRY,
)
CALLBACK_SECONDS = Histogram(
    "batchd_callback_delivery_seconds", "Duration of one callback POST attempt",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY,
)
CALLBACKS_PENDING = Gauge(
    "batchd_callbacks_pending", "Callback deliveries waiting for a (re)try", registry=REGISTRY
)
CALLBACKS_FAILED = Gauge(
    "batchd_callbacks_failed", "Callback deliveries that used up their attempts (replayable)",
    registry=REGISTRY,
)
HTTP_CONNECTIONS_REFUSED = Counter(
    "batchd_http_connections_refused", "API connections closed at once because "
    "BATCHD_HTTP_MAX_CONNECTIONS were open", registry=REGISTRY,
)
WAITERS = Gauge(
    "batchd_waiters", "POST /v1/tasks?wait requests waiting for their tasks", registry=REGISTRY
)
BUILD_INFO = Info("batchd_build", "batchd version", registry=REGISTRY)
