"""The OpenAPI document and the handlers stay in step.

Every reply of every integration test is also checked against the document
by the harness (tests/spec.py); these tests cover the document itself, the
route table, the docs page and one reply per documented error code.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from openapi_spec_validator import validate

from batchd.domain import Limits
from batchd.openapi import build
from batchd.web import is_console_path
from tests.harness import chat_task, running
from tests.spec import SpecCheck

METHODS = {"get", "post", "put", "patch", "delete"}
SIGNING = "docs-callbacks-key-0123456789abcdef"  # callbacks on, so the page shows the webhook


async def test_the_served_document_is_valid_openapi_3_1(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        status, spec = await h.get("/openapi.json")
        assert status == 200
        assert spec["openapi"].startswith("3.1")
        validate(spec)


async def test_every_route_is_documented_and_every_documented_operation_is_served(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        served = {
            (r.method.lower(), r.resource.canonical)
            for r in h.service.app.router.routes()
            if r.method != "HEAD"
            and r.resource is not None
            and not is_console_path(r.resource.canonical)
        }
        _, spec = await h.get("/openapi.json")
        documented = {
            (m, path) for path, item in spec["paths"].items() for m in item if m in METHODS
        }
        assert served == documented


async def test_every_operation_documents_its_errors_in_the_error_shape(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as h:
        _, spec = await h.get("/openapi.json")
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for status, reply in op["responses"].items():
                if int(status) >= 400:
                    assert reply["content"]["application/json"]["schema"] == error_ref, (
                        method,
                        path,
                        status,
                    )
                    assert "(code `" in reply["description"], (method, path, status)
            if op.get("security") != []:
                assert "401" in op["responses"], (method, path)
            if int(min(op["responses"])) < 300 and path.startswith("/v1/"):
                assert "503" in op["responses"], (method, path)


async def test_plain_docs_page_shows_every_path_and_fetches_nothing(
    db_url: str, tmp_path: Path
) -> None:
    async with running(
        db_url,
        tmp_path,
        ingest_tokens="secret",
        callback_allowed_hosts="*",
        callback_secret=SIGNING,
    ) as h:
        async with h.http.get(f"{h.base_url}/docs/plain") as r:
            assert r.status == 200 and r.content_type == "text/html"
            page = await r.text()
        _, spec = await h.get("/openapi.json")
    for path in spec["paths"]:
        assert f"<code>{path}</code>" in page
    assert spec["webhooks"]
    for name in spec["webhooks"]:
        assert f"Webhook <code>{name}</code>" in page
    assert "<script" not in page and "src=" not in page and "http://" not in page
    assert "https://" not in page


async def test_configured_limits_are_the_documented_ones(db_url: str, tmp_path: Path) -> None:
    async with running(
        db_url, tmp_path, max_tasks_per_request=7, max_custom_id_chars=40, max_metadata_pairs=3
    ) as h:
        _, spec = await h.get("/openapi.json")
    schemas = spec["components"]["schemas"]
    assert schemas["TaskList"]["properties"]["tasks"]["maxItems"] == 7
    variant = schemas["Task"]["oneOf"][0]["properties"]
    assert variant["custom_id"]["maxLength"] == 40
    metadata, null = variant["metadata"]["anyOf"]  # generated: the type, or null
    assert metadata["maxProperties"] == 3 and null == {"type": "null"}


async def test_each_documented_error_is_answered_in_its_documented_shape(
    db_url: str, tmp_path: Path
) -> None:
    async with running(
        db_url, tmp_path, ingest_tokens="secret", max_queued_tasks=2, max_tasks_per_request=3
    ) as h:
        auth = {"Authorization": "Bearer secret"}
        await h.post(chat_task("a"), headers=auth)
        cases = [
            (await h.post(chat_task("b")), 401, "unauthorized"),
            (await h.post({"custom_id": "b"}, headers=auth), 400, "invalid_task"),
            (await h.post({"tasks": []}, headers=auth), 400, "invalid_request"),
            (await h.post(chat_task("a", content="other"), headers=auth), 409, "conflict"),
            (
                await h.post({"tasks": [chat_task(f"t{i}") for i in range(4)]}, headers=auth),
                413,
                "too_many_tasks",
            ),
            (
                await h.post({"tasks": [chat_task("c"), chat_task("d")]}, headers=auth),
                429,
                "queue_full",
            ),
        ]
        async with h.http.post(f"{h.base_url}/v1/tasks", data=b"{", headers=auth) as r:
            cases.append(((r.status, await r.json()), 400, "invalid_json"))
        async with h.http.get(f"{h.base_url}/v1/tasks/nope", headers=auth) as r:
            cases.append(((r.status, await r.json()), 404, "not_found"))
        async with h.http.get(f"{h.base_url}/v1/results?limit=0", headers=auth) as r:
            cases.append(((r.status, await r.json()), 400, "invalid_parameter"))
        async with h.http.post(f"{h.base_url}/v1/failed/replay", json={}, headers=auth) as r:
            cases.append(((r.status, await r.json()), 400, "invalid_request"))
        for (status, body), want_status, want_code in cases:
            assert (status, body["error"]["code"]) == (want_status, want_code), body
        assert h.spec.violations == []
        assert h.spec.checked >= len(cases) + 1


async def test_405_names_the_allowed_methods(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as h:
        async with h.http.delete(f"{h.base_url}/v1/tasks") as r:
            assert r.status == 405
            assert r.headers["Allow"] == "POST"
            assert (await r.json())["error"]["code"] == "method_not_allowed"


def test_the_document_with_callbacks_on_is_valid_too() -> None:
    spec = build(Limits(), callbacks=True)
    validate(spec)
    assert "callback_url" in spec["components"]["schemas"]["Task"]["oneOf"][0]["properties"]
    assert (
        "callback_url"
        not in build(Limits())["components"]["schemas"]["Task"]["oneOf"][0]["properties"]
    )


def test_the_checker_catches_an_undocumented_status_and_a_wrong_body() -> None:
    check = SpecCheck(build(Limits()))
    assert check.problems("GET", "/healthz", 200, "application/json", b'{"status":"ok"}') == []
    assert check.problems("GET", "/healthz", 418, "application/json", b"{}")
    assert check.problems("GET", "/healthz", 200, "application/json", b'{"status":1}')
    assert check.problems(
        "POST", "/v1/tasks", 400, "application/json", orjson.dumps({"error": {"code": "x"}})
    )
    assert check.problems("GET", "/nowhere", 200, "application/json", b"{}")
