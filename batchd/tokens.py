"""Input tokens of a request, counted offline, for the daily budget's estimate.

For OpenAI models with a known encoding (o200k_base: gpt-4o, gpt-4.1, gpt-5,
o-series; cl100k_base: gpt-4, gpt-3.5, text-embedding-*) the count is
tiktoken's, on vocabularies shipped in ``batchd/vocab`` (tiktoken would
download them at run time). Chat messages are counted as OpenAI bills them:
3 tokens of framing per message plus its role, name and content, and 3 that
prime the reply. Parts that cannot be counted as text (images, audio, files)
take the high-side byte rule (two bytes a token), and tool definitions and
response formats are counted as their JSON.

A model with no tokenizer here (another provider's, a fine-tune of an
unknown base) gets None: the budget then calibrates a byte-based estimate
from the usage batchd has seen for that model (domain.calibrated_input).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import math
import threading
from importlib import resources
from typing import Any

import orjson
import tiktoken
from tiktoken.model import encoding_name_for_model

from batchd.errors import BatchdError

# tiktoken's own pins for the files it would download.
_HASHES = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_PATTERNS = {
    "cl100k_base": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
}
_SPECIAL = {
    "cl100k_base": {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}
# OpenAI's chat framing: per message, and once to prime the reply.
MESSAGE_TOKENS = 3
REPLY_TOKENS = 3
NAME_TOKENS = 1

_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}


class VocabularyError(BatchdError, RuntimeError):
    """A shipped tokenizer vocabulary is damaged (its SHA-256 does not match)."""


def _load(name: str) -> tiktoken.Encoding:
    enc = _loaded.get(name)
    if enc is not None:
        return enc
    with _lock:
        enc = _loaded.get(name)
        if enc is not None:
            return enc
        raw = gzip.decompress(
            resources.files("batchd.vocab").joinpath(f"{name}.tiktoken.gz").read_bytes()
        )
        if hashlib.sha256(raw).hexdigest() != _HASHES[name]:
            raise VocabularyError(f"batchd/vocab/{name}.tiktoken.gz is damaged: reinstall batchd")
        ranks = {
            base64.b64decode(token): int(rank)
            for token, rank in (line.split() for line in raw.splitlines() if line)
        }
        enc = tiktoken.Encoding(
            name, pat_str=_PATTERNS[name], mergeable_ranks=ranks, special_tokens=_SPECIAL[name]
        )
        _loaded[name] = enc
        return enc


@functools.lru_cache(maxsize=1024)
def encoding_for(model: str) -> str | None:
    """The shipped encoding that counts ``model``'s tokens, or None."""
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return None
    return name if name in _HASHES else None


def preload(models: list[str]) -> None:
    """Load the encodings these models need now (0.3-0.5 s each), not on
    the first request that names one."""
    for name in {encoding_for(m) for m in models} - {None}:
        assert name is not None
        _load(name)


# Prompts repeat (a system prompt shared by a whole job, an eval's template):
# texts up to this size are counted once per encoding and remembered.
_CACHED_CHARS = 8192


@functools.lru_cache(maxsize=4096)
def _cached(name: str, value: str) -> int:
    return len(_load(name).encode_ordinary(value))


def _text(enc: tiktoken.Encoding, value: str) -> int:
    if len(value) <= _CACHED_CHARS:
        return _cached(enc.name, value)
    return len(enc.encode_ordinary(value))


def _high_side_bytes(value: Any) -> int:
    return math.ceil(len(orjson.dumps(value)) / 2)


def _content(enc: tiktoken.Encoding, content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return _text(enc, content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                total += _text(enc, part["text"])
            else:
                total += _high_side_bytes(part)
        return total
    return _high_side_bytes(content)


def _chat(enc: tiktoken.Encoding, body: dict[str, Any]) -> int:
    total = REPLY_TOKENS
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            total += _high_side_bytes(message)
            continue
        total += MESSAGE_TOKENS
        for key, value in message.items():
            if key == "content":
                total += _content(enc, value)
            elif key == "name" and isinstance(value, str):
                total += NAME_TOKENS + _text(enc, value)
            elif isinstance(value, str):
                total += _text(enc, value)
            else:  # tool_calls and the like
                total += _text(enc, orjson.dumps(value).decode())
    return total + _extras(enc, body)


def _extras(enc: tiktoken.Encoding, body: dict[str, Any]) -> int:
    """Tool and function definitions and a structured response format: the
    provider renders them into the prompt; their JSON counts high."""
    return sum(
        _text(enc, orjson.dumps(body[key]).decode())
        for key in ("tools", "functions", "response_format", "text")
        if body.get(key) is not None
    )


def _inputs(enc: tiktoken.Encoding, value: Any) -> int:
    """embeddings / moderations / responses / completions inputs."""
    if isinstance(value, str):
        return _text(enc, value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # already tokens
        return sum(_inputs(enc, v) for v in value)
    if isinstance(value, dict):
        if value.get("type") in ("message", None) and "content" in value:
            return MESSAGE_TOKENS + _content(enc, value.get("content"))
        if isinstance(value.get("text"), str):
            return _text(enc, value["text"])
        return _high_side_bytes(value)
    return _high_side_bytes(value)


def count_input_tokens(endpoint: str, model: str, body: dict[str, Any]) -> int | None:
    """Input tokens of ``body`` as the provider counts them, or None when
    there is no tokenizer for ``model``."""
    name = encoding_for(model)
    if name is None:
        return None
    enc = _load(name)
    if endpoint == "/v1/chat/completions":
        return _chat(enc, body)
    if endpoint == "/v1/responses":
        total = _inputs(enc, body.get("input"))
        if isinstance(body.get("instructions"), str):
            total += _text(enc, body["instructions"])
        return total + REPLY_TOKENS + _extras(enc, body)
    if endpoint == "/v1/completions":
        return _inputs(enc, body.get("prompt"))
    return _inputs(enc, body.get("input"))
