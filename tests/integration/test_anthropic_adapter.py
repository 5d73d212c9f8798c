"""AnthropicProvider on the real ``anthropic`` SDK against the Anthropic
emulator over a socket: the journey the OpenAI adapter has (success, retry,
final failure, expiry with partial results, cancel, validation failure, crash
between create and record), with results in batchd's line shape."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.domain import Outcome, classify_line
from batchd.emulator.anthropic import AnthropicEmulator
from batchd.errors import ProviderError
from batchd.prices import Tokens, tokens_from_usage, usage_of
from batchd.provider.anthropic import MESSAGES, AnthropicProvider
from batchd.provider.base import RemoteBatch

KEY = "test-key"


def line(cid: str, **meta: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 7,
        "messages": [{"role": "user", "content": f"hi {cid}"}],
    }
    if meta:
        body["metadata"] = meta
    return {"custom_id": cid, "method": "POST", "url": MESSAGES, "body": body}


@dataclass
class Rig:
    emulator: AnthropicEmulator
    provider: AnthropicProvider
    tmp: Path

    async def submit(self, lines: list[dict[str, Any]]) -> RemoteBatch:
        path = self.tmp / f"in-{time.monotonic_ns()}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
        remote = await self.provider.upload_file(path, "in.jsonl")
        return await self.provider.create_batch(
            remote.id, MESSAGES, "24h", {"batchd_batch_id": "bd_1"}
        )

    async def until_terminal(self, batch: RemoteBatch) -> RemoteBatch:
        deadline = time.monotonic() + 5
        while not batch.terminal:
            assert time.monotonic() < deadline
            batch = await self.provider.get_batch(batch.id)
        return batch

    async def results(self, batch: RemoteBatch) -> dict[str, dict[str, Any]]:
        assert batch.output_file_id
        dest = self.tmp / f"out-{time.monotonic_ns()}.jsonl"
        await self.provider.download_file(batch.output_file_id, dest)
        return {x["custom_id"]: x for x in map(orjson.loads, dest.read_bytes().splitlines())}


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    emulator = AnthropicEmulator(KEY)
    url = await emulator.start()
    provider = AnthropicProvider(KEY, url, max_retries=0)
    yield Rig(emulator, provider, tmp_path)
    await provider.close()
    await emulator.stop()


async def test_success_lines_carry_the_message_and_cache_usage(rig: Rig) -> None:
    batch = await rig.submit([line("a", cache_write_tokens=100, cache_read_tokens=40), line("b")])
    assert batch.status == "in_progress" or batch.terminal
    done = await rig.until_terminal(batch)
    assert done.status == "completed" and done.provider_status == "ended"
    assert done.request_counts and done.request_counts["succeeded"] == 2
    out = await rig.results(done)
    assert set(out) == {"a", "b"}
    a = out["a"]
    assert classify_line(a).outcome is Outcome.SUCCESS
    body = a["response"]["body"]
    assert body["type"] == "message" and body["usage"]["cache_creation_input_tokens"] == 100
    tokens = tokens_from_usage(usage_of(body))
    base = body["usage"]["input_tokens"]
    assert tokens == Tokens(base + 140, 40, 7, 100)


async def test_overloaded_and_api_errors_are_retryable_invalid_request_is_final(rig: Rig) -> None:
    rig.emulator.script_line("o", "overloaded")
    rig.emulator.script_line("e", "api_error")
    rig.emulator.script_line("i", "invalid_request")
    out = await rig.results(
        await rig.until_terminal(await rig.submit([line("o"), line("e"), line("i")]))
    )
    assert classify_line(out["o"]).outcome is Outcome.RETRYABLE
    assert out["o"]["response"]["status_code"] == 529
    assert classify_line(out["e"]).outcome is Outcome.RETRYABLE
    final = classify_line(out["i"])
    assert final.outcome is Outcome.FINAL and final.error
    assert final.error["code"] == "invalid_request_error"


async def test_expired_batch_keeps_what_finished_and_the_rest_is_retried(rig: Rig) -> None:
    rig.emulator.script_batch("expire", ran=1)
    done = await rig.until_terminal(await rig.submit([line("a"), line("b"), line("c")]))
    assert done.status == "expired"
    out = await rig.results(done)
    assert classify_line(out["a"]).outcome is Outcome.SUCCESS
    for cid in ("b", "c"):
        verdict = classify_line(out[cid])
        assert verdict.outcome is Outcome.RETRYABLE and verdict.error
        assert verdict.error["code"] == "batch_expired"
    assert rig.emulator.record()["batches"][0]["billed"] == ["a"]


async def test_cancel_ends_the_batch_and_unrun_lines_are_retryable(rig: Rig) -> None:
    rig.emulator.script_batch("partial", ran=1)
    batch = await rig.submit([line("a"), line("b")])
    assert (await rig.provider.get_batch(batch.id)).status == "in_progress"
    cancelled = await rig.provider.cancel_batch(batch.id)
    done = await rig.until_terminal(cancelled)
    assert done.status == "cancelled"
    out = await rig.results(done)
    assert classify_line(out["a"]).outcome is Outcome.SUCCESS
    b = classify_line(out["b"])
    assert b.outcome is Outcome.RETRYABLE and b.error and b.error["code"] == "batch_cancelled"
    # Cancelling an ended batch returns it as it is.
    again = await rig.provider.cancel_batch(batch.id)
    assert again.status == "cancelled"


async def test_a_bad_custom_id_is_refused_at_create_as_final(rig: Rig) -> None:
    with pytest.raises(ProviderError) as err:
        await rig.submit([line("not ok: spaces")])
    assert err.value.status == 400 and not err.value.retryable
    assert err.value.code == "invalid_request_error"
    assert rig.emulator.batches == {}


async def test_other_endpoints_are_refused_before_anything_is_sent(rig: Rig) -> None:
    path = rig.tmp / "chat.jsonl"
    path.write_bytes(orjson.dumps(line("a")) + b"\n")
    remote = await rig.provider.upload_file(path, "x.jsonl")
    with pytest.raises(ProviderError) as err:
        await rig.provider.create_batch(remote.id, "/v1/chat/completions", "24h", {})
    assert not err.value.retryable
    assert rig.emulator.calls["create"] == 0


async def test_server_faults_are_retryable_with_the_error_type(rig: Rig) -> None:
    rig.emulator.inject("create", "http_529")
    with pytest.raises(ProviderError) as err:
        await rig.submit([line("a")])
    assert err.value.retryable and err.value.status == 529
    assert err.value.code == "overloaded_error"
    rig.emulator.inject("retrieve", "http_404")
    with pytest.raises(ProviderError) as gone:
        await rig.provider.get_batch("msgbatch_nope")
    assert not gone.value.retryable


async def test_crash_between_create_and_record_leaves_a_batch_the_list_finds(rig: Rig) -> None:
    before = int(time.time()) - 1
    rig.emulator.inject("create", "reset_after")
    with pytest.raises(ProviderError) as err:
        await rig.submit([line("a"), line("b")])
    assert err.value.retryable
    found = [b async for b in rig.provider.list_batches(page_size=1)]
    assert len(found) == 1 and found[0].created_at >= before
    # No metadata at Anthropic: what identifies it is its time and size.
    assert found[0].metadata is None and found[0].request_counts
    assert found[0].request_counts["total"] == 2


async def test_list_pages_through_every_batch_newest_first(rig: Rig) -> None:
    ids = [(await rig.submit([line(f"x{i}")])).id for i in range(3)]
    listed = [b.id async for b in rig.provider.list_batches(page_size=2)]
    assert listed == list(reversed(ids))


async def test_sync_call_returns_the_message_or_the_error_status(rig: Rig) -> None:
    status, body = await rig.provider.call_sync(MESSAGES, line("s")["body"], "s")
    assert status == 200 and body["usage"]["output_tokens"] == 7
    rig.emulator.inject("sync", "http_400")
    status, body = await rig.provider.call_sync(MESSAGES, line("s")["body"], "s")
    assert status == 400 and body["error"]["code"] == "invalid_request_error"


async def test_wrong_key_is_final(rig: Rig, tmp_path: Path) -> None:
    other = AnthropicProvider("wrong", rig.emulator.base, max_retries=0)
    try:
        with pytest.raises(ProviderError) as err:
            await other.get_batch("msgbatch_x")
        assert err.value.status == 401 and not err.value.retryable
    finally:
        await other.close()
