"""Operability: /metrics against the database, health endpoints, log redaction."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr
from pathlib import Path

import structlog
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from batchd import logs, metrics
from batchd.store.engine import make_engine
from tests.harness import chat_task, running

DESIGN_METRICS = {
    "batchd_tasks_received",
    "batchd_tasks_completed",
    "batchd_queue_tasks",
    "batchd_queue_oldest_task_created_timestamp_seconds",
    "batchd_flushes",
    "batchd_batch_tasks",
    "batchd_batch_input_bytes",
    "batchd_batches_in_flight",
    "batchd_batches_finished",
    "batchd_batch_turnaround_seconds",
    "batchd_task_latency_seconds",
    "batchd_provider_requests",
    "batchd_tokens",
    "batchd_spend_dollars",
    "batchd_savings_dollars",
    "batchd_budget_limit_dollars",
    "batchd_budget_spent_dollars",
    "batchd_poller_last_success_timestamp_seconds",
    "batchd_config_window_seconds",
    "batchd_config_max_batch_tasks",
    "batchd_build_info",
}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _scrape(h: object) -> tuple[str, str]:
    async with h.http.get(f"{h.base_url}/metrics") as r:  # type: ignore[attr-defined]
        return r.headers["Content-Type"], await r.text()


async def test_scrape_shows_every_design_metric_matching_the_database(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, daily_budget_usd="5", max_batch_items=4) as h:
        _, before_text = await _scrape(h)
        before = _samples(before_text)
        await h.post(
            {
                "tasks": [chat_task(f"m{i}") for i in range(6)]
                + [chat_task("m-bad", emulate="http_400")]
            }
        )
        await h.flush()  # one full window of 4 goes out at the cap
        await h.service.snapshot()
        content_type, text = await _scrape(h)
        assert content_type.startswith("text/plain; version=0.0.4")
        names = {f.name for f in text_string_to_metric_families(text)}
        assert DESIGN_METRICS <= names
        now = _samples(text)
        queued = await h.count("state = 'queued'")
        assert now[("batchd_queue_tasks", (("state", "queued"),))] == queued == 3
        assert now[("batchd_queue_tasks", (("state", "submitted"),))] == 4
        assert now[("batchd_batches_in_flight", ())] == await h.live_batches() == 1
        oldest = await h.scalar(
            "SELECT extract(epoch FROM min(not_before)) FROM tasks WHERE state = 'queued'"
        )
        assert (
            abs(now[("batchd_queue_oldest_task_created_timestamp_seconds", ())] - float(oldest))
            < 1e-3
        )
        assert now[("batchd_budget_limit_dollars", ())] == 5.0
        reserved = await h.scalar("SELECT sum(reserved_usd) FROM batches")
        assert abs(now[("batchd_budget_spent_dollars", ())] - float(reserved)) < 1e-9
        assert now[("batchd_config_max_batch_tasks", ())] == 4
        received = ("batchd_tasks_received_total", (("client", "local"), ("lane", "batch")))
        assert now[received] - before.get(received, 0) == 7

        await h.run_until_settled()
        await h.service.snapshot()
        after = _samples((await _scrape(h))[1])
        succeeded = (
            "batchd_tasks_completed_total",
            (("client", "local"), ("lane", "batch"), ("outcome", "succeeded")),
        )
        failed = (
            "batchd_tasks_completed_total",
            (("client", "local"), ("lane", "batch"), ("outcome", "failed")),
        )
        assert after[succeeded] - before.get(succeeded, 0) == 6
        assert after[failed] - before.get(failed, 0) == 1
        spend = (
            "batchd_spend_dollars_total",
            (("lane", "batch"), ("model", "gpt-4o-mini"), ("provider", "openai")),
        )
        cost = await h.scalar("SELECT sum(cost_usd) FROM results")
        assert abs(after[spend] - before.get(spend, 0) - float(cost)) < 1e-9
        assert after[("batchd_queue_tasks", (("state", "failed"),))] == 1
        assert after[("batchd_batches_in_flight", ())] == 0
        assert after[("batchd_poller_last_success_timestamp_seconds", ())] > 0


async def test_health_endpoints(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        assert (await h.get("/healthz"))[0] == 200
        status, body = await h.get("/readyz")
        assert status == 200 and body["status"] == "ready"
        await h.execute("UPDATE alembic_version SET version_num = 'from-the-future'")
        assert (await h.get("/readyz"))[0] == 200  # a newer schema (rolling upgrade) is fine
        await h.execute("DELETE FROM alembic_version")
        status, body = await h.get("/readyz")
        assert status == 503 and body["error"]["code"] == "schema_outdated"
        await h.engine.dispose()
        await h.execute("DROP TABLE alembic_version")
        assert (await h.get("/readyz"))[0] == 503
        assert (await h.get("/healthz"))[0] == 200


def test_logs_never_show_bodies_or_secrets() -> None:
    buf = io.StringIO()
    with redirect_stderr(buf):
        logs.configure("info", "json")
        structlog.get_logger("t").info(
            "provider.call",
            body={"messages": "private"},
            api_key="sk-abcdefghijklmnop",
            detail="Bearer abc.def failed",
            url="postgresql://u:pw@db/x",
            batch_id="bd_1",
        )
    structlog.reset_defaults()
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert line["event"] == "provider.call" and line["batch_id"] == "bd_1"
    assert line["body"] == "[redacted]" and line["api_key"] == "[redacted]"
    assert "abc.def" not in line["detail"] and "pw" not in line["url"]
    assert "private" not in buf.getvalue() and "sk-abcdefghijklmnop" not in buf.getvalue()


def test_nested_context_is_redacted_too() -> None:
    buf = io.StringIO()
    with redirect_stderr(buf):
        logs.configure("info", "json")
        structlog.get_logger("t").info(
            "router.line",
            line={"custom_id": "c1", "response": {"body": "private answer"}},
            errors=[{"message": "Bearer tok-123 refused", "input": "private prompt"}],
        )
    structlog.reset_defaults()
    out = buf.getvalue()
    assert '"custom_id": "c1"' in out.replace('":"', '": "')
    assert "private" not in out and "tok-123" not in out


async def test_database_errors_in_logs_carry_no_task_body(db_url: str) -> None:
    engine = make_engine(db_url)
    buf = io.StringIO()
    try:
        with redirect_stderr(buf):
            logs.configure("info", "json")
            try:
                async with engine.begin() as conn:
                    await conn.execute(
                        text("INSERT INTO results (custom_id) VALUES (:cid)"),
                        {"cid": "secret-body-text"},
                    )
            except Exception:
                structlog.get_logger("t").exception("router.tick_failed")
    finally:
        structlog.reset_defaults()
        await engine.dispose()
    out = buf.getvalue()
    assert "router.tick_failed" in out and "IntegrityError" in out
    assert "secret-body-text" not in out


def test_console_format_is_readable() -> None:
    buf = io.StringIO()
    with redirect_stderr(buf):
        logs.configure("info", "console")
        structlog.get_logger("t").info("batch.flushed", tasks=3)
    structlog.reset_defaults()
    out = buf.getvalue()
    assert "batch.flushed" in out and "tasks=3" in out and not out.lstrip().startswith("{")


async def test_poller_heartbeat_stops_while_every_check_fails(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("p1"))
        await h.age_queue(901)
        assert await h.flush() == 1
        metrics.POLLER_LAST_SUCCESS.set(0)
        h.emulator.inject("retrieve", "http_500", should_retry=False)
        await h.make_polls_due()
        await h.service.poller.tick()
        assert metrics.POLLER_LAST_SUCCESS._value.get() == 0
        await h.execute("UPDATE batches SET lease_until = NULL, next_poll_at = now()")
        await h.service.poller.tick()
        assert metrics.POLLER_LAST_SUCCESS._value.get() > 0
