"""The emulator's per-line engine: outcome names, the usage function, and the
bytes of output/error lines and synchronous responses.

Everything here is pure (no clock except ``created`` stamps, no server state)
so the batch path and the synchronous endpoints answer a request alike, and
tests can recompute tokens and cost from the bodies they sent.
"""

from __future__ import annotations

import itertools
import operator
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.tokens import count_input_tokens

# Outcomes that executed and answered 200 (usage is billed for each).
SUCCESS_OUTCOMES = frozenset({"ok", "duplicate", "malformed"})
# Outcomes of lines that never ran: a top-level ``error`` and ``response: null``.
NEVER_RAN_MESSAGES = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
    "request_timeout": "This request timed out before it could be executed.",
}
# status, type, param, code, message ({model} is filled in).
HTTP_ERRORS: dict[str, tuple[int, str, str | None, str | None, str]] = {
    "http_400": (
        400,
        "invalid_request_error",
        "messages",
        "context_length_exceeded",
        "This model's maximum context length is 128000 tokens. However, your messages "
        "resulted in 1000024 tokens. Please reduce the length of the messages.",
    ),
    "http_401": (
        401,
        "invalid_request_error",
        None,
        "invalid_api_key",
        "Incorrect API key provided.",
    ),
    "http_404": (
        404,
        "invalid_request_error",
        "model",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    "http_408": (408, "timeout", None, "timeout", "Request timed out."),
    "http_409": (
        409,
        "invalid_request_error",
        None,
        "conflict",
        "The request conflicts with another in flight; try again.",
    ),
    "http_429": (
        429,
        "requests",
        None,
        "rate_limit_exceeded",
        "Rate limit reached for {model} on requests per min (RPM). Please try again in 1s.",
    ),
    "insufficient_quota": (
        429,
        "insufficient_quota",
        None,
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "http_500": (
        500,
        "server_error",
        None,
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    "http_503": (503, "server_error", None, None, "The server is overloaded or not ready yet."),
}
OUTCOMES = frozenset({*SUCCESS_OUTCOMES, *NEVER_RAN_MESSAGES, *HTTP_ERRORS, "missing"})

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
COMPLETIONS = "/v1/completions"
MODERATIONS = "/v1/moderations"
ENDPOINTS = frozenset(
    {
        RESPONSES,
        CHAT,
        EMBEDDINGS,
        COMPLETIONS,
        MODERATIONS,
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }
)
_DEFAULT_OUTPUT_TOKENS = 16
_EMBEDDING_DIMS = 8  # real models return 256-3072 floats; 8 keeps benchmark files small


@dataclass(slots=True)
class LinePlan:
    """What one input line will do when (if) it runs."""

    custom_id: str
    outcome: str
    model: str
    tokens: tuple[int, int, int] = (0, 0, 0)  # input, cached input, output
    n_inputs: int = 1  # embedding vectors to return


def _json_tokens(value: Any) -> int:
    return max(1, len(orjson.dumps(value)) // 4)


def _int_or(value: Any, default: int) -> int:
    return (
        value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default
    )


def tokens_for(endpoint: str, body: dict[str, Any]) -> tuple[int, int, int]:
    """(input, cached input, output) tokens a 200 answer to ``body`` reports.

    input  = for a model with a tokenizer (batchd.tokens: OpenAI's gpt-4o, gpt-4.1,
             gpt-5, o-series, gpt-4, gpt-3.5, text-embedding-*), the tokens OpenAI
             counts (chat framing included); for any other model
             max(1, len(orjson.dumps(<prompt field>)) // 4), the prompt field being
             ``messages`` (chat), ``input`` (embeddings, responses, moderations) or
             ``prompt`` (completions); orjson's encoding is compact (no spaces).
    cached = int(body["metadata"]["cached_tokens"]) when given, capped at input
             (chat and responses only), else 0.
    output = chat: max_tokens or max_completion_tokens or 16; responses:
             max_output_tokens or 16; completions: max_tokens or 16; else 0.
    """
    output = 0
    cached_ok = False
    if endpoint == CHAT:
        prompt = body.get("messages", [])
        output = _int_or(
            body.get("max_tokens"),
            _int_or(body.get("max_completion_tokens"), _DEFAULT_OUTPUT_TOKENS),
        )
        cached_ok = True
    elif endpoint == RESPONSES:
        prompt = body.get("input", "")
        output = _int_or(body.get("max_output_tokens"), _DEFAULT_OUTPUT_TOKENS)
        cached_ok = True
    elif endpoint == COMPLETIONS:
        prompt = body.get("prompt", "")
        output = _int_or(body.get("max_tokens"), _DEFAULT_OUTPUT_TOKENS)
    else:
        prompt = body.get("input", "")
    model = body.get("model")
    counted = count_input_tokens(endpoint, model, body) if isinstance(model, str) else None
    inp = max(1, counted) if counted is not None else _json_tokens(prompt)
    cached = 0
    meta = body.get("metadata")
    if cached_ok and isinstance(meta, dict) and "cached_tokens" in meta:
        try:
            cached = min(inp, max(0, int(meta["cached_tokens"])))
        except (TypeError, ValueError):
            cached = 0
    return inp, cached, output


def usage_shape(endpoint: str, tokens: tuple[int, int, int]) -> dict[str, Any]:
    """The endpoint's own ``usage`` object for these tokens ({} for endpoints without one)."""
    inp, cached, out = tokens
    return _usage(endpoint, inp, cached, out, inp + out)


def _usage(endpoint: str, inp: Any, cached: Any, out: Any, total: Any) -> dict[str, Any]:
    # Any-typed so LineWriter can pass placeholders instead of numbers.
    if endpoint == CHAT:
        return {
            "prompt_tokens": inp,
            "completion_tokens": out,
            "total_tokens": total,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
    if endpoint == RESPONSES:
        return {
            "input_tokens": inp,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": total,
        }
    if endpoint == COMPLETIONS:
        return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": total}
    if endpoint == EMBEDDINGS:
        return {"prompt_tokens": inp, "total_tokens": total}
    return {}


def batch_usage(tokens: tuple[int, int, int]) -> dict[str, Any]:
    """Usage in the responses / Batch ``usage`` shape."""
    inp, cached, out = tokens
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": inp + out,
    }


def usage_for(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The ``usage`` a 200 answer to ``body`` carries; see ``tokens_for`` for the rules."""
    return usage_shape(endpoint, tokens_for(endpoint, body))


def count_inputs(endpoint: str, body: dict[str, Any]) -> int:
    if endpoint not in (EMBEDDINGS, MODERATIONS):
        return 1
    value = body.get("input")
    # A list of ints is one tokenised input; a list of strings/lists is many.
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


def _hex() -> str:
    """An opaque id suffix, unique in this process (a counter: urandom per line is slow)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def success_body(endpoint: str, plan: LinePlan) -> dict[str, Any]:
    """A realistic 200 body for the endpoint."""
    inp, cached, out = plan.tokens
    return _body(
        endpoint,
        plan.custom_id,
        plan.model,
        plan.n_inputs,
        _hex(),
        _usage(endpoint, inp, cached, out, inp + out),
    )


def _body(
    endpoint: str, custom_id: str, model: str, n_inputs: int, uid: str, usage: dict[str, Any]
) -> dict[str, Any]:
    now = int(time.time())
    text = f"Emulated reply to {custom_id}."
    if endpoint == CHAT:
        return {
            "id": f"chatcmpl-{uid}",
            "object": "chat.completion",
            "created": now,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text, "refusal": None},
                }
            ],
            "usage": usage,
            "system_fingerprint": "fp_emulator",
        }
    if endpoint == EMBEDDINGS:
        vector = [round(0.1 * (i + 1), 3) for i in range(_EMBEDDING_DIMS)]
        return {
            "object": "list",
            "model": model,
            "usage": usage,
            "data": [
                {"object": "embedding", "index": i, "embedding": vector} for i in range(n_inputs)
            ],
        }
    if endpoint == RESPONSES:
        return {
            "id": f"resp_{uid}",
            "object": "response",
            "created_at": now,
            "status": "completed",
            "model": model,
            "error": None,
            "incomplete_details": None,
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{uid}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": usage,
        }
    if endpoint == COMPLETIONS:
        return {
            "id": f"cmpl-{uid}",
            "object": "text_completion",
            "created": now,
            "model": model,
            "usage": usage,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
        }
    if endpoint == MODERATIONS:
        return {
            "id": f"modr-{uid}",
            "model": model,
            "results": [
                {
                    "flagged": False,
                    "categories": {"violence": False},
                    "category_scores": {"violence": 0.0001},
                }
                for _ in range(n_inputs)
            ],
        }
    return {"created": now, "data": []}


_SLOT = re.compile(rb'("@@(?:CID|IN|CACHED|OUT|TOTAL)@@"|@@(?:LID|RID|UID|CID)@@)')
_NUMERIC_SLOTS = frozenset({"IN", "CACHED", "OUT", "TOTAL"})


class LineWriter:
    """Encodes one batch's 200 lines from a template serialised once per shape.

    Building and encoding a nested dict per line was the emulator's hot spot
    (~10 us/line with GC churn); one ``bytes % tuple`` per line is ~1 us.
    """

    _ORDER = ("CID", "LID", "RID", "UID", "IN", "CACHED", "OUT", "TOTAL")

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint
        self._templates: dict[tuple[str, int], tuple[bytes, operator.itemgetter[Any]]] = {}

    def _template(self, model: str, n_inputs: int) -> tuple[bytes, operator.itemgetter[Any]]:
        key = (model, n_inputs)
        if key not in self._templates:
            usage = _usage(self._endpoint, "@@IN@@", "@@CACHED@@", "@@OUT@@", "@@TOTAL@@")
            body = _body(self._endpoint, "@@CID@@", model, n_inputs, "@@UID@@", usage)
            raw = orjson.dumps(
                {
                    "id": "batch_req_@@LID@@",
                    "custom_id": "@@CID@@",
                    "response": {"status_code": 200, "request_id": "@@RID@@", "body": body},
                    "error": None,
                }
            )
            pieces = _SLOT.split(raw.replace(b"%", b"%%"))
            fmt, slots = [pieces[0]], []
            for slot, literal in zip(pieces[1::2], pieces[2::2], strict=True):
                name = slot.strip(b'"@').decode()
                # A whole-string text slot keeps its quotes; a number slot drops them.
                quote = b'"' if slot.startswith(b'"') and name not in _NUMERIC_SLOTS else b""
                fmt.append(quote + b"%s" + quote + literal)
                slots.append(self._ORDER.index(name))
            self._templates[key] = (b"".join(fmt), operator.itemgetter(*slots, 0))
        return self._templates[key]

    def success(self, plan: LinePlan) -> bytes:
        fmt, pick = self._template(plan.model, plan.n_inputs)
        inp, cached, out = plan.tokens
        uid = _hex().encode()
        values = (
            orjson.dumps(plan.custom_id)[1:-1],
            uid,
            uid,
            uid,
            b"%d" % inp,
            b"%d" % cached,
            b"%d" % out,
            b"%d" % (inp + out),
        )
        # itemgetter got a spare trailing index so it always returns a tuple.
        line: bytes = fmt % pick(values)[:-1]
        return line


def error_body(outcome: str, model: str) -> tuple[int, dict[str, Any]]:
    """(status, ``{"error": {...}}``) for an http_* / insufficient_quota outcome."""
    status, type_, param, code, message = HTTP_ERRORS[outcome]
    return status, {
        "error": {
            "message": message.format(model=model),
            "type": type_,
            "param": param,
            "code": code,
        }
    }


def _line(custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None) -> bytes:
    return orjson.dumps(
        {"id": f"batch_req_{_hex()}", "custom_id": custom_id, "response": response, "error": error}
    )


def ran_lines(writer: LineWriter, plan: LinePlan) -> tuple[list[bytes], list[bytes]]:
    """(output lines, error lines) for a line that ran."""
    outcome = plan.outcome
    if outcome == "missing":
        return [], []
    if outcome == "malformed":
        return [
            b'{"id": "batch_req_'
            + _hex().encode()
            + b'", "custom_id": "'
            + plan.custom_id.encode()
            + b'", "response": {"status_co'
        ], []
    if outcome in NEVER_RAN_MESSAGES:
        return [], [never_ran_line(plan.custom_id, outcome)]
    if outcome in HTTP_ERRORS:
        status, body = error_body(outcome, plan.model)
        return [], [
            _line(plan.custom_id, {"status_code": status, "request_id": _hex(), "body": body}, None)
        ]
    line = writer.success(plan)
    return ([line, line] if outcome == "duplicate" else [line]), []


def never_ran_line(custom_id: str, code: str) -> bytes:
    return _line(custom_id, None, {"code": code, "message": NEVER_RAN_MESSAGES[code]})


def parse_marker(marker: Any) -> tuple[str, int | None] | None:
    """``"http_500"`` → ("http_500", None); ``"http_500*2"`` → ("http_500", 2)."""
    if not isinstance(marker, str):
        return None
    name, star, count = marker.partition("*")
    if star:
        try:
            return name, int(count)
        except ValueError:
            return name, None
    return name, None
