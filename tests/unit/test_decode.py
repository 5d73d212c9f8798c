"""Request bodies decoded in bounded pieces (batchd.decode): what each body
shape gives, and where each limit bites."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
import pytest

from batchd.contract import contract_for
from batchd.decode import BodyPieces
from batchd.domain import DEFAULT_LIMITS, InvalidTask
from batchd.ingest import IngestError

MiB = 1024 * 1024
CONTRACT = contract_for(DEFAULT_LIMITS)


async def _chunks(body: bytes, size: int, read: list[int]) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        read.append(start + size)
        yield body[start : start + size]


def decode(
    body: bytes,
    content_type: str = "application/json",
    *,
    max_bytes: int = 64 * MiB,
    max_tasks: int = 10_000,
    piece_bytes: int = 4096,
    chunk: int = 1000,
) -> tuple[list[list[Any]], int]:
    """Every piece of ``body`` (each task as plain JSON again, or the
    InvalidTask in its place) and how many bytes were read to get them."""
    read: list[int] = []

    async def run() -> list[list[Any]]:
        pieces = BodyPieces(
            _chunks(body, chunk, read),
            content_type,
            CONTRACT,
            max_bytes=max_bytes,
            max_tasks=max_tasks,
            max_task_bytes=8 * 4096,
            piece_bytes=piece_bytes,
        )
        out = []
        while (piece := await pieces.next()) is not None:
            out.append([t if isinstance(t, InvalidTask) else msgspec.to_builtins(t) for t in piece])
        assert pieces.at_end()
        return out

    return asyncio.run(run()), (read[-1] if read else 0)


def refusal(body: bytes, content_type: str = "application/json", **kw: Any) -> tuple[int, str, str]:
    with pytest.raises(IngestError) as caught:
        decode(body, content_type, **kw)
    return caught.value.status, caught.value.code, str(caught.value)


TASKS = [
    {
        "custom_id": f"t-{i}",
        "body": {
            "model": "m",
            "messages": [
                {"role": "system", "content": "a},{b"},
                {"role": "user", "content": f"x{i}]}}"},
            ],
        },
    }
    for i in range(500)
]


@pytest.mark.parametrize("pretty", [False, True])
def test_a_tasks_list_comes_in_pieces_that_cut_only_between_tasks(pretty: bool) -> None:
    body = orjson.dumps({"tasks": TASKS}, option=orjson.OPT_INDENT_2 if pretty else 0)
    pieces, _ = decode(body)
    assert len(pieces) > 5 and [t for p in pieces for t in p] == TASKS


def test_ndjson_comes_in_pieces_with_blank_lines_skipped() -> None:
    body = b"\n".join(orjson.dumps(t) for t in TASKS) + b"\n\n"
    pieces, _ = decode(body.replace(b"\n", b"\n\n", 3), "application/x-ndjson")
    assert len(pieces) > 5 and [t for p in pieces for t in p] == TASKS


@pytest.mark.parametrize(
    ("body", "items"),
    [
        (b'{"custom_id": "one", "body": {}}', [{"custom_id": "one", "body": {}}]),
        (
            b' { "tasks" : [ {"custom_id": "a", "body": {}} , '
            b'{"custom_id": "b", "body": {}} ] } \n',
            [{"custom_id": "a", "body": {}}, {"custom_id": "b", "body": {}}],
        ),
        (b'{"tasks": []}', []),
    ],
)
def test_small_bodies(body: bytes, items: list[Any]) -> None:
    pieces, _ = decode(body)
    assert [t for p in pieces for t in p] == items


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (
            b'{"tasks": [{"custom_id": "a", "body": {}}, {"custom_id": "b", "body": 1}, {"x": 1}]}',
            "application/json",
        ),
        (
            b'{"custom_id": "a", "body": {}}\n\n{"custom_id": "b", "body": 1}\n{"x": 1}',
            "application/x-ndjson",
        ),
    ],
)
def test_a_task_that_is_not_one_stands_in_its_place_as_the_reason(
    body: bytes, content_type: str
) -> None:
    pieces, _ = decode(body, content_type)
    # Checked no further: the caller refuses the request there.
    first, bad = pieces[0]
    assert first == {"custom_id": "a", "body": {}}
    assert isinstance(bad, InvalidTask)
    assert (bad.index, bad.custom_id, bad.field) == (1, "b", "body")
    assert str(bad) == "task 1 ('b'): body is required and must be a JSON object"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b'{"tasks": [{"a": 1}, {"b": x}]}', 400, "not valid JSON in or after task 0"),
        (b'{"tasks": [{"a": 1}], "x": 1}', 400, "not valid JSON"),
        (b'{"tasks": [{"a": 1}]', 400, "not valid JSON"),
        (b'{"tasks": [1, 2]}', 400, "must be a JSON object"),
        (b'{"tasks": "x"}', 400, '"tasks" must be a list'),
        (b'{"tasks": [], "other": 1}', 400, '"tasks" must be the only field'),
        (b"{nope", 400, "not valid JSON"),
    ],
)
def test_bad_json_is_a_400_that_says_where(body: bytes, status: int, says: str) -> None:
    got_status, _, message = refusal(body)
    assert got_status == status and says in message, message


def test_a_bad_ndjson_line_is_named_by_its_number() -> None:
    body = b'{"a": 1}\n\n{"b": \n{"c": 3}\n'
    assert refusal(body, "application/x-ndjson") == (
        400,
        "invalid_json",
        refusal(body, "application/x-ndjson")[2],
    )
    assert refusal(body, "application/x-ndjson")[2].startswith("line 3 is not valid JSON")


@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
def test_limits_bite_while_reading_and_reading_stops(content_type: str) -> None:
    hostile = (
        b'{"tasks": [' + b"{}," * 400_000 + b"{}]}"
        if content_type == "application/json"
        else b"{}\n" * 400_000
    )
    for limits, code in (
        ({"max_tasks": 1000}, "too_many_tasks"),
        ({"max_bytes": 100_000, "max_tasks": 10**6}, "payload_too_large"),
    ):
        read: list[int] = []

        async def run(kw: dict[str, int] = limits, read: list[int] = read) -> None:
            pieces = BodyPieces(
                _chunks(hostile, 1000, read),
                content_type,
                CONTRACT,
                max_task_bytes=8 * 4096,
                piece_bytes=4096,
                **{"max_bytes": 64 * MiB, "max_tasks": 10_000, **kw},
            )
            while await pieces.next() is not None:
                pass

        with pytest.raises(IngestError) as caught:
            asyncio.run(run())
        assert (caught.value.status, caught.value.code) == (413, code)
        # Refused a few pieces in: the rest of the 1.2 MB body was never read.
        assert read[-1] <= 110_000, read[-1]


def test_one_task_over_its_byte_cap_is_refused_before_the_body_ends() -> None:
    huge = b'{"tasks": [{"custom_id": "a", "body": {"messages": [' + b"{}," * 200_000 + b"{}]}}]}"
    assert refusal(huge)[:2] == (413, "task_too_large")
    line = b'{"custom_id": "a", "body": "' + b"x" * 100_000 + b'"}\n'
    assert refusal(line, "application/x-ndjson")[:2] == (413, "task_too_large")
