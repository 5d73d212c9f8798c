"""GeminiProvider on the real ``google-genai`` SDK against the Gemini emulator
over a socket: inline and file batches, per-line status objects, states with
either prefix, expiry with partial results, cancel, validation failure, and a
job created but not recorded found again by our id in its display name."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.domain import Outcome, classify_line
from batchd.emulator.gemini import GeminiEmulator
from batchd.errors import ProviderError
from batchd.prices import Tokens, tokens_from_usage, usage_of
from batchd.provider.base import RemoteBatch
from batchd.provider.gemini import GENERATE, GeminiProvider, http_status, state_of

KEY = "test-key"
MODEL = "gemini-2.5-flash"


def line(cid: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "contents": [{"role": "user", "parts": [{"text": f"hi {cid}"}]}],
        "generationConfig": {"maxOutputTokens": 9},
        **extra,
    }
    return {"custom_id": cid, "method": "POST", "url": GENERATE, "body": body}


@dataclass
class Rig:
    emulator: GeminiEmulator
    provider: GeminiProvider
    tmp: Path

    async def submit(self, lines: list[dict[str, Any]], batch_id: str = "bd_1") -> RemoteBatch:
        path = self.tmp / f"in-{time.monotonic_ns()}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
        remote = await self.provider.upload_file(path, "in.jsonl")
        return await self.provider.create_batch(
            remote.id, GENERATE, "24h", {"batchd_batch_id": batch_id, "batchd_model": MODEL}
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


@pytest.fixture(params=["inline", "file"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    emulator = GeminiEmulator(KEY)
    url = await emulator.start()
    inline_max = 1 << 20 if request.param == "inline" else 0
    provider = GeminiProvider(KEY, url, timeout=10, inline_max_bytes=inline_max)
    yield Rig(emulator, provider, tmp_path)
    await provider.close()
    await emulator.stop()


async def test_success_lines_carry_the_response_and_its_usage(rig: Rig) -> None:
    done = await rig.until_terminal(await rig.submit([line("a"), line("b")]))
    assert done.status == "completed"
    assert done.provider_status in ("JOB_STATE_SUCCEEDED", "BATCH_STATE_SUCCEEDED")
    out = await rig.results(done)
    assert set(out) == {"a", "b"}
    assert classify_line(out["a"]).outcome is Outcome.SUCCESS
    body = out["a"]["response"]["body"]
    assert body["candidates"][0]["content"]["parts"][0]["text"] == "ok"
    usage = usage_of(body)
    assert tokens_from_usage(usage) == Tokens(usage["promptTokenCount"], 0, 9)


async def test_the_request_reaches_the_provider_as_sent(rig: Rig) -> None:
    await rig.submit([line("a", systemInstruction={"parts": [{"text": "be brief"}]})])
    job = next(iter(rig.emulator.jobs.values()))
    sent = job.items[0].request
    assert sent["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert sent["generationConfig"]["maxOutputTokens"] == 9
    assert job.items[0].key == "a"


async def test_status_objects_map_to_retryable_and_final(rig: Rig) -> None:
    rig.emulator.script_line("r", "resource_exhausted")
    rig.emulator.script_line("u", "unavailable")
    rig.emulator.script_line("i", "invalid_argument")
    out = await rig.results(
        await rig.until_terminal(await rig.submit([line("r"), line("u"), line("i")]))
    )
    assert classify_line(out["r"]).outcome is Outcome.RETRYABLE
    assert out["r"]["response"]["status_code"] == 429
    assert classify_line(out["u"]).outcome is Outcome.RETRYABLE
    final = classify_line(out["i"])
    assert final.outcome is Outcome.FINAL and out["i"]["response"]["status_code"] == 400


async def test_expired_job_keeps_what_finished(rig: Rig) -> None:
    rig.emulator.script_batch("expire", ran=1)
    done = await rig.until_terminal(await rig.submit([line("a"), line("b")]))
    assert done.status == "expired"
    out = await rig.results(done)
    # The router retries every task no line names (MISSING_ERROR).
    assert set(out) == {"a"} and classify_line(out["a"]).outcome is Outcome.SUCCESS


async def test_cancel_ends_the_job(rig: Rig) -> None:
    rig.emulator.script_batch("hold", ran=1)
    batch = await rig.submit([line("a"), line("b")])
    assert (await rig.provider.get_batch(batch.id)).status == "in_progress"
    done = await rig.until_terminal(await rig.provider.cancel_batch(batch.id))
    assert done.status == "cancelled"
    out = await rig.results(done)
    assert set(out) == {"a"}


async def test_failed_job_has_no_results(rig: Rig) -> None:
    rig.emulator.script_batch("fail")
    done = await rig.until_terminal(await rig.submit([line("a")]))
    assert done.status == "failed" and done.output_file_id is None


async def test_a_refused_create_is_final(rig: Rig) -> None:
    rig.emulator.inject("create", "http_400")
    with pytest.raises(ProviderError) as err:
        await rig.submit([line("a")])
    assert err.value.status == 400 and not err.value.retryable
    assert rig.emulator.jobs == {}


async def test_server_faults_are_retryable(rig: Rig) -> None:
    rig.emulator.inject("retrieve", "http_503")
    batch = await rig.submit([line("a")])
    with pytest.raises(ProviderError) as err:
        await rig.provider.get_batch(batch.id)
    assert err.value.retryable and err.value.status == 503


async def test_crash_between_create_and_record_is_found_by_display_name(rig: Rig) -> None:
    rig.emulator.inject("create", "reset_after")
    with pytest.raises(ProviderError) as err:
        await rig.submit([line("a")], batch_id="bd_lost")
    assert err.value.retryable
    await rig.submit([line("b")], batch_id="bd_other")
    found = [b async for b in rig.provider.list_batches(page_size=1)]
    assert [b.metadata for b in found] == [
        {"batchd_batch_id": "bd_other"},
        {"batchd_batch_id": "bd_lost"},
    ]


async def test_sync_call_passes_the_rest_body_both_ways(rig: Rig) -> None:
    status, body = await rig.provider.call_sync(GENERATE, line("s")["body"], "s")
    assert status == 200 and body["usageMetadata"]["candidatesTokenCount"] == 9
    rig.emulator.inject("sync", "http_429")
    status, body = await rig.provider.call_sync(GENERATE, line("s")["body"], "s")
    assert status == 429 and body["error"]["code"] == "RESOURCE_EXHAUSTED"


def test_states_with_either_prefix_and_status_codes() -> None:
    for raw, ours in [
        ("BATCH_STATE_PENDING", "validating"),
        ("JOB_STATE_RUNNING", "in_progress"),
        ("JOB_STATE_SUCCEEDED", "completed"),
        ("BATCH_STATE_EXPIRED", "expired"),
        ("JOB_STATE_CANCELLED", "cancelled"),
        ("BATCH_STATE_FAILED", "failed"),
        ("JOB_STATE_PARTIALLY_SUCCEEDED", "completed"),
        ("JOB_STATE_CANCELLING", "cancelling"),
    ]:
        assert state_of(raw) == ours, raw
    assert http_status({"code": 3, "status": "INVALID_ARGUMENT"}) == 400
    assert http_status({"code": 429}) == 429
    assert http_status({"status": "UNAVAILABLE"}) == 503
