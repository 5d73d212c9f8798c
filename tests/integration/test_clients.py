"""Tokens name their client: the client is stored and labels the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchd.config import load_settings
from batchd.errors import ConfigError
from batchd.provider.openai import OpenAIProvider
from batchd.service import Service
from batchd.store.engine import make_engine
from tests.harness import Harness, chat_task, running


async def _metrics(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with h.http.get(f"{h.base_url}/metrics") as r:
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


async def test_tokens_name_the_client_on_tasks_and_metrics(db_url: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[clients.search]\ntoken = "tok-search"\n')
    async with running(
        db_url, tmp_path, ingest_tokens="billing=tok-billing,plain-token", ingest_tokens_file=tokens
    ) as h:
        before = await _metrics(h)
        for token, tasks in (
            ("tok-billing", ["b1", "b2", "b3"]),
            ("tok-search", ["s1"]),
            ("plain-token", ["p1", "p-bad"]),
        ):
            status, _ = await h.post(
                {
                    "tasks": [
                        chat_task(c, emulate="http_400" if "bad" in c else None) for c in tasks
                    ]
                },
                headers={"Authorization": f"Bearer {token}"},
            )
            assert status == 202
        status, _ = await h.post(chat_task("x"), headers={"Authorization": "Bearer wrong"})
        assert status == 401
        stored = {
            r["custom_id"]: r["client"] for r in await h.rows("SELECT custom_id, client FROM tasks")
        }
        assert stored == {
            "b1": "billing",
            "b2": "billing",
            "b3": "billing",
            "s1": "search",
            "p1": "local",
            "p-bad": "local",
        }
        await h.run_until_settled()
        after = await _metrics(h)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    received = "batchd_tasks_received_total"
    assert delta(received, client="billing", lane="batch") == 3
    assert delta(received, client="search", lane="batch") == 1
    assert delta(received, client="local", lane="batch") == 2
    completed = "batchd_tasks_completed_total"
    assert delta(completed, client="billing", outcome="succeeded", lane="batch") == 3
    assert delta(completed, client="local", outcome="succeeded", lane="batch") == 1
    assert delta(completed, client="local", outcome="failed", lane="batch") == 1
    moved = {
        dict(k[1]).get("client")
        for k, v in after.items()
        if k[0] in (received, completed) and v != before.get(k, 0)
    }
    assert moved == {"billing", "search", "local"}


async def test_a_bad_tokens_file_stops_the_start_naming_the_variable(
    db_url: str, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[clients.billing]\ntoken = "t"\ncallback_url = "https://evil.example/"\n')
    settings = load_settings(
        database_url=db_url,
        data_dir=tmp_path,
        ingest_tokens_file=tokens,
        callback_allowed_hosts="hooks.internal",
    )
    engine = make_engine(db_url, pool_size=1)
    provider = OpenAIProvider(api_key="k", base_url="http://127.0.0.1:9/v1")
    try:
        with pytest.raises(ConfigError) as caught:
            Service(settings, engine, provider)
    finally:
        await provider.close()
        await engine.dispose()
    message = str(caught.value)
    assert message.startswith("BATCHD_INGEST_TOKENS_FILE:") and "callback_url" in message
    assert "\n" not in message
