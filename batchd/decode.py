"""Request bodies decoded in bounded pieces while they stream in.

Reading a whole body and then parsing it made a 63 MiB NDJSON body of ``{}``
lines cost the daemon 2.9 GB (a Python dict per three bytes) and held the
event loop for seconds. Here a body is read chunk by chunk and turned into
pieces of a few hundred KiB of tasks each; the byte limit and the task-count
limit are checked as the bytes and the tasks arrive, so a request over
either is refused (413) without reading the rest, and the caller validates
and stores one piece while the next is read (ingest.Ingest.store_stream).
Memory is the piece in hand and the one being stored, not the body.

- NDJSON: pieces end at a newline.
- ``{"tasks": [...]}``: pieces end where a task ends. A candidate end is a
  ``}`` followed by ``,`` or ``]``; the bytes up to it are parsed as a JSON
  array by orjson, which succeeds only when the cut falls between two tasks
  (a cut inside a task leaves a bracket or a string open). Candidates are
  tried a few at a time, then at doubling distances, so a task that holds
  many ``},`` costs a bounded number of parses, not one per candidate.
- Any other JSON body (one task object) is small by the task limits: it is
  read whole, up to a cap, and parsed at once.

Pieces are decoded straight into the contract's task type (contract.py), so
decoding and the checks a type states are one pass. When that pass fails,
the piece is parsed again as plain JSON, so a body is refused for the same
reason, in the same order, as plain JSON then task by task would: bad JSON
first, then too many tasks, then the first task that is not one.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson

from batchd.contract import Contract, TaskRequest
from batchd.domain import InvalidTask, Limits
from batchd.ingest import IngestError

# Bytes of tasks per piece: about two thousand ordinary tasks, a few
# milliseconds to parse; a request of one piece (most are) goes through the
# group commit as before.
PIECE_BYTES = 1024 * 1024
_WRAPPER = re.compile(rb'\s*\{\s*"tasks"\s*:\s*\[')
# The end of the body after its last task: the list and the object close.
_TAIL = re.compile(rb"\}\s*\]\s*\}\s*\Z")
_CLOSE = re.compile(rb"\s*\]\s*\}\s*\Z")
_CANDIDATE = re.compile(rb"\}\s*[,\]]")
_SPACE = re.compile(rb"\s*")
# Immediate next-candidate retries after a cut that fell inside a task,
# before the search jumps ahead.
_NEAR_TRIES = 4
# How msgspec says the JSON stopped early or went wrong at a byte.
_AT_BYTE = re.compile(r"\(byte (\d+)\)")
Piece = list[TaskRequest | InvalidTask]


def _stops_early(exc: Exception, size: int) -> bool:
    """Whether msgspec's error says the JSON of ``size`` bytes was fine but
    stopped early (a cut inside a task), rather than going wrong."""
    if isinstance(exc, msgspec.ValidationError):
        return False
    at = _AT_BYTE.search(str(exc))
    return "truncated" in str(exc) or (at is not None and int(at[1]) >= size - 1)


def task_bytes_cap(limits: Limits) -> int:
    """Most bytes one task may take in a body: its body's limit twice over
    (whitespace and escapes the compact form drops) and room for the rest."""
    return 2 * limits.task_body_bytes + 1024 * 1024


def too_large(max_bytes: int) -> IngestError:
    return IngestError(
        413,
        "payload_too_large",
        f"the request body is larger than {max_bytes} bytes; send fewer tasks per request",
    )


def too_many(max_tasks: int) -> IngestError:
    return IngestError(
        413, "too_many_tasks", f"a request may hold at most {max_tasks} tasks; split it"
    )


def task_too_large(index: int, max_task_bytes: int) -> IngestError:
    return IngestError(
        413,
        "task_too_large",
        f"task {index} is more than {max_task_bytes} bytes of JSON",
        {"index": index},
    )


class BodyPieces:
    """The task objects of one request body, a piece at a time.

    ``next()`` gives the next list of decoded tasks, or None once the body
    is done; a task that is not one is an InvalidTask in the list, where
    it stands (contract.Contract.convert). It raises IngestError for a body
    over ``max_bytes``, more than ``max_tasks`` tasks, a task over
    ``max_task_bytes`` of JSON, or JSON that does not parse.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        content_type: str,
        contract: Contract,
        *,
        max_bytes: int,
        max_tasks: int,
        max_task_bytes: int,
        stall_seconds: float = 10.0,
        piece_bytes: int = PIECE_BYTES,
    ) -> None:
        self._chunks = chunks
        self.contract = contract
        self.stall_seconds = stall_seconds
        self.ndjson = "ndjson" in content_type or "jsonl" in content_type
        self.max_bytes = max_bytes
        self.max_tasks = max_tasks
        self.max_task_bytes = max_task_bytes
        self.piece_bytes = piece_bytes
        self.received = 0
        self.tasks = 0  # decoded so far
        self._buf = bytearray()
        self._eof = False
        self._mode: str | None = None  # "ndjson", "array", "whole", "done"
        self._line = 0  # NDJSON lines consumed

    async def _read(self) -> bool:
        """Append the next chunk; False at the end of the body."""
        if self._eof:
            return False
        try:
            # A body that stops coming would hold its request (and, once
            # storing, a transaction) for as long as the caller likes.
            chunk = await asyncio.wait_for(anext(self._chunks, b""), self.stall_seconds)
        except TimeoutError:
            raise IngestError(
                408,
                "request_timeout",
                f"the body stalled for {self.stall_seconds:g}s; nothing was stored",
            ) from None
        if not chunk:
            self._eof = True
            return False
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise too_large(self.max_bytes)
        self._buf += chunk
        return True

    def _count(self, items: list[Any]) -> list[Any]:
        self.tasks += len(items)
        if self.tasks > self.max_tasks:
            raise too_many(self.max_tasks)
        return items

    def _tasks(self, items: list[Any]) -> Piece:
        """Plain JSON values, counted, then as tasks."""
        return self.contract.convert(self._count(items), self.tasks - len(items))

    def at_end(self) -> bool:
        """Whether the body is all read and nothing but its end is left, so
        the next ``next()`` would give None."""
        if self._mode == "done":
            return True
        if not self._eof:
            return False
        if self._mode == "array":
            return _CLOSE.match(self._buf) is not None
        return not self._buf.strip()

    async def next(self) -> Piece | None:
        if self._mode is None:
            self._mode = "ndjson" if self.ndjson else await self._json_mode()
        while True:
            if self._mode == "done":
                return None
            if self._mode == "ndjson":
                items = await self._ndjson_piece()
            elif self._mode == "array":
                items = await self._array_piece()
            else:
                items = await self._whole()
                self._mode = "done"
                return items
            if items is None:
                self._mode = "done"
                return None
            if items:
                return items

    # ------------------------------------------------------------- NDJSON

    async def _ndjson_piece(self) -> Piece | None:
        while len(self._buf) < self.piece_bytes and await self._read():
            pass
        cut = self._buf.rfind(b"\n", 0, self.piece_bytes * 2)
        if cut < 0:
            if not self._eof:
                # One line is longer than a piece: read on, up to a task's cap.
                while b"\n" not in self._buf and await self._read():
                    if len(self._buf) > self.max_task_bytes:
                        raise task_too_large(self.tasks, self.max_task_bytes)
                cut = self._buf.find(b"\n")
            if cut < 0:
                cut = len(self._buf)
            if cut == 0 and not self._buf:
                return None
        if cut > self.max_task_bytes and b"\n" not in self._buf[: self.max_task_bytes]:
            raise task_too_large(self.tasks, self.max_task_bytes)
        piece = bytes(self._buf[:cut])
        del self._buf[: cut + 1]
        n_lines = piece.count(b"\n") + 1
        if (
            self.tasks + n_lines > self.max_tasks
            and self.tasks + sum(1 for line in piece.split(b"\n") if line.strip()) > self.max_tasks
        ):
            raise too_many(self.max_tasks)  # before a line of them is parsed
        first_line = self._line + 1
        self._line += n_lines
        try:
            # The common case in one pass (blank lines skipped); a bad line
            # or task takes the loop below, which names the line, then the task.
            return self._count(self.contract.decode_lines(piece))
        except (ValueError, RecursionError):
            pass
        lines = piece.split(b"\n")
        items: list[Any] = []
        for n, line in enumerate(lines, start=first_line):
            if not line.strip():
                continue
            if len(line) > self.max_task_bytes:
                raise task_too_large(self.tasks + len(items), self.max_task_bytes)
            try:
                items.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise IngestError(
                    400, "invalid_json", f"line {n} is not valid JSON: {exc}"
                ) from None
        return self._tasks(items)

    # --------------------------------------------------------------- JSON

    async def _json_mode(self) -> str:
        while len(self._buf) < 64 and await self._read():
            pass
        match = _WRAPPER.match(self._buf)
        if match is None:
            return "whole"
        del self._buf[: match.end()]
        return "array"

    async def _whole(self) -> Piece:
        """A body that is not ``{"tasks": [...]}``: one task, read whole."""
        cap = self.max_task_bytes
        while await self._read():
            if len(self._buf) > cap:
                raise task_too_large(0, cap)
        raw = bytes(self._buf)
        self._buf.clear()
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise IngestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
        if isinstance(doc, dict) and "tasks" in doc and "custom_id" not in doc:
            tasks = doc["tasks"]
            if not isinstance(tasks, list):
                raise IngestError(400, "invalid_request", '"tasks" must be a list of task objects')
            if len(doc) > 1:
                other = sorted(k for k in doc if k != "tasks")[0]
                raise IngestError(
                    400, "invalid_request", f'{other!r} is not a known field beside "tasks"'
                )
            return self._tasks(tasks)
        return self._tasks([doc])

    async def _skip_space(self) -> bool:
        """Skip whitespace at the head of the buffer; False at the end of the body."""
        while True:
            end = _SPACE.match(self._buf).end()  # type: ignore[union-attr]
            del self._buf[:end]
            if self._buf:
                return True
            if not await self._read():
                return False

    async def _array_piece(self) -> Piece | None:
        if not await self._skip_space():
            raise IngestError(400, "invalid_json", "the body ends inside the tasks list")
        if self._buf[0] == ord("]"):
            await self._array_end()
            return None
        if self._buf[0] == ord(","):
            if self.tasks == 0:
                raise IngestError(
                    400, "invalid_json", "the body is not valid JSON: a comma opens the tasks list"
                )
            del self._buf[:1]
            if not await self._skip_space():
                raise IngestError(400, "invalid_json", "the body ends inside the tasks list")
        if self._buf[0] != ord("{"):
            raise IngestError(
                400,
                "invalid_task",
                f"task {self.tasks}: task must be a JSON object",
                {"index": self.tasks, "custom_id": None, "field": "task"},
            )
        search_from = self.piece_bytes
        tries = 0
        last = False
        while True:
            found = _CANDIDATE.search(self._buf, min(search_from, len(self._buf)))
            if found is None:
                if len(self._buf) > self.piece_bytes + self.max_task_bytes:
                    raise task_too_large(self.tasks, self.max_task_bytes)
                if await self._read():
                    continue
                # The whole body is in: the rest is the last piece, up to
                # the brace that closes the last task.
                found = _TAIL.search(self._buf)
                if found is None:
                    raise IngestError(
                        400,
                        "invalid_json",
                        f"the body ends inside task {self.tasks} or is not valid JSON",
                    )
                last = True
            brace = found.start()
            doc = b"[" + self._buf[: brace + 1] + b"]"
            items: list[Any] | None = None
            try:
                tasks = self.contract.decode_list(doc)
            except (ValueError, RecursionError) as exc:
                if last or not _stops_early(exc, len(doc)):
                    items = self._plain(doc, last)
            else:
                del self._buf[: brace + 1]
                return self._count(tasks)
            if items is None:
                # The cut fell inside a task: try further on.
                tries += 1
                search_from = brace + 1 if tries < _NEAR_TRIES else 2 * (brace + 1)
                if brace > self.piece_bytes + self.max_task_bytes:
                    raise task_too_large(self.tasks, self.max_task_bytes) from None
                continue
            del self._buf[: brace + 1]
            return self._tasks(items)

    def _plain(self, doc: bytes, last: bool) -> list[Any] | None:
        """``doc`` as plain JSON values; None when it stops inside a task."""
        try:
            items: list[Any] = orjson.loads(doc)
        except orjson.JSONDecodeError as exc:
            if exc.pos < len(doc) - 1 or last:
                raise IngestError(
                    400,
                    "invalid_json",
                    f"the body is not valid JSON in or after task {self.tasks}: {exc.msg}",
                ) from None
            return None
        return items

    async def _array_end(self) -> None:
        """After the tasks list: only ``}`` and whitespace may follow."""
        del self._buf[:1]
        while await self._read():
            if len(self._buf) > 1024:
                break
        if bytes(self._buf).strip() != b"}":
            raise IngestError(
                400,
                "invalid_request",
                '"tasks" must be the only field of '
                "the request object, and the body must end after it",
            )
