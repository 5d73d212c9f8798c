"""The shape every background loop shares: tick, log a failed tick, back off
while ticks keep failing (the database is down, say), and stop promptly."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

from batchd.domain import tick_delay
from batchd.logs import log_tick_failure


async def run_ticks(
    stop: asyncio.Event,
    tick: Callable[[], Awaitable[int]],
    *,
    logger: Any,
    event: str,
    interval: Callable[[int], float],
    wake: asyncio.Event | None = None,
) -> None:
    """Call ``tick`` until ``stop`` is set. ``interval(done)`` is the wait after
    a tick that did ``done`` units of work (0 to go again at once); ``wake``
    cuts a wait short when there is new work."""
    failures = 0
    while not stop.is_set():
        if wake is not None:
            wake.clear()  # before the tick: a wake during it is not lost
        done = 0
        try:
            done = await tick()
            failures = 0
        except Exception as exc:
            failures += 1
            log_tick_failure(logger, event, exc, failures)
        pause = interval(done)
        if pause <= 0 and failures == 0:
            continue
        await wait_first(stop, wake, tick_delay(failures, pause, random.random()))


async def wait_first(a: asyncio.Event, b: asyncio.Event | None, seconds: float) -> None:
    """Wait until either event is set, or ``seconds`` pass."""
    waiters = [asyncio.create_task(e.wait()) for e in (a, b) if e is not None]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
