"""Per-client limits and numbers, and what a caller's model string may cost
(DESIGN section 12): BATCHD_CLIENT_MAX_QUEUED stops one client only; the
report, /v1/report/daily and the metrics show each client's share; a model
batchd cannot price (and no admin allowed) is a 400, never a window, a
provider batch or a metric label of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchd.config import load_settings
from batchd.errors import ConfigError
from batchd.provider.openai import OpenAIProvider
from batchd.service import Service
from batchd.store.engine import make_engine
from tests.harness import Harness, chat_task, running

ALPHA = {"Authorization": "Bearer tok-alpha"}
BETA = {"Authorization": "Bearer tok-beta"}
ADMIN = {"Authorization": "Bearer tok-ops"}
TOKENS: dict[str, Any] = {
    "ingest_tokens": "alpha=tok-alpha,beta=tok-beta",
    "admin_tokens": "ops=tok-ops",
}


async def _scrape(h: Harness) -> tuple[int, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with h.http.get(f"{h.base_url}/metrics") as r:
        text = await r.text()
    return len(text.encode()), {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def test_a_client_past_its_queue_limit_gets_429_and_others_go_on(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, client_max_queued="alpha=3", **TOKENS) as h:
        status, _ = await h.post({"tasks": [chat_task(f"a{i}") for i in range(3)]}, headers=ALPHA)
        assert status == 202
        status, body = await h.post(chat_task("a3"), headers=ALPHA)
        assert (status, body["error"]["code"]) == (429, "queue_full")
        assert "alpha" in body["error"]["message"]
        # Beta has no limit of its own, and alpha's full queue does not stop it.
        status, body = await h.post(
            {"tasks": [chat_task(f"b{i}") for i in range(10)]}, headers=BETA
        )
        assert (status, body["accepted"]) == (202, 10)
        assert await h.count("client = 'alpha'") == 3
        # The snapshot recounts from the database; once alpha's tasks leave the
        # queue it may send again.
        await h.service.snapshot()
        _, scraped = await _scrape(h)
        queued = {
            dict(k[1])["client"]: v
            for k, v in scraped.items()
            if k[0] == "batchd_client_queued_tasks"
        }
        assert (queued["alpha"], queued["beta"]) == (3, 10)
        await h.run_until_settled()
        await h.service.snapshot()
        status, _ = await h.post(chat_task("a3"), headers=ALPHA)
        assert status == 202


async def test_a_queue_limit_for_an_unknown_client_stops_the_start(
    db_url: str, tmp_path: Path
) -> None:
    engine = make_engine(db_url, pool_size=1)
    provider = OpenAIProvider(api_key="k", base_url="http://127.0.0.1:9/v1")
    try:
        for raw, says in (("gamma=5", "'gamma' is no client"), ("alpha=x", "client=1000")):
            with pytest.raises(ConfigError) as caught:
                Service(
                    load_settings(
                        database_url=db_url, data_dir=tmp_path, client_max_queued=raw, **TOKENS
                    ),
                    engine,
                    provider,
                )
            assert str(caught.value).startswith("BATCHD_CLIENT_MAX_QUEUED:")
            assert says in str(caught.value)
    finally:
        await provider.close()
        await engine.dispose()


async def test_each_client_sees_its_own_numbers_and_an_admin_sees_every_share(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, **TOKENS) as h:
        _, before = await _scrape(h)
        await h.post(
            {"tasks": [chat_task("x1"), chat_task("x2", emulate="http_400")]}, headers=ALPHA
        )
        await h.post({"tasks": [chat_task("x1"), chat_task("x2"), chat_task("x3")]}, headers=BETA)
        await h.run_until_settled()
        _, mine = await h.get("/v1/report/daily", headers=ALPHA)
        assert (mine["client"], mine["tasks_in"], mine["succeeded"], mine["failed"]) == (
            "alpha",
            2,
            1,
            1,
        )
        assert "clients" not in mine
        status, _ = await h.get("/v1/report/daily", headers=ALPHA, client="beta")
        assert status == 403
        _, everyone = await h.get("/v1/report/daily", headers=ADMIN)
        shares: dict[str, dict[str, Any]] = everyone["clients"]
        assert set(shares) == {"alpha", "beta"}
        assert (shares["beta"]["tasks_in"], shares["beta"]["succeeded"]) == (3, 3)
        assert (shares["alpha"]["failed"], shares["alpha"]["manual_queue"]) == (1, 1)
        assert everyone["tasks_in"] == 5
        _, narrowed = await h.get("/v1/report/daily", headers=ADMIN, client="beta")
        assert (narrowed["client"], narrowed["tasks_in"]) == ("beta", 3)
        # The results' spend splits by client, and the split adds up (each
        # share and the total rounded once, to 1e-6, where shown).
        spent = sum(float(v["spend_usd"]) for v in shares.values())
        assert spent == pytest.approx(float(everyone["spend_usd"]), abs=2e-6)
        _, after = await _scrape(h)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("batchd_client_spend_dollars_total", client="beta", lane="batch") == pytest.approx(
        float(shares["beta"]["spend_usd"]), abs=1e-6
    )
    assert (
        delta("batchd_tasks_completed_total", client="alpha", outcome="failed", lane="batch") == 1
    )


async def test_invented_models_make_no_batches_and_no_metric_labels(
    db_url: str, tmp_path: Path
) -> None:
    """The hole: 20 tasks naming 20 invented models made 20 provider batches
    and grew /metrics by a label set each."""
    async with running(db_url, tmp_path, allowed_models="acme-*") as h:
        size_before, scraped = await _scrape(h)
        # The registry is the process's: other tests may have labelled it already.
        labelled = {dict(k[1]).get("model") for k in scraped if "model" in dict(k[1])}
        refused = 0
        for i in range(20):
            for model in (f"invented-{i}", f"gpt-4o-mini-x{i}", "m" * 3000):
                status, body = await h.post(chat_task(f"t{i}-{model[:12]}", model))
                assert status == 400, body
                assert body["error"]["field"] in ("body.model",)
                refused += 1
        assert refused == 60 and await h.count("true") == 0
        # Priced models (a dated snapshot too) and the allowed glob pass.
        status, _ = await h.post(
            {
                "tasks": [
                    chat_task("priced", "gpt-4o-mini"),
                    chat_task("dated", "gpt-4o-mini-2024-07-18"),
                    chat_task("allowed", "acme-large"),
                ]
            }
        )
        assert status == 202
        await h.run_until_settled()
        assert await h.count("true", "batches") == 3
        size_after, scraped = await _scrape(h)
        models = {str(dict(k[1])["model"]) for k in scraped if "model" in dict(k[1])}
        assert models - labelled <= {"gpt-4o-mini", "other"}
        # The snapshot counts under its table entry, the allowed model as "other".
        assert "other" in models
        assert not any("invented" in m or "acme" in m or "2024" in m for m in models)
        # Three labelled series at most, not one per invented model.
        assert size_after - size_before < 4000, (size_before, size_after)
