"""The first hour: a wrong key, where a task is, an unmigrated database."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from alembic import command
from prometheus_client.parser import text_string_to_metric_families

from batchd import metrics
from batchd.emulator.openai import Emulator
from batchd.health import HEALTH
from batchd.prices import PriceTable
from batchd.service import alembic_config
from batchd.store.engine import async_url
from tests.conftest import _admin, _with_db
from tests.harness import FakeClock, chat_task, running


def _refused(operation: str, code: str = "401") -> float:
    value = metrics.REGISTRY.get_sample_value(
        "batchd_provider_requests_total", {"operation": operation, "code": code}
    )
    return float(value or 0)


async def test_a_refused_key_spends_no_attempt_and_shows_on_readyz(
    db_url: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    emu = Emulator(api_key="the-right-key")  # the harness's adapter sends test-key
    HEALTH.reset()
    async with running(db_url, tmp_path, emulator=emu, clock=clock) as h:
        assert _refused("upload_file") == _refused("upload_file", "403") >= 0  # series exist
        before = _refused("upload_file")
        assert (await h.post(chat_task("k-1")))[0] == 202
        assert (await h.post(chat_task("k-2", lane="sync")))[0] == 202
        await h.age_queue(3600)
        await h.flush()
        await h.service.sync_lane.tick()
        await h.service.sync_lane.wait_calls()

        assert _refused("upload_file") == before + 1
        for cid in ("k-1", "k-2"):
            task = await h.task(cid)
            assert (task["state"], task["attempts"]) == ("queued", 0), task
            assert task["location"]["stage"] == "queued"
            assert task["last_error"]["code"] in (
                "invalid_api_key",
                "provider_credentials_rejected",
            )
        status, ready = await h.get("/readyz")
        assert status == 200 and ready["status"] == "degraded", ready
        refusal = ready["provider"]["openai"]
        assert refusal["status"] == 401 and "key" in refusal["fix"]
        assert await h.count("provider_status = 'not_submitted'", "batches") == 1

        # Backing off: the next ticks send nothing.
        uploads = emu.calls["upload_file"]
        await h.flush()
        assert await h.count("true", "batches") == 1
        assert emu.calls["upload_file"] == uploads

        # The key is fixed: once the backoff is over the task goes out, and
        # its first real submission is its attempt 1.
        emu.api_key = "test-key"
        clock.now += timedelta(seconds=10)
        await h.age_queue(3600)
        await h.cycle()
        await h.drain_sync()
        for cid in ("k-1", "k-2"):
            task = await h.task(cid)
            assert (task["state"], task["attempts"]) == ("succeeded", 1), task
            assert task["location"] == {
                "stage": "routed",
                "outcome": "succeeded",
                "batch_id": task["batch_id"],
            }
        status, ready = await h.get("/readyz")
        assert (status, ready["status"]) == (200, "ready")
    HEALTH.reset()


async def test_a_task_says_where_it_really_is(db_url: str, tmp_path: Path) -> None:
    emu = Emulator(api_key="test-key", validating_seconds=30)
    async with running(db_url, tmp_path, emulator=emu) as h:
        assert (await h.post(chat_task("w-1")))[0] == 202
        assert (await h.task("w-1"))["location"]["stage"] == "queued"
        await h.age_queue(3600)
        pending = await h.service.scheduler._flush_one(drain=False)
        assert pending is not None
        loc = (await h.task("w-1"))["location"]
        assert (loc["stage"], loc["batch_state"], loc["batch_id"]) == (
            "uploading",
            "building",
            pending.batch_id,
        )
        await h.service.scheduler.send(pending)
        loc = (await h.task("w-1"))["location"]
        assert loc["stage"] == "at_provider" and loc["provider_status"] == "validating"
        assert loc["provider_batch_id"].startswith("batch_")
        task = await h.task("w-1")
        assert task["state"] == "submitted" and task["attempts"] == 1


async def test_an_unmigrated_database_says_to_run_migrate(
    pg_admin_url: str, tmp_path: Path
) -> None:
    name = f"batchd_empty_{tmp_path.name[-12:]}".replace("-", "_")
    await _admin(pg_admin_url, f'CREATE DATABASE "{name}"')
    url = async_url(_with_db(pg_admin_url, name))
    try:
        async with running(url, tmp_path) as h:
            status, body = await h.post(chat_task("m-1"))
            assert status == 503 and body["error"]["code"] == "schema_missing", body
            assert "batchd migrate" in body["error"]["message"]
            status, body = await h.get("/readyz")
            assert status == 503 and body["error"]["code"] == "schema_missing", body
            assert "batchd migrate" in body["error"]["message"]

            # Migrated, but one revision behind this build.
            await _upgrade(url, "head")
            await _downgrade(url, "-1")
            status, body = await h.get("/readyz")
            assert status == 503 and body["error"]["code"] == "schema_outdated", body
            assert "behind" in body["error"]["message"]
            assert "batchd migrate" in body["error"]["message"]
            await _upgrade(url, "head")
            status, body = await h.get("/readyz")
            assert status == 200, body
            assert (await h.post(chat_task("m-1")))[0] == 202
    finally:
        await _admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _upgrade(url: str, to: str) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(url), to)


async def _downgrade(url: str, to: str) -> None:
    await asyncio.to_thread(command.downgrade, alembic_config(url), to)


async def test_every_priced_model_has_money_and_token_series_from_the_start(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        async with h.http.get(f"{h.base_url}/metrics") as r:
            exposed = await r.text()
        series = {
            (sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(exposed)
            for sample in family.samples
        }
        for model in PriceTable.load().models:
            # Each at the provider its model goes to (DESIGN section 14).
            provider = (
                "anthropic"
                if model.startswith("claude")
                else "gemini"
                if model.startswith("gemini")
                else "openai"
            )
            for lane in ("batch", "sync"):
                labels = {"provider": provider, "model": model, "lane": lane}
                for name in ("batchd_spend_dollars_total", "batchd_savings_dollars_total"):
                    assert (name, tuple(sorted(labels.items()))) in series, (name, model)
                for kind in ("input", "cached_input", "output"):
                    assert (
                        "batchd_tokens_total",
                        tuple(sorted({**labels, "kind": kind}.items())),
                    ) in series, (kind, model)
