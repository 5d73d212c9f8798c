"""The shared loop: a failing tick never ends it, a backlog goes again at once,
and stop ends it promptly."""

from __future__ import annotations

import asyncio

import structlog

from batchd.loops import run_ticks


async def test_a_failing_tick_is_retried_and_stop_ends_the_loop() -> None:
    stop = asyncio.Event()
    calls: list[int] = []

    async def tick() -> int:
        calls.append(len(calls))
        if len(calls) <= 2:
            raise RuntimeError("database down")
        if len(calls) == 4:
            stop.set()
        return 0

    await asyncio.wait_for(
        run_ticks(
            stop,
            tick,
            logger=structlog.get_logger("t"),
            event="t.tick_failed",
            interval=lambda _n: 0.01,
        ),
        30,
    )
    assert len(calls) == 4


async def test_a_backlog_ticks_again_without_waiting() -> None:
    stop = asyncio.Event()
    backlog = [5, 5, 5, 0]

    async def tick() -> int:
        done = backlog.pop(0)
        if not backlog:
            stop.set()
        return done

    # An hour's pause after an idle tick: only the backlog rule lets this finish.
    await asyncio.wait_for(
        run_ticks(
            stop,
            tick,
            logger=structlog.get_logger("t"),
            event="t.tick_failed",
            interval=lambda done: 0 if done else 3600,
        ),
        30,
    )
    assert backlog == []


async def test_wake_cuts_the_wait_short() -> None:
    stop, wake = asyncio.Event(), asyncio.Event()
    ticks = 0

    async def tick() -> int:
        nonlocal ticks
        ticks += 1
        if ticks == 2:
            stop.set()
        return 0

    loop = asyncio.create_task(
        run_ticks(
            stop,
            tick,
            logger=structlog.get_logger("t"),
            event="t.tick_failed",
            interval=lambda _n: 3600,
            wake=wake,
        )
    )
    await asyncio.sleep(0.05)
    wake.set()
    await asyncio.wait_for(loop, 30)
    assert ticks == 2
