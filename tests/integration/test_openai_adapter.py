"""OpenAIProvider on the real SDK against the emulator: each injected fault
becomes the right ProviderError (retryable or not, with the provider's hint),
downloads stream and detect truncation, cancel never burns SDK retries."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchd.emulator.openai import Emulator
from batchd.errors import ProviderError, TruncatedFileError
from batchd.provider.base import RemoteBatch
from batchd.provider.openai import OpenAIProvider

API_KEY = "test-key"
CHAT = "/v1/chat/completions"


def chat(custom_id: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": "gpt-4o-mini",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": f"hello {custom_id}"}],
        },
    }


@dataclass
class Rig:
    emulator: Emulator
    url: str
    provider: OpenAIProvider
    tmp: Path

    def input_file(self, n: int = 2) -> Path:
        path = self.tmp / f"in-{time.monotonic_ns()}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(chat(f"c{i}")) + b"\n" for i in range(n)))
        return path

    async def submit(self, n: int = 2, metadata: dict[str, str] | None = None) -> RemoteBatch:
        remote = await self.provider.upload_file(self.input_file(n), "in.jsonl")
        return await self.provider.create_batch(remote.id, CHAT, "24h", metadata or {})

    async def completed(self, n: int = 2) -> RemoteBatch:
        batch = await self.submit(n)
        deadline = time.monotonic() + 5
        while not batch.terminal:
            assert time.monotonic() < deadline
            batch = await self.provider.get_batch(batch.id)
        return batch

    def provider_with(self, **kw: Any) -> OpenAIProvider:
        return OpenAIProvider(API_KEY, self.url, **kw)


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    started: list[Rig] = []
    extra: list[OpenAIProvider] = []

    async def make(*, provider_kw: dict[str, Any] | None = None, **emulator_kw: Any) -> Rig:
        emulator = Emulator(API_KEY, **emulator_kw)
        url = await emulator.start()
        kw = {"max_retries": 0, **(provider_kw or {})}
        rig = Rig(emulator, url, OpenAIProvider(API_KEY, url, **kw), tmp_path)
        original = rig.provider_with

        def tracked(**kw: Any) -> OpenAIProvider:
            p = original(**kw)
            extra.append(p)
            return p

        rig.provider_with = tracked  # type: ignore[method-assign]
        started.append(rig)
        return rig

    yield make
    for p in extra:
        await p.close()
    for rig in started:
        await rig.provider.close()
        await rig.emulator.stop()


@pytest.fixture
async def rig(make_rig: Callable[..., Awaitable[Rig]]) -> Rig:
    return await make_rig()


async def _create_error(rig: Rig, **kw: Any) -> ProviderError:
    remote = await rig.provider.upload_file(rig.input_file(), "in.jsonl")
    with pytest.raises(ProviderError) as info:
        await rig.provider.create_batch(remote.id, CHAT, "24h", kw)
    return info.value


# ---- conversion ------------------------------------------------------------------------


async def test_remote_batch_carries_counts_usage_metadata_and_model(rig: Rig) -> None:
    batch = await rig.submit(3, metadata={"job": "j"})
    assert batch.status == "validating" and batch.metadata == {"job": "j"}
    assert not batch.terminal and batch.errors == []
    done = await rig.completed(3)
    assert done.terminal and done.model == "gpt-4o-mini"
    assert done.request_counts == {"total": 3, "completed": 3, "failed": 0}
    assert done.usage is not None and done.usage["output_tokens"] == 15


async def test_failed_batch_errors_become_plain_dicts(rig: Rig) -> None:
    rig.emulator.script_batch(
        "validation_failed",
        errors=[{"code": "invalid_request", "line": 1, "param": "body.messages", "message": "no"}],
    )
    batch = await rig.completed()
    assert batch.status == "failed"
    assert batch.errors == [
        {"code": "invalid_request", "line": 1, "param": "body.messages", "message": "no"}
    ]


async def test_upload_returns_the_remote_file(rig: Rig) -> None:
    path = rig.input_file(4)
    remote = await rig.provider.upload_file(path, "named.jsonl")
    assert remote.id.startswith("file-") and remote.purpose == "batch"
    assert (remote.filename, remote.bytes) == ("named.jsonl", path.stat().st_size)
    assert rig.emulator.received_files[remote.id] == path.read_bytes()


async def test_list_batches_pages_through_everything_newest_first(rig: Rig) -> None:
    ids = [(await rig.submit(1)).id for _ in range(5)]
    assert [b.id async for b in rig.provider.list_batches(page_size=2)] == ids[::-1]
    assert rig.emulator.calls["list_batches"] == 3


async def test_list_files_yields_batch_files_newest_first(rig: Rig) -> None:
    first = await rig.provider.upload_file(rig.input_file(), "a.jsonl")
    second = await rig.provider.upload_file(rig.input_file(), "b.jsonl")
    assert [f.id async for f in rig.provider.list_files()] == [second.id, first.id]


# ---- status faults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status"),
    [("http_500", 500), ("http_502_html", 502), ("http_503", 503), ("http_429", 429)],
)
async def test_server_and_rate_limit_faults_on_create_are_retryable(
    rig: Rig, fault: str, status: int
) -> None:
    rig.emulator.inject("create", fault)
    error = await _create_error(rig)
    assert (error.operation, error.status, error.retryable) == ("create_batch", status, True)
    assert rig.emulator.batches == {}


async def test_retry_after_seconds_becomes_the_hint(rig: Rig) -> None:
    rig.emulator.inject("create", "http_429", retry_after=7)
    error = await _create_error(rig)
    assert error.code == "rate_limit_exceeded" and error.retry_after == 7.0


async def test_retry_after_ms_wins_over_retry_after(rig: Rig) -> None:
    rig.emulator.inject("upload", "http_429", retry_after=9, retry_after_ms=1500)
    with pytest.raises(ProviderError) as info:
        await rig.provider.upload_file(rig.input_file(), "in.jsonl")
    assert info.value.retry_after == 1.5 and info.value.operation == "upload_file"


async def test_insufficient_quota_is_not_retryable(rig: Rig) -> None:
    rig.emulator.inject("create", "insufficient_quota")
    error = await _create_error(rig)
    assert (error.status, error.code, error.retryable) == (429, "insufficient_quota", False)


async def test_should_retry_false_makes_a_500_final(rig: Rig) -> None:
    rig.emulator.inject("create", "http_500", should_retry=False)
    assert (await _create_error(rig)).retryable is False


async def test_not_found_on_retrieve_is_not_retryable(rig: Rig) -> None:
    batch = await rig.submit()
    rig.emulator.inject("retrieve", "http_404")
    with pytest.raises(ProviderError) as info:
        await rig.provider.get_batch(batch.id)
    assert (info.value.status, info.value.retryable) == (404, False)


async def test_bad_request_at_create_is_not_retryable(rig: Rig) -> None:
    with pytest.raises(ProviderError) as info:
        await rig.provider.create_batch("file-nope", CHAT, "24h", {})
    assert (info.value.status, info.value.retryable) == (400, False)
    assert "Cannot find file" in str(info.value)


async def test_wrong_key_is_not_retryable(rig: Rig) -> None:
    wrong = OpenAIProvider("wrong", rig.url, max_retries=0)
    try:
        with pytest.raises(ProviderError) as info:
            await wrong.get_batch("batch_x")
    finally:
        await wrong.close()
    assert (info.value.status, info.value.code, info.value.retryable) == (
        401,
        "invalid_api_key",
        False,
    )


async def test_sdk_retries_absorb_transient_faults_and_resend_the_whole_file(rig: Rig) -> None:
    patient = rig.provider_with(max_retries=2)
    rig.emulator.inject("upload", "http_503", times=2, retry_after_ms=10)
    path = rig.input_file(50)
    remote = await patient.upload_file(path, "in.jsonl")
    assert rig.emulator.calls["upload"] == 3
    assert rig.emulator.received_files[remote.id] == path.read_bytes()


async def test_retry_after_beyond_two_minutes_stops_sdk_retries_at_once(rig: Rig) -> None:
    patient = rig.provider_with(max_retries=2)
    rig.emulator.inject("retrieve", "http_429", retry_after=600)
    with pytest.raises(ProviderError) as info:
        await patient.get_batch("batch_x")
    assert info.value.retry_after == 600.0 and rig.emulator.calls["retrieve"] == 1


# ---- transport faults ------------------------------------------------------------------


async def test_create_that_commits_then_hangs_times_out_and_leaves_a_batch(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(provider_kw={"timeout": 2.0})
    rig.emulator.inject("create", "timeout_after_commit", seconds=30)
    error = await _create_error(rig, client_key="k-42")
    assert error.retryable and error.status is None
    (orphan,) = rig.emulator.created_batches_by_metadata("client_key", "k-42")
    adopted = [
        b.id
        async for b in rig.provider.list_batches()
        if (b.metadata or {}).get("client_key") == "k-42"
    ]
    assert adopted == [orphan.id]


async def test_hang_without_work_times_out_retryably(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    # Long enough that the upload before it never times out on a loaded machine.
    rig = await make_rig(provider_kw={"timeout": 2.0})
    rig.emulator.inject("create", "hang", seconds=30)
    error = await _create_error(rig)
    assert error.retryable and rig.emulator.batches == {}


async def test_reset_before_the_body_is_a_retryable_connection_error(rig: Rig) -> None:
    rig.emulator.inject("upload", "reset_before")
    with pytest.raises(ProviderError) as info:
        await rig.provider.upload_file(rig.input_file(), "in.jsonl")
    assert info.value.retryable and info.value.status is None
    assert rig.emulator.received_files == {}


async def test_reset_after_create_is_retryable_and_the_batch_exists(rig: Rig) -> None:
    rig.emulator.inject("create", "reset_after")
    error = await _create_error(rig)
    assert error.retryable and len(rig.emulator.batches) == 1


async def test_invalid_json_on_a_200_is_retryable(rig: Rig) -> None:
    batch = await rig.submit()
    rig.emulator.inject("retrieve", "invalid_json")
    with pytest.raises(ProviderError) as info:
        await rig.provider.get_batch(batch.id)
    assert info.value.retryable and "invalid JSON" in str(info.value)


async def test_5xx_during_listing_is_retryable(rig: Rig) -> None:
    await rig.submit()
    rig.emulator.inject("list_batches", "http_500")
    with pytest.raises(ProviderError) as info:
        _ = [b async for b in rig.provider.list_batches()]
    assert info.value.retryable and info.value.operation == "list_batches"


# ---- cancel ----------------------------------------------------------------------------


async def test_cancel_of_a_completed_batch_returns_it_without_sdk_retries(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(provider_kw={"max_retries": 2})
    batch = await rig.completed()
    again = await rig.provider.cancel_batch(batch.id)
    assert again.status == "completed" and rig.emulator.calls["cancel"] == 1


async def test_cancel_of_a_live_batch_returns_cancelling(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(in_progress_seconds=30, cancelling_seconds=30)
    batch = await rig.submit()
    assert (await rig.provider.cancel_batch(batch.id)).status == "cancelling"


# ---- downloads -------------------------------------------------------------------------


async def test_download_streams_the_exact_bytes(rig: Rig) -> None:
    batch = await rig.completed(20)
    assert batch.output_file_id
    dest = rig.tmp / "out.jsonl"
    written = await rig.provider.download_file(batch.output_file_id, dest)
    assert written == dest.stat().st_size == len(rig.emulator.files[batch.output_file_id].data)
    assert dest.read_bytes() == rig.emulator.files[batch.output_file_id].data


@pytest.mark.parametrize("mode", ["content_length", "chunked", "clean"])
async def test_truncated_download_raises_truncated_file_error(rig: Rig, mode: str) -> None:
    batch = await rig.completed(50)
    assert batch.output_file_id
    rig.emulator.inject("download", "truncate", mode=mode, fraction=0.5)
    with pytest.raises(TruncatedFileError) as info:
        await rig.provider.download_file(batch.output_file_id, rig.tmp / "cut.jsonl")
    assert info.value.retryable and info.value.operation == "download_file"
    again = await rig.provider.download_file(batch.output_file_id, rig.tmp / "whole.jsonl")
    assert again == len(rig.emulator.files[batch.output_file_id].data)


async def test_slow_download_still_completes(rig: Rig) -> None:
    batch = await rig.completed(5)
    assert batch.output_file_id
    rig.emulator.inject("download", "slow", chunk_bytes=256, delay=0.005)
    dest = rig.tmp / "slow.jsonl"
    await rig.provider.download_file(batch.output_file_id, dest)
    assert dest.read_bytes() == rig.emulator.files[batch.output_file_id].data


async def test_download_stalling_past_the_timeout_is_truncation(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    # Long enough that the upload before it never times out on a loaded machine.
    rig = await make_rig(provider_kw={"timeout": 2.0})
    batch = await rig.completed(5)
    assert batch.output_file_id
    rig.emulator.inject("download", "slow", chunk_bytes=256, delay=5.0)
    with pytest.raises(TruncatedFileError):
        await rig.provider.download_file(batch.output_file_id, rig.tmp / "stall.jsonl")


async def test_final_line_without_newline_is_accepted_when_it_parses(rig: Rig) -> None:
    path = rig.tmp / "nonl.jsonl"
    path.write_bytes(orjson.dumps(chat("a")) + b"\n" + orjson.dumps(chat("b")))
    remote = await rig.provider.upload_file(path, "nonl.jsonl")
    assert await rig.provider.download_file(remote.id, rig.tmp / "copy") == path.stat().st_size


async def test_download_fault_status_maps_like_any_call(rig: Rig) -> None:
    batch = await rig.completed()
    assert batch.output_file_id
    rig.emulator.inject("download", "http_503")
    with pytest.raises(ProviderError) as info:
        await rig.provider.download_file(batch.output_file_id, rig.tmp / "x")
    assert not isinstance(info.value, TruncatedFileError)
    assert (info.value.status, info.value.retryable) == (503, True)
