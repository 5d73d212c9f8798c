"""Several providers behind one front door (DESIGN section 14): a mixed
OpenAI + Anthropic + Gemini load through the real SDKs and the three
emulators settles with the right states and costs per provider; a task
routed to a provider that is not configured is a 400 naming it; windows wait
for a provider's queue rather than be refused; the sync lane calls the same
provider's synchronous API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.domain import estimate_tokens, line_task_id
from batchd.emulator.anthropic import AnthropicEmulator
from batchd.emulator.gemini import GeminiEmulator
from batchd.prices import PriceTable, cost, round_usd, tokens_from_usage, usage_of
from batchd.provider.anthropic import AnthropicProvider
from batchd.provider.base import Provider
from batchd.provider.gemini import GeminiProvider
from tests.harness import API_KEY, Harness, chat_task, running


def claude_task(cid: str, emulate: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 12,
        "messages": [{"role": "user", "content": f"hello {cid}"}],
    }
    if emulate:
        body["metadata"] = {"emulate": emulate}
    return {"custom_id": cid, "endpoint": "/v1/messages", "body": body, **extra}


def gemini_task(cid: str, emulate: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gemini-2.5-flash",
        "contents": [{"role": "user", "parts": [{"text": f"hi {cid}"}]}],
        "generationConfig": {"maxOutputTokens": 8},
    }
    if emulate:
        body["emulate"] = emulate
    return {"custom_id": cid, "endpoint": "/v1beta/generateContent", "body": body, **extra}


async def callers_ids(h: Harness, line_ids: Iterable[str]) -> list[str]:
    """The caller's custom_id of each provider line id (batchd's own,
    domain.line_id): what a provider saw, as the caller names it."""
    names = {r["id"]: r["custom_id"] for r in await h.rows("SELECT id, custom_id FROM tasks")}
    return [names[line_task_id(c) or 0] for c in line_ids]


@dataclass
class Mixed:
    h: Harness
    anthropic: AnthropicEmulator
    gemini: GeminiEmulator


@pytest.fixture
async def mixed(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Mixed]:
    overrides: dict[str, Any] = getattr(request, "param", {})
    claude, gem = AnthropicEmulator(API_KEY), GeminiEmulator(API_KEY)
    claude_url, gem_url = await claude.start(), await gem.start()
    providers: dict[str, Provider] = {
        "anthropic": AnthropicProvider(API_KEY, claude_url, max_retries=0),
        "gemini": GeminiProvider(API_KEY, gem_url, timeout=10),
    }
    try:
        async with running(db_url, tmp_path, providers=providers, **overrides) as h:
            yield Mixed(h, claude, gem)
    finally:
        await claude.stop()
        await gem.stop()


async def test_mixed_load_settles_with_states_and_costs_per_provider(mixed: Mixed) -> None:
    h = mixed.h
    tasks = [
        chat_task("o-ok"),
        chat_task("o-final", emulate="http_400"),
        claude_task("a-ok"),
        claude_task("a-retry", emulate="overloaded*1"),
        claude_task("a-final", emulate="invalid_request"),
        gemini_task("g-ok"),
        gemini_task("g-retry", emulate="unavailable*1"),
        gemini_task("g-final", emulate="invalid_argument"),
    ]
    status, body = await h.post({"tasks": tasks})
    assert status == 202, body
    stored = {
        r["custom_id"]: r["provider"] for r in await h.rows("SELECT custom_id, provider FROM tasks")
    }
    family = {"o": "openai", "a": "anthropic", "g": "gemini"}
    assert stored == {t["custom_id"]: family[t["custom_id"][0]] for t in tasks}
    await h.run_until_settled()
    states = {
        r["custom_id"]: (r["state"], r["attempts"])
        for r in await h.rows("SELECT custom_id, state, attempts FROM tasks")
    }
    assert states == {
        "o-ok": ("succeeded", 1),
        "o-final": ("failed", 1),
        "a-ok": ("succeeded", 1),
        "a-retry": ("succeeded", 2),
        "a-final": ("failed", 1),
        "g-ok": ("succeeded", 1),
        "g-retry": ("succeeded", 2),
        "g-final": ("failed", 1),
    }
    # One provider per batch; each batch's provider is its tasks'.
    batches = await h.rows("SELECT provider, model, item_count FROM batches ORDER BY created_at")
    assert {(b["provider"], b["model"]) for b in batches} == {
        ("openai", "gpt-4o-mini"),
        ("anthropic", "claude-sonnet-4-5"),
        ("gemini", "gemini-2.5-flash"),
    }
    # Costs exact, from each provider's own usage shape (the response body's).
    prices = PriceTable.load()
    results = await h.rows(
        "SELECT r.custom_id, r.response, r.cost_usd, t.model FROM results r "
        "JOIN tasks t ON t.id = r.task_id"
    )
    assert len(results) == 5
    for r in results:
        response = r["response"] if isinstance(r["response"], dict) else orjson.loads(r["response"])
        tokens = tokens_from_usage(usage_of(response))
        assert tokens.input > 0 and tokens.output > 0, r
        assert Decimal(r["cost_usd"]) == cost(tokens, prices.lookup(r["model"]).batch), r
    # Each provider saw batchd's line ids only, never a caller's custom_id, and
    # billed each succeeded task once.
    ids = {
        r["id"]: (r["custom_id"], r["provider"])
        for r in await h.rows("SELECT id, custom_id, provider FROM tasks")
    }
    for name, emu in (("anthropic", mixed.anthropic), ("gemini", mixed.gemini)):
        record = emu.record()["batches"]
        sent = [line_task_id(c) for b in record for c in b["custom_ids"]]
        assert None not in sent and {ids[t][1] for t in sent if t is not None} == {name}
        billed = [ids[line_task_id(c) or 0][0] for b in record for c in b["billed"]]
        assert sorted(billed) == sorted({f"{name[0]}-ok", f"{name[0]}-retry"})
    # The report by provider: each one's results and spend, adding up to the day's.
    status, report = await h.get("/v1/report/daily")
    assert status == 200, report
    day = report[0] if isinstance(report, list) else report
    by = day["providers"]
    assert {k: (v["succeeded"], v["failed"]) for k, v in by.items()} == {
        "openai": (1, 1),
        "anthropic": (2, 1),
        "gemini": (2, 1),
    }
    spend = {
        r["provider"]: Decimal(r["spend"])
        for r in await h.rows(
            "SELECT t.provider, sum(r.cost_usd) AS spend FROM results r "
            "JOIN tasks t ON t.id = r.task_id GROUP BY t.provider"
        )
    }
    # To the micro-dollar per provider: each provider's exact sum rounded once.
    assert {k: Decimal(v["spend_usd"]) for k, v in by.items()} == {
        k: round_usd(v) for k, v in spend.items()
    }
    assert all(v > 0 for v in spend.values())
    assert round_usd(sum(spend.values(), Decimal(0))) == Decimal(day["spend_usd"])


async def test_a_task_routed_to_an_unconfigured_provider_is_a_400_naming_it(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        status, body = await h.post({"tasks": [chat_task("fine"), claude_task("c1")]})
        assert status == 400, body
        assert body["error"]["field"] == "provider"
        assert "anthropic" in body["error"]["message"]
        assert "ANTHROPIC_API_KEY" in body["error"]["message"]
        status, body = await h.post(chat_task("x", provider="gemini"))
        assert status == 400 and "gemini" in body["error"]["message"]
        assert await h.count("true") == 0


@pytest.mark.parametrize(
    "mixed", [{"model_routes": "claude-*=anthropic,gemini-*=gemini"}], indirect=True
)
async def test_model_routes_send_openai_endpoints_only_to_providers_that_run_them(
    mixed: Mixed,
) -> None:
    # A chat task for a model routed to Anthropic: Anthropic does not run it.
    status, body = await mixed.h.post(chat_task("c", model="claude-sonnet-4-5"))
    assert status == 400 and "does not run /v1/chat/completions" in body["error"]["message"]
    status, body = await mixed.h.post(chat_task("ok", model="gpt-4o"))
    assert status == 202


@pytest.mark.parametrize("mixed", [{"queued_requests": "anthropic=2"}], indirect=True)
async def test_a_window_waits_for_room_in_the_providers_queue(mixed: Mixed) -> None:
    h = mixed.h
    mixed.anthropic.script_batch("hold")
    assert (await h.post({"tasks": [claude_task(f"q{i}") for i in range(3)]}))[0] == 202
    await h.flush(drain=True)
    assert [b["item_count"] for b in await h.rows("SELECT item_count FROM batches")] == [2]
    await h.flush(drain=True)  # the queue is full: the third task waits, nothing is refused
    assert await h.count("true", "batches") == 1 and await h.queued() == 1
    held = (await h.rows("SELECT provider_batch_id FROM batches"))[0]["provider_batch_id"]
    mixed.anthropic.expire_now(held)
    await h.run_until_settled()
    assert await h.count("state = 'succeeded'") == 3


async def test_the_sync_lane_calls_the_same_providers_api(mixed: Mixed) -> None:
    h = mixed.h
    status, _ = await h.post(
        {"tasks": [claude_task("s1", lane="sync"), gemini_task("s2", lane="sync")]}
    )
    assert status == 202
    await h.drain_sync()
    assert await h.count("state = 'succeeded'") == 2
    assert await callers_ids(h, mixed.anthropic.sync_submissions) == ["s1"]
    assert await callers_ids(h, mixed.gemini.sync_submissions) == ["s2"]
    assert sum(mixed.anthropic.sync_submissions.values()) == 1
    assert sum(mixed.gemini.sync_submissions.values()) == 1
    body = (await h.task("s1"))["response"]
    assert body["type"] == "message"


async def test_a_crash_between_create_and_record_adopts_the_anthropic_batch(mixed: Mixed) -> None:
    """Anthropic batches carry no metadata: the one created before the crash is
    found by time and size and adopted, never created twice."""
    h = mixed.h
    mixed.anthropic.inject("create", "reset_after")
    assert (await h.post({"tasks": [claude_task("k1"), claude_task("k2")]}))[0] == 202
    await h.flush(drain=True)
    assert len(mixed.anthropic.batches) == 1
    await h.execute(
        "UPDATE batches SET lease_until = now() - interval '1 second', next_poll_at = now()"
    )
    await h.run_until_settled()
    assert len(mixed.anthropic.batches) == 1
    assert await h.count("state = 'succeeded'") == 2


async def test_a_lost_anthropic_batch_goes_to_the_row_that_created_it_not_another_retry(
    mixed: Mixed,
) -> None:
    """Two windows: the first create is lost after the provider made the batch,
    the second is refused with a 529. Whichever row retries first, each adopts
    or creates only its own: two batches at the provider, nothing twice."""
    h = mixed.h
    mixed.anthropic.inject("create", "reset_after")
    mixed.anthropic.inject("create", "http_529")
    tasks = [claude_task("x1"), claude_task("x2")] + [
        {
            **claude_task(f"y{i}"),
            "body": {**claude_task(f"y{i}")["body"], "model": "claude-haiku-4-5"},
        }
        for i in (1, 2)
    ]
    assert (await h.post({"tasks": tasks}))[0] == 202
    for _ in range(3):
        await h.flush(drain=True)
        await h.execute("UPDATE batches SET lease_until = now() - interval '1 second'")
    await h.run_until_settled()
    assert await h.count("state = 'succeeded'") == 4
    record = mixed.anthropic.record()["batches"]
    assert sorted([sorted(await callers_ids(h, b["custom_ids"])) for b in record]) == [
        ["x1", "x2"],
        ["y1", "y2"],
    ]
    billed = await callers_ids(h, [cid for b in record for cid in b["billed"]])
    assert sorted(billed) == ["x1", "x2", "y1", "y2"]


async def test_a_window_past_the_queued_token_cap_goes_out_smaller_then_waits(
    db_url: str, tmp_path: Path
) -> None:
    tasks = [chat_task(f"t{i}") for i in range(6)]
    body = tasks[0]["body"]
    per_task, _ = estimate_tokens("/v1/chat/completions", body, len(orjson.dumps(body)))
    async with running(db_url, tmp_path, queued_tokens=f"openai={per_task * 5 // 2}") as h:
        h.emulator.in_progress_seconds = 30  # batches stay queued at the provider
        assert (await h.post({"tasks": tasks}))[0] == 202
        assert await h.scalar("SELECT max(est_input_tokens) FROM tasks") == per_task
        await h.flush(drain=True)
        sizes = [
            r["item_count"]
            for r in await h.rows("SELECT item_count FROM batches ORDER BY created_at")
        ]
        # 2 fit under the cap; then one more (a window always moves by one) and
        # with the cap passed, the rest wait for a batch to finish.
        assert sizes == [2, 1]
        assert await h.queued() == 3
        await h.flush(drain=True)
        assert await h.count("true", "batches") == 2
