"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.fuzz_hooks): how to send an
NDJSON body, which the OpenAPI document describes as an array of tasks."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(_ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    items = value if isinstance(value, list) else [value]
    return b"\n".join(json.dumps(item).encode() for item in items)
