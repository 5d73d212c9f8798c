"""The emulator speaks the Files + Batches protocol (openai-batch-protocol.md
§2-§9): driven over a real socket by the SDK adapter and the raw SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict

from batchd.emulator.openai import Emulator, usage_for
from batchd.errors import ProviderError
from batchd.provider.base import RemoteBatch
from batchd.provider.openai import OpenAIProvider

API_KEY = "test-key"
CHAT = "/v1/chat/completions"
BATCH_KEYS = {
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "metadata",
    "model",
    "usage",
}


@dataclass
class Rig:
    emulator: Emulator
    url: str
    provider: OpenAIProvider
    sdk: openai.AsyncOpenAI
    tmp: Path

    async def submit(
        self,
        lines: list[dict[str, Any]] | bytes,
        *,
        endpoint: str = CHAT,
        metadata: dict[str, str] | None = None,
    ) -> RemoteBatch:
        data = (
            lines
            if isinstance(lines, bytes)
            else b"".join(orjson.dumps(line) + b"\n" for line in lines)
        )
        path = self.tmp / f"in-{time.monotonic_ns()}.jsonl"
        path.write_bytes(data)
        remote = await self.provider.upload_file(path, path.name)
        return await self.provider.create_batch(remote.id, endpoint, "24h", metadata or {})

    async def settle(self, batch_id: str) -> RemoteBatch:
        async with asyncio.timeout(5):
            while True:
                batch = await self.provider.get_batch(batch_id)
                if batch.terminal:
                    return batch
                await asyncio.sleep(0.01)

    async def run(self, lines: list[dict[str, Any]] | bytes, **kw: Any) -> RemoteBatch:
        return await self.settle((await self.submit(lines, **kw)).id)

    async def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        dest = self.tmp / f"out-{file_id}"
        await self.provider.download_file(file_id, dest)
        return [orjson.loads(x) for x in dest.read_bytes().splitlines() if x.strip()]

    async def raw(
        self, method: str, path: str, *, key: str = API_KEY, **kw: Any
    ) -> tuple[int, CIMultiDict[str], Any]:
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                method, self.url + path, headers={"Authorization": f"Bearer {key}"}, **kw
            ) as r,
        ):
            body = await r.read()
            return r.status, CIMultiDict(r.headers), orjson.loads(body) if body else None


def chat(
    custom_id: str, model: str = "gpt-4o-mini", *, emulate: str | None = None, **body: Any
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": f"hi {custom_id}"}],
        **body,
    }
    if emulate:
        payload.setdefault("metadata", {})["emulate"] = emulate
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": payload}


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    rigs: list[Rig] = []

    async def make(**emulator_kw: Any) -> Rig:
        emulator = Emulator(API_KEY, **emulator_kw)
        url = await emulator.start()
        rig = Rig(
            emulator,
            url,
            OpenAIProvider(API_KEY, url, max_retries=0),
            openai.AsyncOpenAI(api_key=API_KEY, base_url=url, max_retries=0),
            tmp_path,
        )
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.provider.close()
        await rig.sdk.close()
        await rig.emulator.stop()


@pytest.fixture
async def rig(make_rig: Callable[..., Awaitable[Rig]]) -> Rig:
    return await make_rig()


# ---- lifecycle -------------------------------------------------------------------------


async def test_create_answers_validating_with_every_key_and_zero_counts(rig: Rig) -> None:
    remote = await rig.provider.upload_file(_write(rig, [chat("a")]), "in.jsonl")
    raw = await rig.sdk.batches.with_raw_response.create(
        input_file_id=remote.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = orjson.loads(raw.content)
    assert set(batch) == BATCH_KEYS
    assert batch["status"] == "validating" and batch["id"].startswith("batch_")
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["expires_at"] == batch["created_at"] + 86400
    assert raw.headers["x-request-id"].startswith("req_")


async def test_create_answers_before_the_file_is_validated(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(known_models={"gpt-4o-mini"})
    created = await rig.submit([chat("v", model="gpt-9")])
    assert created.status == "validating" and not created.errors
    batch = await rig.settle(created.id)
    assert batch.status == "failed"
    assert [(e["code"], e["line"]) for e in batch.errors] == [("model_not_found", 1)]


async def test_batch_completes_with_timestamps_counts_model_and_files(rig: Rig) -> None:
    batch = await rig.run([chat(f"c{i}") for i in range(5)], metadata={"job": "j1"})
    wire = (await rig.sdk.batches.retrieve(batch.id)).model_dump()
    assert wire["status"] == "completed"
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert wire[stamp] is not None
    for stamp in ("failed_at", "expired_at", "cancelling_at", "cancelled_at"):
        assert wire[stamp] is None
    assert wire["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert wire["model"] == "gpt-4o-mini" and wire["metadata"] == {"job": "j1"}
    assert batch.error_file_id is None and batch.output_file_id
    out_file = await rig.sdk.files.retrieve(batch.output_file_id)
    assert out_file.purpose == "batch_output"
    lines = await rig.lines(batch.output_file_id)
    assert sorted(x["custom_id"] for x in lines) == [f"c{i}" for i in range(5)]
    assert all(x["id"].startswith("batch_req_") and x["error"] is None for x in lines)
    assert lines[0]["response"]["body"]["object"] == "chat.completion"


async def test_zero_durations_settle_within_50_ms(rig: Rig) -> None:
    submitted = await rig.submit([chat("fast")])
    await asyncio.sleep(0.05)
    assert rig.emulator.batches[submitted.id].status == "completed"


async def test_output_lines_come_shuffled(rig: Rig) -> None:
    batch = await rig.run([chat(f"s{i:03d}") for i in range(200)])
    ids = [x["custom_id"] for x in await rig.lines(batch.output_file_id)]
    assert sorted(ids) == [f"s{i:03d}" for i in range(200)] and ids != sorted(ids)


async def test_http_errors_go_to_the_error_file_with_status_and_body(rig: Rig) -> None:
    rig.emulator.script_line("bad", "http_400")
    rig.emulator.script_line("busy", "http_429")
    rig.emulator.script_line("broke", "http_500")
    batch = await rig.run([chat("bad"), chat("busy"), chat("broke"), chat("fine")])
    assert batch.request_counts == {"total": 4, "completed": 1, "failed": 3}
    errors = {x["custom_id"]: x for x in await rig.lines(batch.error_file_id)}
    assert {k: v["response"]["status_code"] for k, v in errors.items()} == {
        "bad": 400,
        "busy": 429,
        "broke": 500,
    }
    assert errors["bad"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert errors["busy"]["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
    assert all(x["error"] is None for x in errors.values())
    assert [x["custom_id"] for x in await rig.lines(batch.output_file_id)] == ["fine"]


async def test_all_failed_batch_completes_without_output_file(rig: Rig) -> None:
    batch = await rig.run([chat(f"f{i}", emulate="http_404") for i in range(3)])
    assert batch.status == "completed" and batch.output_file_id is None
    assert batch.request_counts == {"total": 3, "completed": 0, "failed": 3}
    codes = {x["response"]["body"]["error"]["code"] for x in await rig.lines(batch.error_file_id)}
    assert codes == {"model_not_found"}


async def test_batch_usage_is_the_sum_of_200_lines_usage(rig: Rig) -> None:
    lines = [
        chat("u1", max_tokens=40, metadata={"cached_tokens": 3}),
        chat("u2", max_tokens=None, max_completion_tokens=7),
        chat("u3", emulate="http_500"),
    ]
    batch = await rig.run(lines)
    per_line = {
        x["custom_id"]: x["response"]["body"]["usage"]
        for x in await rig.lines(batch.output_file_id)
    }
    assert per_line == {
        c: usage_for(CHAT, line["body"]) for c, line in (("u1", lines[0]), ("u2", lines[1]))
    }
    u1 = per_line["u1"]
    # OpenAI's count for one user message "hi u1": 3 of framing, "user" (1),
    # "hi u1" (3), and 3 that prime the reply.
    assert u1["prompt_tokens"] == 10 == 3 + 1 + 3 + 3
    assert u1["completion_tokens"] == 40 and u1["prompt_tokens_details"]["cached_tokens"] == 3
    assert per_line["u2"]["completion_tokens"] == 7
    assert batch.usage == {
        "input_tokens": sum(u["prompt_tokens"] for u in per_line.values()),
        "input_tokens_details": {"cached_tokens": 3},
        "output_tokens": 47,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": sum(u["total_tokens"] for u in per_line.values()),
    }


async def test_embeddings_and_responses_bodies_have_their_own_shapes(rig: Rig) -> None:
    emb: dict[str, Any] = {
        "custom_id": "e",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": ["a", "b"]},
    }
    batch = await rig.run([emb], endpoint="/v1/embeddings")
    (line,) = await rig.lines(batch.output_file_id)
    body = line["response"]["body"]
    assert body["object"] == "list" and len(body["data"]) == 2
    assert body["usage"] == usage_for("/v1/embeddings", emb["body"])
    resp = {
        "custom_id": "r",
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": "gpt-4.1", "input": "hello", "max_output_tokens": 5},
    }
    batch = await rig.run([resp], endpoint="/v1/responses")
    (line,) = await rig.lines(batch.output_file_id)
    assert line["response"]["body"]["object"] == "response"
    assert line["response"]["body"]["usage"]["output_tokens"] == 5
    assert batch.usage == line["response"]["body"]["usage"]


# ---- validation ------------------------------------------------------------------------


async def test_bad_lines_fail_the_batch_with_one_error_each(rig: Rig) -> None:
    good = chat("ok")
    bad_url = {**chat("u"), "url": "/v1/embeddings"}
    no_method = {k: v for k, v in chat("m").items() if k != "method"}
    streaming = chat("s", stream=True)
    other_model = chat("o", model="gpt-4.1")
    data = (
        b"\n".join(
            [
                orjson.dumps(good),
                b"{not json",
                orjson.dumps(bad_url),
                orjson.dumps(no_method),
                orjson.dumps(streaming),
                orjson.dumps(other_model),
                orjson.dumps(chat("ok")),
            ]
        )
        + b"\n"
    )
    batch = await rig.run(data)
    assert batch.status == "failed"
    assert batch.output_file_id is None and batch.error_file_id is None
    got = {(e["code"], e["line"], e["param"]) for e in batch.errors}
    assert got == {
        ("invalid_json_line", 2, None),
        ("invalid_url", 3, "url"),
        ("missing_required_parameter", 4, "method"),
        ("streaming_unsupported", 5, "body.stream"),
        ("invalid_request", 6, "body.model"),
        ("duplicate_custom_id", 7, "custom_id"),
    }
    wire = await rig.sdk.batches.retrieve(batch.id)
    assert wire.failed_at is not None and wire.in_progress_at is None
    assert batch.request_counts == {"total": 0, "completed": 0, "failed": 0}


async def test_unknown_model_fails_validation_when_known_models_are_set(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(known_models={"gpt-4o-mini"})
    assert (await rig.run([chat("k")])).status == "completed"
    batch = await rig.run([chat("x", model="gpt-9")])
    assert [(e["code"], e["line"], e["param"]) for e in batch.errors] == [
        ("model_not_found", 1, "body.model")
    ]


async def test_scripted_validation_failure_reports_the_given_errors(rig: Rig) -> None:
    rig.emulator.script_batch(
        "validation_failed",
        errors=[{"code": "invalid_request", "line": 2, "param": "body.messages", "message": "bad"}],
    )
    batch = await rig.run([chat("a"), chat("b")])
    assert batch.status == "failed"
    assert batch.errors == [
        {"code": "invalid_request", "line": 2, "param": "body.messages", "message": "bad"}
    ]
    assert (await rig.run([chat("a"), chat("b")])).status == "completed"  # consumed once


async def test_token_limit_exceeded_fails_the_batch_without_a_line(rig: Rig) -> None:
    rig.emulator.script_batch("token_limit_exceeded")
    batch = await rig.run([chat("t")])
    assert batch.status == "failed"
    (error,) = batch.errors
    assert error["code"] == "token_limit_exceeded" and error["line"] is None
    assert "gpt-4o-mini" in error["message"]


async def test_create_rejects_bad_parameters_with_400(rig: Rig) -> None:
    remote = await rig.provider.upload_file(_write(rig, [chat("a")]), "in.jsonl")
    cases: list[tuple[dict[str, Any], str | None, str | None]] = [
        ({"completion_window": "1h"}, "completion_window", "invalid_value"),
        ({"endpoint": "/v1/nope"}, "endpoint", "invalid_value"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
        ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65, "invalid_value"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "invalid_value"),
        ({"metadata": {"k": 1}}, "metadata.k", "invalid_type"),
        ({"input_file_id": "file-missing"}, "file_id", None),
    ]
    for override, param, code in cases:
        body = {
            "input_file_id": remote.id,
            "endpoint": CHAT,
            "completion_window": "24h",
            **override,
        }
        status, headers, answer = await rig.raw("POST", "/batches", json=body)
        assert status == 400, override
        assert headers["Content-Type"].startswith("application/json")
        assert (answer["error"]["param"], answer["error"]["code"]) == (param, code)
    status, _, answer = await rig.raw(
        "POST",
        "/batches",
        json={"input_file_id": "file-missing", "endpoint": CHAT, "completion_window": "24h"},
    )
    assert answer["error"]["message"].startswith("Cannot find file")
    assert rig.emulator.batches == {}


async def test_crlf_line_ends_and_a_missing_final_newline_are_accepted(rig: Rig) -> None:
    data = orjson.dumps(chat("a")) + b"\r\n" + orjson.dumps(chat("b"))
    batch = await rig.run(data)
    assert batch.status == "completed"
    assert batch.request_counts == {"total": 2, "completed": 2, "failed": 0}


# ---- expiry and cancel -----------------------------------------------------------------


async def test_scripted_expiry_keeps_partial_output_and_expires_the_rest(rig: Rig) -> None:
    rig.emulator.script_batch("expire", run_fraction=0.5)
    rig.emulator.script_line("e1", "http_500")
    batch = await rig.run([chat(f"e{i}") for i in range(10)])
    assert batch.status == "expired"
    assert (await rig.sdk.batches.retrieve(batch.id)).expired_at is not None
    out = {x["custom_id"] for x in await rig.lines(batch.output_file_id)}
    errors = {x["custom_id"]: x for x in await rig.lines(batch.error_file_id)}
    assert out == {"e0", "e2", "e3", "e4"}
    assert errors["e1"]["response"]["status_code"] == 500
    expired = {c for c, x in errors.items() if x["response"] is None}
    assert expired == {f"e{i}" for i in range(5, 10)}
    assert all(errors[c]["error"]["code"] == "batch_expired" for c in expired)
    assert batch.request_counts == {"total": 10, "completed": 4, "failed": 6}


async def test_window_passing_in_progress_expires_with_partial_output(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(in_progress_seconds=1.0, completion_window_seconds=0.4)
    batch = await rig.run([chat(f"w{i}") for i in range(20)])
    assert batch.status == "expired"
    done = len(await rig.lines(batch.output_file_id))
    expired = len(await rig.lines(batch.error_file_id))
    assert 0 < done < 20 and done + expired == 20


async def test_cancel_settles_to_cancelled_after_a_delay_with_cancelled_lines(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(in_progress_seconds=30, cancelling_seconds=0.2)
    submitted = await rig.submit([chat(f"x{i}") for i in range(4)])
    cancelling = await rig.provider.cancel_batch(submitted.id)
    assert cancelling.status == "cancelling"
    assert (await rig.provider.get_batch(submitted.id)).status == "cancelling"
    batch = await rig.settle(submitted.id)
    assert batch.status == "cancelled" and batch.output_file_id is None
    wire = await rig.sdk.batches.retrieve(batch.id)
    assert wire.cancelling_at is not None and wire.cancelled_at is not None
    codes = [x["error"]["code"] for x in await rig.lines(batch.error_file_id)]
    assert codes == ["batch_cancelled"] * 4


async def test_cancelled_batch_can_omit_never_run_lines(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(in_progress_seconds=30, write_cancelled_lines=False)
    submitted = await rig.submit([chat("n1"), chat("n2")])
    await rig.provider.cancel_batch(submitted.id)
    batch = await rig.settle(submitted.id)
    assert batch.status == "cancelled"
    assert batch.output_file_id is None and batch.error_file_id is None


async def test_cancel_is_idempotent_while_live_and_409_once_completed(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    rig = await make_rig(validating_seconds=30, cancelling_seconds=30)
    submitted = await rig.submit([chat("c")])
    first = await rig.sdk.batches.cancel(submitted.id)
    again = await rig.sdk.batches.cancel(submitted.id)
    assert first.status == again.status == "cancelling"
    assert first.cancelling_at == again.cancelling_at

    done = await make_rig()
    finished = await done.run([chat("d")])
    with pytest.raises(openai.ConflictError) as info:
        await done.sdk.batches.cancel(finished.id)
    assert info.value.status_code == 409
    assert "Cannot cancel a batch with status 'completed'" in info.value.message


async def test_scripted_cancel_keeps_partial_output(rig: Rig) -> None:
    rig.emulator.script_batch("cancel", run_fraction=0.5)
    batch = await rig.run([chat(f"p{i}") for i in range(6)])
    assert batch.status == "cancelled"
    assert len(await rig.lines(batch.output_file_id)) == 3
    codes = [x["error"]["code"] for x in await rig.lines(batch.error_file_id)]
    assert codes == ["batch_cancelled"] * 3


async def test_stuck_finalizing_holds_the_batch_in_finalizing(rig: Rig) -> None:
    rig.emulator.script_batch("stuck_finalizing", seconds=0.4)
    submitted = await rig.submit([chat("s")])
    await asyncio.sleep(0.1)
    assert (await rig.provider.get_batch(submitted.id)).status == "finalizing"
    assert (await rig.settle(submitted.id)).status == "completed"


# ---- per-line scripts ------------------------------------------------------------------


async def test_scripted_outcomes_are_consumed_one_per_submission(rig: Rig) -> None:
    rig.emulator.script_line("q", "http_500", "http_429")
    seen = []
    for _ in range(3):
        batch = await rig.run([chat("q")])
        (line,) = await rig.lines(batch.output_file_id or batch.error_file_id)
        seen.append(line["response"]["status_code"])
    assert seen == [500, 429, 200]
    assert rig.emulator.submissions["q"] == 3


async def test_body_marker_with_a_count_fails_only_the_first_submissions(rig: Rig) -> None:
    statuses = []
    for _ in range(3):
        batch = await rig.run([chat("m", emulate="http_503*2")])
        (line,) = await rig.lines(batch.output_file_id or batch.error_file_id)
        statuses.append(line["response"]["status_code"])
    assert statuses == [503, 503, 200]


async def test_missing_duplicate_and_malformed_outcomes_shape_the_output(rig: Rig) -> None:
    rig.emulator.script_line("gone", "missing")
    rig.emulator.script_line("twice", "duplicate")
    rig.emulator.script_line("garbled", "malformed")
    rig.emulator.script_line("late", "request_timeout")
    batch = await rig.run([chat("gone"), chat("twice"), chat("garbled"), chat("late")])
    dest = rig.tmp / "out.jsonl"
    assert batch.output_file_id
    await rig.provider.download_file(batch.output_file_id, dest)
    parsed, garbage = [], 0
    for raw in dest.read_bytes().splitlines():
        try:
            parsed.append(orjson.loads(raw)["custom_id"])
        except orjson.JSONDecodeError:
            garbage += 1
    assert sorted(parsed) == ["twice", "twice"] and garbage == 1
    (late,) = await rig.lines(batch.error_file_id)
    assert late["custom_id"] == "late" and late["error"]["code"] == "request_timeout"
    assert batch.request_counts == {"total": 4, "completed": 3, "failed": 1}


async def test_failure_rates_give_the_same_outcomes_for_the_same_seed(
    make_rig: Callable[..., Awaitable[Rig]],
) -> None:
    results = []
    for _ in range(2):
        rig = await make_rig(failure_rates={"http_500": 0.3, "http_429": 0.2}, seed=11)
        batch = await rig.run([chat(f"r{i}") for i in range(100)])
        failed = {
            x["custom_id"]: x["response"]["status_code"]
            for x in await rig.lines(batch.error_file_id)
        }
        results.append(failed)
    assert results[0] == results[1]
    assert 25 < len(results[0]) < 75 and set(results[0].values()) == {500, 429}


# ---- listing, files, auth, records -----------------------------------------------------


async def test_batches_list_newest_first_and_the_sdk_loop_ends(rig: Rig) -> None:
    created = [(await rig.submit([chat(f"l{i}")])).id for i in range(7)]
    listed = [b.id async for b in rig.sdk.batches.list(limit=3)]
    assert listed == created[::-1]
    status, _, page = await rig.raw("GET", "/batches", params={"limit": "3"})
    assert status == 200 and page["has_more"] is True and page["object"] == "list"
    assert (page["first_id"], page["last_id"]) == (created[6], created[4])
    status, _, last = await rig.raw("GET", "/batches", params={"after": created[1]})
    assert [b["id"] for b in last["data"]] == [created[0]] and last["has_more"] is False


async def test_files_list_filters_by_purpose_and_pages(rig: Rig) -> None:
    uploaded = [
        (await rig.provider.upload_file(_write(rig, [chat(f"f{i}")]), f"{i}.jsonl")).id
        for i in range(3)
    ]
    await rig.run([chat("z")])  # adds one more batch file and a batch_output file
    batch_files = [f.id async for f in rig.sdk.files.list(purpose="batch", limit=2)]
    assert batch_files[1:] == uploaded[::-1] and len(batch_files) == 4
    outputs = [f async for f in rig.sdk.files.list(purpose="batch_output")]
    assert [f.purpose for f in outputs] == ["batch_output"]


async def test_deleted_file_is_gone_from_content_and_lists(rig: Rig) -> None:
    remote = await rig.provider.upload_file(_write(rig, [chat("d")]), "d.jsonl")
    deleted = await rig.sdk.files.delete(remote.id)
    assert deleted.deleted is True and deleted.id == remote.id
    with pytest.raises(ProviderError) as info:
        await rig.provider.download_file(remote.id, rig.tmp / "gone")
    assert info.value.status == 404 and not info.value.retryable
    assert [f async for f in rig.provider.list_files()] == []
    assert rig.emulator.received_files[remote.id]  # the audit copy survives


async def test_requests_without_the_key_get_a_401_envelope(rig: Rig) -> None:
    status, headers, body = await rig.raw("GET", "/batches", key="wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert headers["Content-Type"].startswith("application/json")
    assert headers["x-request-id"].startswith("req_")


async def test_unknown_paths_and_ids_get_404_envelopes(rig: Rig) -> None:
    status, _, body = await rig.raw("GET", "/nothing-here")
    assert status == 404 and "error" in body
    status, _, body = await rig.raw("GET", "/batches/batch_nope")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


async def test_uploads_are_recorded_byte_for_byte_with_their_filename(rig: Rig) -> None:
    path = _write(rig, [chat("rec")])
    batch = await rig.submit(path.read_bytes(), metadata={"client_key": "k-1"})
    stored = rig.emulator.received_files[batch.input_file_id]
    assert stored == path.read_bytes() and stored.filename.startswith("in-")
    assert [b.id for b in rig.emulator.created_batches_by_metadata("client_key", "k-1")] == [
        batch.id
    ]


async def test_calls_count_every_request_per_route(rig: Rig) -> None:
    await rig.run([chat("c")])
    assert rig.emulator.calls["upload"] == 1 and rig.emulator.calls["create"] == 1
    assert rig.emulator.calls["retrieve"] >= 1


async def test_sync_endpoints_answer_from_the_same_outcome_engine(rig: Rig) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hey"}],
        "max_tokens": 12,
    }
    answer = await rig.sdk.chat.completions.create(**body)  # type: ignore[call-overload]
    assert answer.object == "chat.completion" and answer.usage is not None
    assert answer.usage.model_dump(exclude_none=True) == usage_for(CHAT, body)
    rig.emulator.script_line("sync-1", "http_429")
    with pytest.raises(openai.RateLimitError):
        await rig.sdk.chat.completions.create(  # type: ignore[call-overload]
            **body, extra_headers={"x-custom-id": "sync-1"}
        )
    assert rig.emulator.submissions["sync-1"] == 1
    emb = await rig.sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and rig.emulator.calls["sync"] == 3


async def test_fifty_thousand_lines_round_trip_in_seconds(rig: Rig) -> None:
    lines = [chat(f"big-{i:05d}") for i in range(50_000)]
    for line in lines:
        line["body"]["messages"][0]["content"] = "x" * 400
    started = time.monotonic()
    batch = await rig.run(lines)
    out = rig.tmp / "big.out"
    assert batch.output_file_id
    written = await rig.provider.download_file(batch.output_file_id, out)
    elapsed = time.monotonic() - started
    assert batch.request_counts == {"total": 50_000, "completed": 50_000, "failed": 0}
    assert written > 20_000_000 and elapsed < 10, elapsed


def _write(rig: Rig, lines: list[dict[str, Any]]) -> Path:
    path = rig.tmp / f"in-{time.monotonic_ns()}.jsonl"
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    return path
