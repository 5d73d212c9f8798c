"""Retention (DESIGN 15): what a prune deletes and what it never touches, the
report of a pruned day, the manual queue's dismissal, and the ops commands."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import event, text

from batchd import metrics
from batchd.check import check_in
from batchd.report import Reporter
from batchd.retention import DUTY, Retention
from batchd.store import rollups
from batchd.store.engine import make_engine
from tests.harness import Harness, chat_task, running

ROOT = Path(__file__).resolve().parents[2]
OLD_DAYS = 40


def _cli(db_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd", *args],
        cwd=ROOT,
        env={**os.environ, "BATCHD_DATABASE_URL": db_url, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _age_everything(h: Harness, days: int) -> None:
    """Move every timestamp of the history so far ``days`` back, as if it had run then."""
    for table, columns in (
        ("tasks", ("created_at", "updated_at", "finished_at", "submitted_at", "not_before")),
        ("task_events", ("created_at",)),
        ("results", ("created_at", "updated_at")),
        ("batches", ("created_at", "submitted_at", "routed_at", "finished_at")),
        ("callbacks", ("created_at", "finished_at")),
        ("sync_spend", ("created_at", "settled_at")),
    ):
        sets = ", ".join(f"{c} = {c} - make_interval(days => {days})" for c in columns)
        await h.execute(f"UPDATE {table} SET {sets}")
    await h.execute(f"UPDATE batches SET spend_day = spend_day - {days}")
    await h.execute(f"UPDATE sync_spend SET spend_day = spend_day - {days}")


async def _old_history(h: Harness) -> None:
    """Forty days ago: five successes, one failure left in the manual queue, one
    failure dismissed, one success with a callback still to deliver, one success
    whose batch is (made) still live."""
    await h.post(
        {
            "tasks": [
                *(chat_task(f"ok{i}") for i in range(5)),
                chat_task("bad", emulate="http_400"),
                chat_task("gone", emulate="http_400"),
            ]
        }
    )
    await h.run_until_settled()
    status, body = await h.get("/v1/failed")
    assert status == 200 and len(body["failed"]) == 2
    async with h.http.post(
        f"{h.base_url}/v1/failed/dismiss", json={"custom_ids": ["gone", "ok0", "nope"]}
    ) as r:
        assert r.status == 200
        answer = await r.json()
    assert answer["dismissed"] == 1 and answer["custom_ids"] == ["gone"]
    assert {s["custom_id"]: s["reason"] for s in answer["skipped"]} == {
        "ok0": "already succeeded; its result is stored, replaying would pay twice",
        "nope": "unknown custom_id",
    }
    await h.post({"tasks": [chat_task("live-batch", model="gpt-4.1-nano")]})
    await h.run_until_settled()
    await h.post({"tasks": [chat_task("calling", model="gpt-4.1")]})
    await h.run_until_settled()
    await h.execute("""INSERT INTO callbacks (task_id, client, custom_id, url, task_state,
                                              task_attempts)
                       SELECT id, client, custom_id, 'http://127.0.0.1:9/x', 'succeeded', 1
                       FROM tasks WHERE custom_id = 'calling'""")
    await _age_everything(h, OLD_DAYS)


async def _make_live_again(h: Harness) -> None:
    """The live-batch task's batch is (made) still being routed: none of it may go."""
    await h.execute("""UPDATE batches SET state = 'submitted', next_poll_at = now() + '1 day'
                       WHERE id = (SELECT batch_id FROM tasks WHERE custom_id = 'live-batch')""")


async def test_prune_deletes_old_finished_history_and_nothing_else(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await _old_history(h)
        await h.post(
            {"tasks": [chat_task("fresh-ok"), chat_task("fresh-queued", model="gpt-4.1-mini")]}
        )
        await h.flush(drain=True)
        await h.make_polls_due()
        await h.service.poller.tick()
        await _make_live_again(h)
        old_day = (
            (h.service.clock().date())
            .fromordinal(h.service.clock().date().toordinal() - OLD_DAYS)
            .isoformat()
        )
        _, before = await h.get("/v1/report/daily", date=old_day)
        assert before["tasks_in"] == 9 and before["succeeded"] == 7

        doomed = [
            r["id"]
            for r in await h.rows(
                "SELECT id FROM tasks WHERE custom_id LIKE 'ok%' OR custom_id = 'gone'"
            )
        ]
        assert len(doomed) == 6
        plan = await h.service.retention.plan()
        # The dry run counts the 5 successes and the dismissed one (not bad,
        # not the live batch's task, not the one with a callback to deliver).
        assert plan.due["tasks"] == 6
        pruned_before = metrics.ROWS_PRUNED.labels(table="tasks")._value.get()
        pruned = await h.service.retention.prune()

        assert pruned.rows["tasks"] == 6
        assert pruned.rows["results"] == 5
        assert metrics.ROWS_PRUNED.labels(table="tasks")._value.get() == pruned_before + 6
        left = {
            r["custom_id"]: r["state"] for r in await h.rows("SELECT custom_id, state FROM tasks")
        }
        assert left == {
            "bad": "failed",
            "live-batch": "succeeded",
            "calling": "succeeded",
            "fresh-ok": "succeeded",
            "fresh-queued": "submitted",
        } or set(left) == {"bad", "live-batch", "calling", "fresh-ok", "fresh-queued"}
        # Nothing of the pruned tasks is left anywhere; the kept ones keep everything.
        for table in ("results", "task_events", "callbacks"):
            gone = await h.count(f"task_id = ANY(ARRAY{doomed}::bigint[])", table)
            assert gone == 0, table
        assert (
            await h.count(
                "task_id = (SELECT id FROM tasks WHERE custom_id = 'live-batch')", "results"
            )
            == 1
        )
        assert (
            await h.count("task_id = (SELECT id FROM tasks WHERE custom_id = 'bad')", "task_events")
            >= 1
        )
        # The failed task's batch stays (it is referenced); so does the live one.
        assert (
            await h.count("id = (SELECT batch_id FROM tasks WHERE custom_id = 'bad')", "batches")
            == 1
        )
        assert await h.count("state = 'submitted'", "batches") >= 1
        # The old day's report is what it was, from its rollup.
        _, after = await h.get("/v1/report/daily", date=old_day)
        assert after == before
        # A second pass finds nothing more; the manual queue still replays.
        assert (await h.service.retention.prune()).total == 0
        async with h.http.post(f"{h.base_url}/v1/failed/replay", json={"custom_ids": ["bad"]}) as r:
            assert (await r.json())["replayed"] == 1

    done = _cli(db_url, "check", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {"ok": True, "breaches": []}


async def test_the_report_of_a_pruned_day_and_the_manual_queue_add_up_over_days(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        await _old_history(h)
        await _make_live_again(h)
        end = h.service.clock().date()
        _, before = await h.get("/v1/report/daily", date=end.isoformat(), days=str(OLD_DAYS + 1))
        await h.service.retention.prune()
        _, after = await h.get("/v1/report/daily", date=end.isoformat(), days=str(OLD_DAYS + 1))
        assert after == before
        # bad is still in the manual queue every day since; gone left it.
        assert [d["manual_queue"] for d in after] == [1] * len(after)
        assert sum(d["tasks_in"] for d in after) == 9
        stored = await h.scalar("SELECT count(*) FROM rollup_days")
        assert stored == OLD_DAYS  # every closed day since the first, once


async def test_dismiss_is_validated_and_needs_a_token(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, ingest_tokens="ops=s3cret-token-0123456789") as h:
        async with h.http.post(f"{h.base_url}/v1/failed/dismiss", json={"all": True}) as r:
            assert r.status == 401
        auth = {"Authorization": "Bearer s3cret-token-0123456789"}
        for bad in (
            {},
            {"all": False},
            {"custom_ids": "x"},
            {"custom_ids": None},
            {"custom_ids": ["a"], "extra": 1},
            [1],
        ):
            async with h.http.post(f"{h.base_url}/v1/failed/dismiss", json=bad, headers=auth) as r:
                assert r.status == 400, bad
                assert (await r.json())["error"]["code"] == "invalid_request"
        async with h.http.post(f"{h.base_url}/v1/failed/dismiss", data=b"{", headers=auth) as r:
            assert r.status == 400


BREACHES: list[tuple[str, str]] = [
    (
        "task_in_two_live_batches",
        "UPDATE tasks SET state = 'submitted', batch_id = 'bd_gone' WHERE custom_id = 'stray'",
    ),
    (
        "ledger_not_results",
        "UPDATE batches SET cost_usd = cost_usd + 1 WHERE id = "
        "(SELECT batch_id FROM tasks WHERE custom_id = 'ok1')",
    ),
    (
        "result_without_success",
        "INSERT INTO results (task_id, client, custom_id, batch_id, "
        "status_code, response) SELECT id, client, custom_id, 'bd_x', "
        "200, '{}' FROM tasks WHERE custom_id = 'stray'",
    ),
    ("success_without_result", "UPDATE tasks SET state = 'succeeded' WHERE custom_id = 'stray'"),
    (
        "success_stored_twice",
        "INSERT INTO task_events (task_id, client, custom_id, attempt, "
        "outcome) SELECT id, client, custom_id, 1, 'succeeded' FROM tasks "
        "WHERE custom_id = 'ok4'",
    ),
    (
        "orphan_event",
        "INSERT INTO task_events (task_id, client, custom_id, attempt, outcome) "
        "VALUES (-1, 'local', 'never-stored', 1, 'retried')",
    ),
    (
        "orphan_callback",
        "INSERT INTO callbacks (task_id, client, custom_id, url, task_state, "
        "task_attempts) VALUES (-1, 'local', 'never-stored', 'http://x/', "
        "'succeeded', 1)",
    ),
    (
        "rollup_gap",
        "INSERT INTO rollup_days (day) VALUES (current_date - 100), (current_date - 98)",
    ),
    (
        "rollup_without_day",
        "INSERT INTO daily_rollups (day, client, provider, model, lane) "
        "VALUES (current_date - 300, 'local', 'openai', 'm', 'batch')",
    ),
    (
        "daily_counters",
        "UPDATE daily_rollups SET succeeded = succeeded + 1 WHERE day = "
        "(SELECT max(day) FROM daily_rollups)",
    ),
]


async def test_check_names_each_kind_of_breach(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task(f"ok{i}") for i in range(6)]})
        await h.run_until_settled()
        await _age_everything(h, 2)  # two closed days: stored, then recounted
        await h.service.reporter.roll_up()
        assert await h.scalar("SELECT count(*) FROM daily_rollups") >= 1
        await h.post(chat_task("stray"))  # today, queued
        clean = _cli(db_url, "check")
        assert clean.returncode == 0 and "all invariants hold" in clean.stdout, clean.stdout
        for code, how in BREACHES:
            # Each breach alone, inside a transaction rolled back after the check.
            async with h.engine.connect() as conn:
                tx = await conn.begin()
                await conn.execute(text(how))
                found = await check_in(conn, retention_days=30)
                await tx.rollback()
            assert [b.code for b in found] == [code], (code, [b.line() for b in found])
        # The command: exit 1 naming it, in text and in JSON.
        await h.execute(BREACHES[3][1])
    broken = _cli(db_url, "check")
    assert broken.returncode == 1
    assert (
        broken.stdout.startswith("success_without_result: 1 breach(es)")
        and "stray" in broken.stdout
    )
    as_json = json.loads(_cli(db_url, "check", "--json").stdout)
    assert as_json["ok"] is False
    assert [(b["code"], b["examples"]) for b in as_json["breaches"]] == [
        ("success_without_result", ["local/stray"])
    ]


def test_stats_shows_sizes_states_and_bytes_a_task(db_url: str) -> None:
    done = _cli(db_url, "stats", "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["tasks"] == 0 and stats["bytes_per_task"] is None
    assert {t["name"] for t in stats["tables"]} >= {"tasks", "results", "daily_rollups"}
    text_out = _cli(db_url, "stats").stdout
    assert text_out.startswith("database: ") and "tasks by state: none" in text_out


async def test_a_report_of_far_future_days_reads_nothing_live(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        await h.post(chat_task("one"))
        status, days = await h.get("/v1/report/daily", date="9426-07-12", days="3")
        assert status == 200
        assert [d["tasks_in"] for d in days] == [0, 0, 0]
        assert await h.scalar("SELECT count(*) FROM rollup_days") == 0


async def test_a_roll_up_counts_a_day_without_parallel_workers(db_url: str) -> None:
    """Rolling up is background work: its day queries may not take every core
    (two parallel workers on a day of 1,666,666 tasks starved ingest)."""
    engine = make_engine(db_url)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("""
                INSERT INTO tasks (custom_id, endpoint, model, body, body_digest, line_bytes,
                                   created_at)
                VALUES ('two-days-ago', '/v1/chat/completions', 'gpt-4o-mini', '{}', 'd', 10,
                        now() - interval '2 days')""")
            )
        stored = await Reporter(engine, 0.03).roll_up()
        assert stored, "a closed day with a task was rolled up"
        first_count = next(i for i, s in enumerate(statements) if "count(*) AS tasks_in" in s)
        assert any("max_parallel_workers_per_gather = 0" in s for s in statements[:first_count]), (
            statements[:first_count]
        )
        async with engine.begin() as conn:
            await rollups.on_one_core(conn)
            assert (
                await conn.execute(text("SHOW max_parallel_workers_per_gather"))
            ).scalar_one() == "0"
        async with engine.connect() as conn:  # only for that transaction
            assert (
                await conn.execute(text("SHOW max_parallel_workers_per_gather"))
            ).scalar_one() != "0"
    finally:
        await engine.dispose()


async def test_a_prune_step_earns_a_rest_three_times_as_long(db_url: str, tmp_path: Path) -> None:
    """Retention deletes for at most 1/DUTY of the time: flat out, its WAL
    outran the disk's syncs and ingest's commits waited (the prune row)."""
    async with running(db_url, tmp_path) as h:
        await h.post({"tasks": [chat_task("old0"), chat_task("old1")]})
        await h.run_until_settled()
        await _age_everything(h, OLD_DAYS)
    engine = make_engine(db_url)
    holder = await asyncpg.connect(db_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        r = Retention(engine, Reporter(engine, 0.03), days=30, batch_rows=2000, interval=300)
        await r.reporter.roll_up()
        cutoff = await r.cutoff()
        assert cutoff is not None
        # The step marks the tasks' batch as pruned: holding that row makes
        # the step last at least HOLD seconds.
        hold = 0.6
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM batches FOR UPDATE")

        async def release() -> None:
            await asyncio.sleep(hold)
            await tx.rollback()

        releasing = asyncio.create_task(release())
        pruned = await r.step(cutoff)
        await releasing
        assert pruned.rows["tasks"] == 2
        assert r.rest_seconds >= hold * (DUTY - 1), r.rest_seconds
    finally:
        await holder.close()
        await engine.dispose()
