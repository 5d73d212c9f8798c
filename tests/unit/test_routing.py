"""Routing rules of DESIGN section 14 as a table: a task's own provider; else
its endpoint's family; else the first BATCHD_MODEL_ROUTES glob; else openai."""

from __future__ import annotations

import pytest

from batchd.contract import parse_task
from batchd.domain import (
    InvalidTask,
    Routing,
    parse_model_routes,
    route_provider,
)

ROUTES = parse_model_routes(
    "claude-*=anthropic, gemini-*=gemini, llama-*=openai_compatible:groq,gpt-4o*=azure"
)


@pytest.mark.parametrize(
    ("requested", "endpoint", "model", "expected"),
    [
        (None, "/v1/chat/completions", "gpt-4o-mini", "azure"),
        (None, "/v1/chat/completions", "gpt-5", "openai"),
        (None, "/v1/chat/completions", "llama-3.3-70b", "openai_compatible:groq"),
        (None, "/v1/messages", "gpt-4o", "anthropic"),  # the endpoint beats the model routes
        (None, "/v1beta/generateContent", "anything", "gemini"),
        ("openai", "/v1/chat/completions", "gpt-4o", "openai"),  # the task's own choice wins
        ("azure", "/v1/embeddings", "text-embedding-3-small", "azure"),
        (None, "/v1/embeddings", "text-embedding-3-small", "openai"),
    ],
)
def test_route(requested: str | None, endpoint: str, model: str, expected: str) -> None:
    assert route_provider(requested, endpoint, model, ROUTES) == expected


def test_first_matching_glob_wins_and_openai_is_the_last_resort() -> None:
    routes = parse_model_routes("gpt-*=azure,gpt-4o=openai")
    assert route_provider(None, "/v1/chat/completions", "gpt-4o", routes) == "azure"
    assert parse_model_routes("")[-1] == ("*", "openai")


@pytest.mark.parametrize(
    "raw", ["claude=", "=anthropic", "claude-*", "x=bedrock", "x=openai_compatible:Bad Name"]
)
def test_bad_routes_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_model_routes(raw)


def _task(**kw: object) -> dict[str, object]:
    task: dict[str, object] = {
        "custom_id": "t",
        "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
    }
    task.update(kw)
    return task


def test_routing_refuses_unconfigured_providers_naming_them() -> None:
    routing = Routing(frozenset({"openai"}), ROUTES)
    with pytest.raises(InvalidTask) as err:
        routing.route(parse_task(_task(), 0), 0)  # gpt-4o* routes to azure
    assert err.value.field == "provider" and "azure" in str(err.value)
    assert "AZURE_OPENAI_API_KEY" in str(err.value)
    assert (
        routing.route(
            parse_task(
                _task(body={"model": "gpt-5", "messages": [{"role": "user", "content": "x"}]}), 0
            ),
            0,
        )
        == "openai"
    )


@pytest.mark.parametrize(
    ("task", "field"),
    [
        (_task(provider="bedrock"), "provider"),
        (_task(provider=3), "provider"),
        (_task(provider="anthropic"), "provider"),  # Anthropic does not run chat completions
        (
            _task(
                endpoint="/v1/messages",
                body={"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "x"}]},
            ),
            "body.max_tokens",
        ),
        (
            _task(
                endpoint="/v1/messages",
                body={
                    "model": "claude-haiku-4-5",
                    "max_tokens": 5,
                    "messages": [{"role": "system", "content": "x"}],
                },
            ),
            "body.messages[0].role",
        ),
        (
            _task(
                endpoint="/v1beta/generateContent",
                body={"model": "gemini-2.5-flash", "contents": []},
            ),
            "body.contents",
        ),
    ],
)
def test_provider_fields_are_validated(task: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidTask) as err:
        parse_task(task, 0)
    assert err.value.field == field
