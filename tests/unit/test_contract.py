"""The API's types (batchd.contract): one source for decoding, validation and
the OpenAPI components, errors told as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
import pytest

from batchd import contract, openapi
from batchd.contract import contract_for, parse_task
from batchd.decode import BodyPieces
from batchd.domain import DEFAULT_LIMITS, InvalidTask, Limits
from batchd.ingest import IngestError

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _first_piece(body: bytes, content_type: str) -> list[Any]:
    async def run() -> list[Any]:
        pieces = BodyPieces(
            _one(body),
            content_type,
            contract_for(DEFAULT_LIMITS),
            max_bytes=10**6,
            max_tasks=100,
            max_task_bytes=10**6,
        )
        piece = await pieces.next()
        assert piece is not None
        return piece

    return asyncio.run(run())


BAD: list[dict[str, Any]] = [
    {"custom_id": "", "body": CHAT},
    {"custom_id": "x" * 513, "body": CHAT},
    {"custom_id": "has space", "body": CHAT},
    {"custom_id": "a", "body": CHAT, "extra": 1},
    {"custom_id": "a", "body": []},
    {"custom_id": "a"},
    {"custom_id": "a", "body": CHAT, "endpoint": "/v1/files"},
    {"custom_id": "a", "body": CHAT, "url": None},
    {"custom_id": "a", "body": CHAT, "method": "GET"},
    {"custom_id": "a", "body": CHAT, "provider": "nobody"},
    {"custom_id": "a", "body": CHAT, "metadata": {"k": 1}},
    {"custom_id": "a", "body": CHAT, "metadata": {"k" * 65: "v"}},
    {"custom_id": "a", "body": CHAT, "metadata": [1]},
    {"custom_id": "a", "body": CHAT, "lane": "fast"},
    {"custom_id": "a", "body": CHAT, "deadline": 5},
    {"custom_id": "a", "body": CHAT, "callback_url": ""},
    {"custom_id": "a", "body": CHAT, "job": ""},
    {"custom_id": "a", "body": CHAT, "job": "j" * 129},
]


@pytest.mark.parametrize("task", BAD, ids=lambda t: orjson.dumps(t).decode()[:60])
@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
def test_a_task_decoded_from_bytes_is_refused_as_the_same_task_as_a_value(
    task: dict[str, Any], content_type: str
) -> None:
    good = {"custom_id": "fine", "body": CHAT}
    body = (
        orjson.dumps({"tasks": [good, task]})
        if content_type == "application/json"
        else orjson.dumps(good) + b"\n" + orjson.dumps(task) + b"\n"
    )
    _good, bad = _first_piece(body, content_type)
    assert isinstance(bad, InvalidTask)
    with pytest.raises(InvalidTask) as caught:
        parse_task(task, 1)
    assert (str(bad), bad.field, bad.custom_id) == (
        str(caught.value),
        caught.value.field,
        caught.value.custom_id,
    )
    # A sentence of ours, never msgspec's own wording.
    assert str(bad).startswith("task 1") and "Expected" not in str(bad) and "`" not in str(bad)


def test_integers_past_64_bits_are_stored_as_orjson_reads_them() -> None:
    body = (
        b'{"custom_id": "big", "body": {"model": "m", "messages": [{"role": "user"}], '
        b'"seed": 123456789012345678901234567890}}'
    )
    (task,) = _first_piece(body, "application/x-ndjson")
    stored = contract.admit(task, 0, DEFAULT_LIMITS)
    assert stored.body["seed"] == orjson.loads(body)["body"]["seed"]
    assert stored.body_json == orjson.dumps(orjson.loads(body)["body"]).decode()


def test_bad_json_is_still_named_by_its_line_before_any_task_is_checked() -> None:
    body = b'{"custom_id": "a", "body": 1}\n{"custom_id": \n'
    with pytest.raises(IngestError) as caught:
        _first_piece(body, "application/x-ndjson")
    assert caught.value.code == "invalid_json" and str(caught.value).startswith("line 2")


def test_the_documented_components_are_the_types_own_schemas() -> None:
    spec = openapi.build(Limits(custom_id_chars=40), callbacks=True)
    components = spec["components"]["schemas"]
    _, generated = msgspec.json.schema_components(
        contract.REPLIES, ref_template="#/components/schemas/{name}"
    )
    for name, schema in generated.items():
        assert components[name] == schema, name
    task = components["Task"]["oneOf"][0]["properties"]
    assert task["custom_id"]["maxLength"] == 40
    assert (
        task["lane"]
        == msgspec.json.schema(contract_for(Limits()).task)["$defs"]["Task"]["properties"]["lane"]
    )


def test_query_parameter_schemas_are_the_types_the_handlers_convert_into() -> None:
    params = {
        p["name"]: p["schema"]
        for p in openapi.build(Limits())["paths"]["/v1/failed"]["get"]["parameters"]
    }
    assert params["limit"] == msgspec.json.schema(contract.PageSize)
    assert params["day"] == msgspec.json.schema(contract.Day)
    assert params["reason"] == msgspec.json.schema(contract.ErrorCode)
