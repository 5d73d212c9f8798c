"""Pure decisions, table-driven."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchd.contract import parse_task
from batchd.domain import (
    FlushReason,
    InvalidTask,
    Outcome,
    backoff_seconds,
    body_digest,
    classify_batch_failure,
    classify_line,
    file_byte_budget,
    flush_reason,
    input_line,
    line_id,
    line_task_id,
    tick_delay,
)


@pytest.mark.parametrize(
    ("count", "age", "window", "cap", "nbytes", "expected"),
    [
        (0, 10_000, 900, 500, 0, None),
        (1, 899.9, 900, 500, 0, None),
        (1, 900, 900, 500, 0, FlushReason.TIMEOUT),
        (499, 10, 900, 500, 0, None),
        (500, 10, 900, 500, 0, FlushReason.CAP),
        (500, 10_000, 900, 500, 0, FlushReason.CAP),
        (3, 0, 900, 3, 0, FlushReason.CAP),
        (10, 10, 900, 500, 999, None),
        (10, 10, 900, 500, 1000, FlushReason.LIMIT),
        (10, 10_000, 900, 500, 5000, FlushReason.LIMIT),
        (500, 10, 900, 500, 5000, FlushReason.CAP),
    ],
)
def test_flush_reason(
    count: int, age: float, window: float, cap: int, nbytes: int, expected: FlushReason | None
) -> None:
    assert flush_reason(count, age, window, cap, nbytes, 1000) == expected


def test_file_byte_budget_leaves_room_under_the_provider_limit() -> None:
    assert file_byte_budget(200 * 1024 * 1024) < 200 * 1024 * 1024
    assert file_byte_budget(2048) == 2037


def _http_line(status: int, code: str | None = None) -> dict[str, Any]:
    body = {"id": "x"} if status == 200 else {"error": {"code": code, "message": "m"}}
    return {"custom_id": "c", "response": {"status_code": status, "body": body}, "error": None}


def _never_ran(code: str) -> dict[str, Any]:
    return {"custom_id": "c", "response": None, "error": {"code": code, "message": "m"}}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (_http_line(200), Outcome.SUCCESS),
        (_http_line(400, "context_length_exceeded"), Outcome.FINAL),
        (_http_line(401, "invalid_api_key"), Outcome.FINAL),
        (_http_line(403), Outcome.FINAL),
        (_http_line(404, "model_not_found"), Outcome.FINAL),
        (_http_line(422), Outcome.FINAL),
        (_http_line(408), Outcome.RETRYABLE),
        (_http_line(409), Outcome.RETRYABLE),
        (_http_line(429, "rate_limit_exceeded"), Outcome.RETRYABLE),
        (_http_line(429, "insufficient_quota"), Outcome.FINAL),
        (_http_line(500), Outcome.RETRYABLE),
        (_http_line(503), Outcome.RETRYABLE),
        (_never_ran("batch_expired"), Outcome.RETRYABLE),
        (_never_ran("batch_cancelled"), Outcome.RETRYABLE),
        (_never_ran("request_timeout"), Outcome.RETRYABLE),
        (_never_ran("insufficient_quota"), Outcome.FINAL),
        (_never_ran("something_new"), Outcome.RETRYABLE),
    ],
)
def test_classify_line(line: dict[str, Any], expected: Outcome) -> None:
    assert classify_line(line).outcome is expected


def test_classify_line_keeps_http_error_details() -> None:
    result = classify_line(_http_line(400, "context_length_exceeded"))
    assert result.status_code == 400
    assert result.error == {"code": "context_length_exceeded", "message": "m", "status": 400}


@pytest.mark.parametrize(
    ("attempts", "jitter", "expected"),
    [
        (1, 0.0, 30.0),
        (1, 0.999999, 59.99997),
        (2, 0.0, 60.0),
        (3, 0.0, 120.0),
        (3, 0.5, 180.0),
        (0, 0.0, 30.0),
        (30, 0.0, 43_200.0),
    ],
)
def test_backoff_doubles_per_attempt_with_equal_jitter(
    attempts: int, jitter: float, expected: float
) -> None:
    assert backoff_seconds(attempts, 60.0, jitter) == pytest.approx(expected)


def test_batch_failure_token_limit_requeues_everything() -> None:
    verdict = classify_batch_failure([{"code": "token_limit_exceeded", "line": None}])
    assert verdict.token_limited and not verdict.final_lines


def test_batch_failure_names_final_lines() -> None:
    verdict = classify_batch_failure(
        [
            {"code": "invalid_url", "line": 2, "param": "url"},
            {"code": "streaming_unsupported", "line": 5, "param": "body.stream"},
        ]
    )
    assert not verdict.token_limited
    assert sorted(verdict.final_lines) == [2, 5]
    assert verdict.final_lines[5]["code"] == "streaming_unsupported"


def _task(**over: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "custom_id": "a",
        "body": {"model": "gpt-4o-mini", "messages": [{"role": "user"}]},
    }
    task.update(over)
    return task


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ("not an object", "task"),
        (_task(custom_id=""), "custom_id"),
        (_task(custom_id=7), "custom_id"),
        (_task(custom_id="x" * 513), "custom_id"),
        (_task(body=None), "body"),
        (_task(body={"messages": []}), "body.model"),
        (_task(body={"model": "", "messages": []}), "body.model"),
        (_task(body={"model": "m"}), "body.messages"),
        (_task(body={"model": "m", "messages": [], "stream": True}), "body.stream"),
        (_task(endpoint="/v1/images/generations"), "endpoint"),
        (_task(endpoint="/v1/embeddings"), "body.input"),
        (_task(metadata={"k": 1}), "metadata.k"),
        (_task(metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
        (_task(lane="sync", extra=1), "extra"),
        (_task(method="GET"), "method"),
        (_task(url="/v1/files"), "url"),
        (_task(endpoint="/v1/embeddings", url="/v1/completions"), "url"),
        (_task(body={"model": "m", "messages": "hi"}), "body.messages"),
        (_task(body={"model": "m", "messages": [{"content": "hi"}]}), "body.messages[0].role"),
        (_task(body={"model": "m", "messages": [{"role": "robot"}]}), "body.messages[0].role"),
        (_task(body={"model": " ", "messages": [{"role": "user"}]}), "body.model"),
        (_task(endpoint="/v1/embeddings", body={"model": "m", "input": ""}), "body.input"),
        (_task(endpoint="/v1/embeddings", body={"model": "m", "input": [True]}), "body.input"),
        (_task(endpoint="/v1/embeddings", body={"model": "m", "input": {"a": 1}}), "body.input"),
        (_task(endpoint="/v1/responses", body={"model": "m"}), "body.input"),
        (_task(endpoint="/v1/responses", body={"model": "m", "input": []}), "body.input"),
        (_task(endpoint="/v1/completions", body={"model": "m"}), "body.prompt"),
        (_task(endpoint="/v1/completions", body={"model": "m", "prompt": 3}), "body.prompt"),
        (_task(endpoint="/v1/moderations", body={"model": "m"}), "body.input"),
        (_task(endpoint="/v1/moderations", body={"model": "m", "input": 5}), "body.input"),
        (
            _task(url="/v1/embeddings", body={"model": "m", "messages": [{"role": "user"}]}),
            "body.input",
        ),
        (_task(body={"model": "m", "messages": [{"role": "user", "content": "a\x00b"}]}), "body"),
        (_task(custom_id="has space"), "custom_id"),
        (_task(custom_id="a\x00"), "custom_id"),
        (_task(metadata={"k\x00": "v"}), "metadata.k"),
    ],
)
def test_parse_task_names_the_bad_field(task: Any, field: str) -> None:
    with pytest.raises(InvalidTask) as caught:
        parse_task(task, 3)
    assert caught.value.field == field
    assert str(caught.value).startswith("task 3")


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "developer"}]}),
        ("/v1/embeddings", {"model": "m", "input": "text"}),
        ("/v1/embeddings", {"model": "m", "input": ["a", "b"]}),
        ("/v1/embeddings", {"model": "m", "input": [1, 2, 3]}),
        ("/v1/embeddings", {"model": "m", "input": [[1, 2], [3]]}),
        ("/v1/responses", {"model": "m", "input": "hi"}),
        ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"model": "m", "prompt": "once upon"}),
        ("/v1/completions", {"model": "m", "prompt": ["a", "b"]}),
        ("/v1/moderations", {"model": "omni-moderation-latest", "input": "text"}),
        ("/v1/moderations", {"model": "m", "input": [{"type": "text", "text": "x"}]}),
    ],
)
def test_parse_task_accepts_each_endpoints_minimal_body(
    endpoint: str, body: dict[str, Any]
) -> None:
    task = parse_task({"custom_id": "ok", "endpoint": endpoint, "body": body}, 0)
    assert task.endpoint == endpoint


def _nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = [value]
    return value


_MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("extra", "verdict"),
    [
        # The body is level 1, so 63 nested lists reach level 64: the limit.
        ({"x": _nested(63)}, None),
        ({"x": _nested(64)}, "nests deeper than 64 levels"),
        # Deeper than orjson writes (254): still refused for its depth.
        ({"x": _nested(300)}, "nests deeper than 64 levels"),
        # Brackets inside strings are text, not nesting.
        ({"x": "[{" * 100}, None),
        ({"x": {"y\x00": 1}}, "must not contain a NUL"),
        ({"x": [1, "a\x00"]}, "must not contain a NUL"),
        # A backslash and "u0000" written out is text, not a NUL.
        ({"x": "a\\u0000b"}, None),
    ],
)
def test_body_depth_and_nul_rules_read_the_json_not_its_text(
    extra: dict[str, Any], verdict: str | None
) -> None:
    task = {"custom_id": "a", "body": {"model": "m", "messages": _MSGS, **extra}}
    if verdict is None:
        assert parse_task(task, 0).body == task["body"]
    else:
        with pytest.raises(InvalidTask, match=verdict):
            parse_task(task, 0)


def test_a_provider_input_line_can_be_posted_as_it_is() -> None:
    line = {
        "custom_id": "req-1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": "hi"},
    }
    assert parse_task(line, 0).endpoint == "/v1/embeddings"


def test_parse_task_measures_the_longest_input_line_batchd_can_write() -> None:
    task = parse_task(_task(), 0)
    # The file carries batchd's line id, never the caller's custom_id: the
    # longest one bounds the line, whatever the caller's id.
    longest = line_id(2**63 - 1, 2**31 - 1, 2**31 - 1)
    assert len(longest) <= 64 and line_task_id(longest) == 2**63 - 1
    assert task.line_bytes == len(input_line(longest, "/v1/chat/completions", task.body))
    assert parse_task(_task(custom_id="x" * 512), 0).line_bytes == task.line_bytes
    assert task.endpoint == "/v1/chat/completions"
    assert task.est_output_tokens == 4096


def test_digest_ignores_key_order_but_not_content() -> None:
    a = body_digest("/v1/chat/completions", {"model": "m", "x": 1})
    b = body_digest("/v1/chat/completions", {"x": 1, "model": "m"})
    c = body_digest("/v1/chat/completions", {"x": 2, "model": "m"})
    assert a == b != c


@pytest.mark.parametrize(
    ("custom_id", "content"),
    [
        ("plain-1", "hello"),
        ("a/b:c@d+e=f~g.h_i", 'with "quotes" and \\'),
        ("x", "ünïcode ✓ \t tab \n newline"),
        ("y" * 512, ""),
    ],
)
def test_line_bytes_and_stored_body_match_the_input_line(custom_id: str, content: str) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "temperature": 0.25,
    }
    task = parse_task({"custom_id": custom_id, "body": body}, 0)
    longest = line_id(2**63 - 1, 2**31 - 1, 2**31 - 1)
    assert task.line_bytes == len(input_line(longest, task.endpoint, body))
    assert task.body_json == orjson.dumps(body).decode()


@pytest.mark.parametrize(
    ("failures", "interval", "jitter", "expected"),
    [
        (0, 1.0, 0.9, 1.0),  # healthy: the plain interval
        (1, 1.0, 0.0, 1.0),  # first failure: never shorter than the interval
        (2, 1.0, 0.0, 1.0),  # 2 s full, equal jitter 1..2
        (2, 1.0, 1.0, 2.0),
        (3, 1.0, 0.5, 3.0),  # 4 s full: 2 + 2 * 0.5
        (4, 0.2, 0.0, 2.0),  # a fast tick still backs off from 0.5 s
        (20, 1.0, 0.0, 5.0),  # capped at 10 s full
        (20, 1.0, 0.99, 9.95),
        (20, 30.0, 0.0, 30.0),  # a slow loop keeps its own interval
    ],
)
def test_tick_delay(failures: int, interval: float, jitter: float, expected: float) -> None:
    assert tick_delay(failures, interval, jitter) == pytest.approx(expected)
