"""Azure OpenAI and OpenAI-compatible adapters on the real ``openai`` SDK
(``AsyncAzureOpenAI``, ``AsyncOpenAI``) against the OpenAI emulator under
their URL shapes: the journey of the OpenAI adapter (success, retryable and
final lines, expiry with partial results, cancel, validation failure, a batch
created but not recorded found by our metadata), with each one's limits."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.domain import Outcome, classify_line
from batchd.emulator.openai import Emulator
from batchd.errors import ProviderError
from batchd.provider.base import RemoteBatch
from batchd.provider.openai import OpenAIProvider, azure_provider, compatible_provider

KEY = "test-key"
CHAT = "/v1/chat/completions"
Make = Callable[..., Awaitable[tuple[Emulator, OpenAIProvider]]]


def chat(cid: str, model: str = "my-gpt4o-deployment") -> dict[str, Any]:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": model,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": f"hi {cid}"}],
        },
    }


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    started: list[tuple[Emulator, OpenAIProvider]] = []

    async def build(kind: str, **emulator_kw: Any) -> tuple[Emulator, OpenAIProvider]:
        emulator = Emulator(KEY, **emulator_kw)
        url = await emulator.start()
        root = url.removesuffix("/v1")
        if kind == "azure":
            provider = azure_provider(KEY, root, "2025-04-01-preview", max_retries=0)
        elif kind == "groq":
            provider = compatible_provider("groq", KEY, f"{root}/openai/v1", max_retries=0)
        else:
            provider = compatible_provider("together", KEY, url, max_retries=0)
        started.append((emulator, provider))
        return emulator, provider

    yield build
    for emulator, provider in started:
        await provider.close()
        await emulator.stop()


async def submit(
    provider: OpenAIProvider, tmp: Path, lines: list[dict[str, Any]], batch_id: str = "bd_1"
) -> RemoteBatch:
    path = tmp / f"in-{time.monotonic_ns()}.jsonl"
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    remote = await provider.upload_file(path, f"batchd-{batch_id}.jsonl")
    return await provider.create_batch(remote.id, CHAT, "24h", {"batchd_batch_id": batch_id})


async def settle(provider: OpenAIProvider, batch: RemoteBatch) -> RemoteBatch:
    deadline = time.monotonic() + 5
    while not batch.terminal:
        assert time.monotonic() < deadline
        batch = await provider.get_batch(batch.id)
    return batch


async def lines_of(
    provider: OpenAIProvider, tmp: Path, batch: RemoteBatch
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            dest = tmp / f"{file_id}.jsonl"
            await provider.download_file(file_id, dest)
            out.update(
                {x["custom_id"]: x for x in map(orjson.loads, dest.read_bytes().splitlines())}
            )
    return out


@pytest.mark.parametrize("kind", ["azure", "groq", "together"])
async def test_journey_under_each_url_shape(make: Make, kind: str, tmp_path: Path) -> None:
    emulator, provider = await make(kind, upper_case_statuses=kind == "together")
    emulator.script_line("r", "http_500")
    emulator.script_line("f", "http_400")
    done = await settle(
        provider, await submit(provider, tmp_path, [chat("ok"), chat("r"), chat("f")])
    )
    assert done.status == "completed"
    if kind == "together":
        assert done.provider_status == "COMPLETED"
    out = await lines_of(provider, tmp_path, done)
    assert classify_line(out["ok"]).outcome is Outcome.SUCCESS
    assert out["ok"]["response"]["body"]["model"] == "my-gpt4o-deployment"
    assert classify_line(out["r"]).outcome is Outcome.RETRYABLE
    assert classify_line(out["f"]).outcome is Outcome.FINAL
    # Expiry keeps what finished; cancel ends a live batch.
    emulator.script_batch("expire", run_fraction=0.5)
    expired = await settle(provider, await submit(provider, tmp_path, [chat("a"), chat("b")]))
    assert expired.status == "expired"
    kept = await lines_of(provider, tmp_path, expired)
    assert classify_line(kept["a"]).outcome is Outcome.SUCCESS
    assert classify_line(kept["b"]).outcome is Outcome.RETRYABLE
    emulator.in_progress_seconds = 30
    live = await submit(provider, tmp_path, [chat("c")])
    cancelled = await provider.cancel_batch(live.id)
    assert cancelled.status in ("cancelling", "cancelled")


async def test_azure_names_its_limits_and_sends_the_deployment(make: Make, tmp_path: Path) -> None:
    emulator, provider = await make("azure")
    assert provider.name == "azure" and provider.limits.max_lines == 100_000
    status, body = await provider.call_sync(CHAT, chat("s")["body"], "s")
    assert status == 200 and body["model"] == "my-gpt4o-deployment"
    assert emulator.calls["sync"] == 1


async def test_together_limits_custom_ids_to_64(make: Make) -> None:
    _, provider = await make("together")
    assert provider.name == "openai_compatible:together"
    assert provider.limits.max_custom_id == 64


async def test_validation_failure_and_reconciliation(make: Make, tmp_path: Path) -> None:
    emulator, provider = await make("groq")
    emulator.inject("create", "http_404")
    with pytest.raises(ProviderError) as err:
        await submit(provider, tmp_path, [chat("a")])
    assert not err.value.retryable
    emulator.inject("create", "reset_after")
    with pytest.raises(ProviderError) as lost:
        await submit(provider, tmp_path, [chat("a")], batch_id="bd_lost")
    assert lost.value.retryable
    found = [b async for b in provider.list_batches()]
    assert [(b.metadata or {}).get("batchd_batch_id") for b in found] == ["bd_lost"]
