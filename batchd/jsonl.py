"""One reader for the JSONL files batchd reads (task files, failed exports,
provider input files): one JSON object a line, blank lines skipped, a bad
line stops the read naming its file and line number.

A leaf module (orjson and the standard library): the client uses it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from batchd.errors import BatchdError


class JsonlError(BatchdError, ValueError):
    """A line of a JSONL file is not a JSON object."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


def objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line's number (1-based) and object, read as a stream."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise JsonlError(path, n, f"not valid JSON ({exc})") from None
            if not isinstance(doc, dict):
                raise JsonlError(path, n, "not a JSON object")
            yield n, doc
