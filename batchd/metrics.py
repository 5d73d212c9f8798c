"""Prometheus metrics (DESIGN section 9). Base units, no per-task labels."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from decimal import Decimal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import CounterMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)


class MoneyCounter:
    """A dollar counter kept exact, rounded only where it is shown.

    A Prometheus counter is a float that is incremented, so it cannot hold
    "the exact sum, rounded once": adding each batch's rounded cost would
    carry every rounding into the total (the report's old error), and adding
    floats of exact costs would carry a float error per add. So the total is
    kept here as an exact Decimal per label set (each add is an exact amount,
    prices.py) and converted to a float once, at scrape time. That float is
    the exact total to about 16 significant digits, so rounded to 1e-6 where
    a dashboard shows it, it is the exact total rounded once (for any total
    below a billion dollars, unless that total lies within 1e-10 of a
    half-micro-dollar).

    A counter must never go down, and a savings total can (a batch whose
    billed lines no task kept cost more than its results saved): the series
    then holds its highest value until the exact total passes it again.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: list[str], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._exact: dict[tuple[str, ...], Decimal] = {}
        self._shown: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def add(self, amount: Decimal, **labels: str) -> None:
        key = tuple(labels[n] for n in self._labelnames)
        with self._lock:
            self._exact[key] = self._exact.get(key, Decimal(0)) + amount

    def exact(self, **labels: str) -> Decimal:
        """The exact total of a label set (0 when it has none)."""
        key = tuple(labels[n] for n in self._labelnames)
        with self._lock:
            return self._exact.get(key, Decimal(0))

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        with self._lock:
            for key, total in sorted(self._exact.items()):
                shown = max(self._shown.get(key, 0.0), float(total))
                self._shown[key] = shown
                family.add_metric(list(key), shown)
        yield family


# Batch sizes run from one task to the provider's 50,000-line cap.
_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000)
_BYTES_BUCKETS = tuple(float(2**k) for k in range(10, 29, 2))  # 1 KiB .. 256 MiB
# Provider turnaround and task latency reach the 24 h completion window.
_TIME_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 7200, 14_400, 28_800, 43_200, 86_400, 172_800)

# ``client`` takes configured client names, "local" and "other" only
# (batchd.clients), so its cardinality is bounded by the configuration.
# ``lane`` is "batch" or "sync": where the task was placed at ingest, and
# where the attempt, spend, tokens and latency happened.
TASKS_RECEIVED = Counter(
    "batchd_tasks_received", "Tasks accepted by ingest", ["client", "lane"], registry=REGISTRY
)
TASKS_COMPLETED = Counter(
    "batchd_tasks_completed",
    "Task attempt outcomes",
    ["outcome", "client", "lane"],
    registry=REGISTRY,
)
QUEUE_TASKS = Gauge("batchd_queue_tasks", "Tasks by state", ["state"], registry=REGISTRY)
CLIENT_QUEUE_TASKS = Gauge(
    "batchd_client_queued_tasks",
    "Queued tasks by client (BATCHD_CLIENT_MAX_QUEUED counts these)",
    ["client"],
    registry=REGISTRY,
)
CLIENT_SPEND = MoneyCounter(
    "batchd_client_spend_dollars",
    "Spend carried by each client's stored results",
    ["client", "lane"],
    registry=REGISTRY,
)
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
    "batchd_batch_input_bytes",
    "Input file size per batch",
    buckets=_BYTES_BUCKETS,
    registry=REGISTRY,
)
BATCHES_IN_FLIGHT = Gauge("batchd_batches_in_flight", "Batches not yet routed", registry=REGISTRY)
BATCH_OLDEST_IN_FLIGHT = Gauge(
    "batchd_batch_oldest_in_flight_submitted_timestamp_seconds",
    "Submission time of the oldest live batch (0 when none)",
    registry=REGISTRY,
)
BATCHES_FINISHED = Counter(
    "batchd_batches_finished",
    "Batches routed, by provider and status",
    ["provider", "status"],
    registry=REGISTRY,
)
BATCH_TURNAROUND = Histogram(
    "batchd_batch_turnaround_seconds",
    "Submission to terminal status",
    buckets=_TIME_BUCKETS,
    registry=REGISTRY,
)
TASK_LATENCY = Histogram(
    "batchd_task_latency_seconds",
    "Ingest to stored result",
    ["lane"],
    buckets=_TIME_BUCKETS,
    registry=REGISTRY,
)
PROVIDER_REQUESTS = Counter(
    "batchd_provider_requests", "Provider API calls", ["operation", "code"], registry=REGISTRY
)
TOKENS = Counter(
    "batchd_tokens", "Tokens used", ["provider", "model", "kind", "lane"], registry=REGISTRY
)
SPEND = MoneyCounter(
    "batchd_spend_dollars",
    "Spend: batch price in the batch lane, sync price in the sync lane",
    ["provider", "model", "lane"],
    registry=REGISTRY,
)
SAVINGS = MoneyCounter(
    "batchd_savings_dollars",
    "Synchronous price minus what was paid (0 in the sync lane)",
    ["provider", "model", "lane"],
    registry=REGISTRY,
)
LANES = ("batch", "sync")
TOKEN_KINDS = ("input", "cached_input", "output")


def start_model_series(models: list[tuple[str, str]]) -> None:
    """Every priced model's spend, savings and token series at 0 from the
    start, at the provider it routes to (``(provider, model)`` pairs), so a
    dashboard or rate() shows 0 before the first spend rather than nothing."""
    for provider, model in models:
        for lane in LANES:
            SPEND.add(Decimal(0), provider=provider, model=model, lane=lane)
            SAVINGS.add(Decimal(0), provider=provider, model=model, lane=lane)
            for kind in TOKEN_KINDS:
                TOKENS.labels(provider=provider, model=model, kind=kind, lane=lane)


# Priced by the unknown-model rule (the table's most expensive entry), never
# as zero; the report's unpriced_models names the models.
UNPRICED_RESULTS = Counter(
    "batchd_unpriced_results",
    "Results priced by the unknown-model rule",
    ["lane"],
    registry=REGISTRY,
)
UNPRICED_ESTIMATES = Counter(
    "batchd_unpriced_estimates",
    "Budget reservations priced by the unknown-model rule",
    registry=REGISTRY,
)
BUDGET_LIMIT = Gauge(
    "batchd_budget_limit_dollars", "Daily budget (0 when unset)", registry=REGISTRY
)
BUDGET_SPENT = Gauge(
    "batchd_budget_spent_dollars", "Spent and reserved today (UTC)", registry=REGISTRY
)
# Per-client caps (BATCHD_CLIENT_BUDGETS): ``client`` takes only the names
# configured there, so its cardinality is bounded by the configuration.
CLIENT_BUDGET_LIMIT = Gauge(
    "batchd_client_budget_limit_dollars",
    "A client's own daily budget (BATCHD_CLIENT_BUDGETS)",
    ["client"],
    registry=REGISTRY,
)
CLIENT_BUDGET_SPENT = Gauge(
    "batchd_client_budget_spent_dollars",
    "A capped client's spend and reservations today (UTC), batches and sync calls",
    ["client"],
    registry=REGISTRY,
)
POLLER_LAST_SUCCESS = Gauge(
    "batchd_poller_last_success_timestamp_seconds",
    "Last poller tick that finished",
    registry=REGISTRY,
)
CONFIG_WINDOW = Gauge("batchd_config_window_seconds", "BATCHD_WINDOW_SECONDS", registry=REGISTRY)
CONFIG_MAX_TASKS = Gauge(
    "batchd_config_max_batch_tasks", "BATCHD_MAX_BATCH_ITEMS", registry=REGISTRY
)
CALLBACK_DELIVERIES = Counter(
    "batchd_callback_deliveries",
    "Callback POST attempts: delivered, retried later, failed for good",
    ["outcome", "client"],
    registry=REGISTRY,
)
CALLBACK_SECONDS = Histogram(
    "batchd_callback_delivery_seconds",
    "Duration of one callback POST attempt",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
CALLBACKS_PENDING = Gauge(
    "batchd_callbacks_pending", "Callback deliveries waiting for a (re)try", registry=REGISTRY
)
CALLBACKS_FAILED = Gauge(
    "batchd_callbacks_failed",
    "Callback deliveries that used up their attempts (replayable)",
    registry=REGISTRY,
)
HTTP_CONNECTIONS_REFUSED = Counter(
    "batchd_http_connections_refused",
    "API connections closed at once because BATCHD_HTTP_MAX_CONNECTIONS were open",
    registry=REGISTRY,
)
WAITERS = Gauge(
    "batchd_waiters", "POST /v1/tasks?wait requests waiting for their tasks", registry=REGISTRY
)
JOBS_OPEN = Gauge("batchd_jobs_open", "Jobs with a task queued or submitted", registry=REGISTRY)
TASKS_CANCELLED = Counter(
    "batchd_tasks_cancelled",
    "Queued tasks cancelled with their job (never sent)",
    ["client"],
    registry=REGISTRY,
)
# A year of operation (DESIGN 15): what the database holds and what retention
# took out of it; the alerts compare growth against the retention window.
DATABASE_BYTES = Gauge(
    "batchd_database_size_bytes",
    "Size of batchd's PostgreSQL database (pg_database_size)",
    registry=REGISTRY,
)
ROWS_PRUNED = Counter(
    "batchd_rows_pruned", "Rows deleted by retention", ["table"], registry=REGISTRY
)
RETENTION_OLDEST = Gauge(
    "batchd_retention_oldest_finished_timestamp_seconds",
    "Finish time of the oldest task retention may delete (0 when none)",
    registry=REGISTRY,
)
CONFIG_RETENTION_DAYS = Gauge(
    "batchd_config_retention_days", "BATCHD_RETENTION_DAYS", registry=REGISTRY
)
BUILD_INFO = Info("batchd_build", "batchd version", registry=REGISTRY)
