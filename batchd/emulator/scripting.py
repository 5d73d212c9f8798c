"""The scripting surface the Anthropic and Gemini emulators share: per-line
outcomes, batch-level behaviours and injected faults, each checked against
the emulator's own vocabulary (class attributes) when queued."""

from __future__ import annotations

import collections
from typing import Any, ClassVar

import orjson


class Scripted:
    OUTCOMES: ClassVar[frozenset[str]]
    ROUTES: ClassVar[frozenset[str]]
    FAULT_KINDS: ClassVar[frozenset[str]]
    BATCH_SCRIPTS: ClassVar[frozenset[str]]

    def __init__(self) -> None:
        self.faults_applied: collections.Counter[str] = collections.Counter()
        self._line_scripts: dict[str, collections.deque[str]] = {}
        self._batch_scripts: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self._faults: dict[str, collections.deque[list[Any]]] = {}
        self._marked: collections.Counter[bytes] = collections.Counter()

    def script_line(self, key: str, *outcomes: str) -> None:
        """Queue outcomes for the next submissions of ``key``, one each."""
        bad = set(outcomes) - self.OUTCOMES
        if bad:
            raise ValueError(f"unknown outcomes {sorted(bad)}; known: {sorted(self.OUTCOMES)}")
        self._line_scripts.setdefault(key, collections.deque()).extend(outcomes)

    def script_batch(self, kind: str, **params: Any) -> None:
        """Queue a batch-level behaviour for the next created batch."""
        if kind not in self.BATCH_SCRIPTS:
            raise ValueError(
                f"unknown batch script {kind!r}; known: {sorted(self.BATCH_SCRIPTS)}")
        self._batch_scripts.append((kind, params))

    def inject(self, route: str, fault: str, times: int = 1, **params: Any) -> None:
        """Answer the next ``times`` requests to ``route`` with ``fault``."""
        if route not in self.ROUTES:
            raise ValueError(f"unknown route {route!r}; known: {sorted(self.ROUTES)}")
        if fault not in self.FAULT_KINDS:
            raise ValueError(f"unknown fault {fault!r}; known: {sorted(self.FAULT_KINDS)}")
        self._faults.setdefault(route, collections.deque()).append([fault, times, params])

    def clear_faults(self) -> None:
        """Drop the faults not applied yet: the provider has recovered."""
        self._faults.clear()

    def _take_fault(self, route: str) -> tuple[str, dict[str, Any]] | None:
        """The fault due for this request to ``route``, if any (and count it)."""
        queue = self._faults.get(route)
        if not queue:
            return None
        entry = queue[0]
        entry[1] -= 1
        if entry[1] <= 0:
            queue.popleft()
        self.faults_applied[f"{route}:{entry[0]}"] += 1
        return str(entry[0]), entry[2]

    def _scripted_outcome(self, key: str) -> str | None:
        """The next queued outcome for ``key``, if one was scripted."""
        queue = self._line_scripts.get(key)
        return queue.popleft() if queue else None

    def _marked_outcome(self, marker: Any, request: dict[str, Any]) -> str:
        """A body marker: ``outcome`` every time, or ``outcome*N`` for the first
        N submissions of the same request, then ``ok`` (so a retried request
        can succeed). Counted by the request's content, which stays the same
        across attempts while batchd's line id changes."""
        if not isinstance(marker, str):
            return "ok"
        name, star, count = marker.partition("*")
        if name not in self.OUTCOMES:
            return "ok"
        if not star:
            return name
        digest = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
        self._marked[digest] += 1
        return name if self._marked[digest] <= (int(count) if count.isdigit() else 1) else "ok"
