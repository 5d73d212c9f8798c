"""Every ingest limit at its edge (accepted) and just past it (refused with
the task and field named, nothing stored)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.harness import Harness, chat_task, running


def _padded(total: int, measure: Any, build: Any) -> Any:
    """build(pad) whose measure() is exactly ``total``: pad adds one unit each."""
    doc = build(total - measure(build(0)))
    assert measure(doc) == total, (measure(doc), total)
    return doc


async def _raw_post(h: Harness, data: bytes, ndjson: bool = False) -> tuple[int, Any]:
    ctype = "application/x-ndjson" if ndjson else "application/json"
    async with h.http.post(
        f"{h.base_url}/v1/tasks", data=data, headers={"Content-Type": ctype}
    ) as r:
        return r.status, await r.json()


def _refused(reply: tuple[int, Any], status: int, code: str, field: str | None = None) -> None:
    got_status, body = reply
    assert (got_status, body["error"]["code"]) == (status, code), body
    if field is not None:
        assert body["error"]["field"] == field, body
        assert body["error"]["message"].startswith("task "), body


async def test_request_body_size_edge(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, max_request_bytes=2048) as h:

        def doc(pad: int, custom_id: str = "big") -> bytes:
            return orjson.dumps(chat_task(custom_id, content="x" * pad))

        at_edge = _padded(2048, len, doc)
        status, _ = await _raw_post(h, at_edge)
        assert status == 202
        past = doc(2048 - len(doc(0)) + 1, "bog")
        assert len(past) == 2049
        _refused(await _raw_post(h, past), 413, "payload_too_large")
        assert await h.count("true") == 1


@pytest.mark.parametrize("ndjson", [False, True])
async def test_tasks_per_request_edge(db_url: str, tmp_path: Path, ndjson: bool) -> None:
    async with running(db_url, tmp_path, max_tasks_per_request=3) as h:
        status, body = await h.post(
            [chat_task(f"a{i}") for i in range(3)]
            if ndjson
            else {"tasks": [chat_task(f"a{i}") for i in range(3)]},
            ndjson=ndjson,
        )
        assert (status, body["accepted"]) == (202, 3)
        four = [chat_task(f"b{i}") for i in range(4)]
        _refused(
            await h.post(four if ndjson else {"tasks": four}, ndjson=ndjson), 413, "too_many_tasks"
        )
        assert await h.count("true") == 3


async def test_custom_id_length_edge(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, max_custom_id_chars=10) as h:
        assert (await h.post(chat_task("x" * 10)))[0] == 202
        _refused(await h.post(chat_task("y" * 11)), 400, "invalid_task", "custom_id")
        assert await h.count("true") == 1


async def test_custom_id_is_at_most_512_characters_by_default(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        assert (await h.post(chat_task("x" * 512)))[0] == 202
        _refused(await h.post(chat_task("y" * 513)), 400, "invalid_task", "custom_id")


async def test_custom_id_characters_outside_the_pattern_are_refused(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        for custom_id in (
            "has space",
            "tab\t",
            "caf\u00e9",
            "semi;colon",
            "quote'",
            "new\nline",
            "a\u0000b",
            "?query",
            "#frag",
        ):
            _refused(await h.post(chat_task(custom_id)), 400, "invalid_task", "custom_id")
        assert await h.count("true") == 0


async def test_every_default_custom_id_character_is_accepted_and_readable_back(
    db_url: str, tmp_path: Path
) -> None:
    every = "AZaz09._:@+=~/-"
    async with running(db_url, tmp_path) as h:
        assert (await h.post(chat_task(every)))[0] == 202
        from urllib.parse import quote

        status, task = await h.get(f"/v1/tasks/{quote(every, safe='')}")
        assert (status, task["custom_id"]) == (200, every)


async def test_custom_id_pattern_is_configurable(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, custom_id_pattern="[a-z]+") as h:
        assert (await h.post(chat_task("letters")))[0] == 202
        _refused(await h.post(chat_task("digits1")), 400, "invalid_task", "custom_id")


async def test_task_body_size_edge(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, max_task_body_bytes=200) as h:

        def task(pad: int) -> dict[str, Any]:
            return chat_task(f"b{pad}", content="x" * pad)

        def body_bytes(t: dict[str, Any]) -> int:
            return len(orjson.dumps(t["body"]))

        at_edge = _padded(200, body_bytes, task)
        assert (await h.post(at_edge))[0] == 202
        past = chat_task("past", content=at_edge["body"]["messages"][0]["content"] + "x")
        assert body_bytes(past) == 201
        _refused(await h.post(past), 413, "task_too_large", "body")
        assert await h.count("true") == 1


def _nested(depth: int) -> dict[str, Any]:
    """A chat body whose nesting (the body itself counting 1) is ``depth``."""
    value: Any = "leaf"
    for _ in range(depth - 1):
        value = [value]
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "extra": value}


async def test_body_depth_edge(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, max_body_depth=6) as h:
        assert (await h.post({"custom_id": "deep6", "body": _nested(6)}))[0] == 202
        _refused(
            await h.post({"custom_id": "deep7", "body": _nested(7)}), 400, "invalid_task", "body"
        )
        assert await h.count("true") == 1


async def test_hostile_depth_is_refused_without_a_crash(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        # Deeper than any JSON parser's own limit: refused as bad JSON.
        status, body = await _raw_post(
            h, b'{"custom_id":"x","body":' + b"[" * 5000 + b"]" * 5000 + b"}"
        )
        assert (status, body["error"]["code"]) == (400, "invalid_json")
        _refused(
            await h.post({"custom_id": "d65", "body": _nested(65)}), 400, "invalid_task", "body"
        )


async def test_metadata_past_the_provider_limits_is_refused(db_url: str, tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata." + "k" * 20),
        ({"k": "v" * 513}, "metadata.k"),
        ({"k": 5}, "metadata.k"),
    ]
    async with running(db_url, tmp_path) as h:
        for metadata, field in cases:
            _refused(await h.post(chat_task("m", metadata=metadata)), 400, "invalid_task", field)
        assert await h.count("true") == 0


async def test_metadata_at_the_provider_limits_is_accepted(db_url: str, tmp_path: Path) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    async with running(db_url, tmp_path) as h:
        assert (await h.post(chat_task("m", metadata=metadata)))[0] == 202
        assert (await h.task("m"))["metadata"] == metadata


async def test_metadata_limits_are_configurable_below_the_providers(
    db_url: str, tmp_path: Path
) -> None:
    async with running(
        db_url, tmp_path, max_metadata_pairs=2, max_metadata_key_chars=3, max_metadata_value_chars=4
    ) as h:
        assert (await h.post(chat_task("ok", metadata={"abc": "wxyz", "d": ""})))[0] == 202
        _refused(
            await h.post(chat_task("n1", metadata={"a": "1", "b": "2", "c": "3"})),
            400,
            "invalid_task",
            "metadata",
        )
        _refused(
            await h.post(chat_task("n2", metadata={"abcd": "1"})),
            400,
            "invalid_task",
            "metadata.abcd",
        )
        _refused(
            await h.post(chat_task("n3", metadata={"a": "vwxyz"})),
            400,
            "invalid_task",
            "metadata.a",
        )
        assert await h.count("true") == 1


PROVIDER_REFUSES: list[tuple[dict[str, Any], str, str]] = [
    (
        {
            "custom_id": "e",
            "endpoint": "/v1/images/generations",
            "body": {"model": "m", "prompt": "cat"},
        },
        "endpoint",
        "must be one of",
    ),
    ({"custom_id": "e", "body": {"messages": [{"role": "user"}]}}, "body.model", "required"),
    (
        {"custom_id": "e", "body": {"model": "m", "stream": True, "messages": [{"role": "user"}]}},
        "body.stream",
        "stream",
    ),
    ({"custom_id": "e", "body": {"model": "m"}}, "body.messages", "required"),
    (
        {"custom_id": "e", "body": {"model": "m", "messages": {"role": "user"}}},
        "body.messages",
        "list",
    ),
    (
        {"custom_id": "e", "body": {"model": "m", "messages": [{"content": "hi"}]}},
        "body.messages[0].role",
        "must be one of",
    ),
    (
        {"custom_id": "e", "endpoint": "/v1/embeddings", "body": {"model": "m"}},
        "body.input",
        "required",
    ),
    (
        {"custom_id": "e", "endpoint": "/v1/responses", "body": {"model": "m"}},
        "body.input",
        "required",
    ),
    (
        {"custom_id": "e", "endpoint": "/v1/completions", "body": {"model": "m"}},
        "body.prompt",
        "required",
    ),
    (
        {"custom_id": "e", "endpoint": "/v1/moderations", "body": {"model": "m"}},
        "body.input",
        "required",
    ),
    (
        {"custom_id": "e", "method": "GET", "body": {"model": "m", "messages": [{"role": "user"}]}},
        "method",
        "POST",
    ),
]


async def test_a_task_the_provider_would_reject_is_refused_at_ingest(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        for task, field, words in PROVIDER_REFUSES:
            status, body = await h.post({"tasks": [chat_task("fine"), task]})
            _refused((status, body), 400, "invalid_task", field)
            assert body["error"]["index"] == 1 and body["error"]["custom_id"] == "e"
            assert body["error"]["message"].startswith(f"task 1 ('e'): {field} ")
            assert words in body["error"]["message"]
        assert await h.count("true") == 0  # the good task of each request is not stored
