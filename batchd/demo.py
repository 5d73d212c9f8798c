"""`batchd demo`: the daemon, the bundled emulators and a generated mixed load,
on short windows, then the report. Runs on a fresh machine with no key.
``--providers openai,anthropic,gemini`` sends the load through each
provider's emulator with the real SDK of each."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import Any

from pydantic import SecretStr

from batchd.client import BatchdClient, JobNotFinished
from batchd.config import Settings
from batchd.emulator.anthropic import AnthropicEmulator
from batchd.emulator.gemini import GeminiEmulator
from batchd.emulator.openai import Emulator
from batchd.progress import JobBar, job_line
from batchd.report import render_table
from batchd.service import Service, build_provider, migrate, open_engine

_MODELS = [
    ("/v1/chat/completions", "gpt-4o-mini"),
    ("/v1/chat/completions", "gpt-4.1-nano"),
    ("/v1/embeddings", "text-embedding-3-small"),
]
# Outcomes the emulator scripts into the load: transient faults that retries
# absorb, and a few lines no retry can save (they land in the manual queue).
_FAILURE_RATES = {"http_500": 0.03, "http_429": 0.02, "batch_expired": 0.01, "http_400": 0.005}
DEMO_PROVIDERS = ("openai", "anthropic", "gemini")


def _claude_task(i: int, rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": rng.choice(["claude-sonnet-4-5", "claude-haiku-4-5"]),
        "max_tokens": rng.choice([32, 64, 128]),
        "messages": [
            {
                "role": "user",
                "content": f"summarise ticket {i}: "
                + "the printer is on fire " * rng.randint(1, 20),
            }
        ],
    }
    roll = rng.random()
    if roll < 0.03:
        body["metadata"] = {"emulate": "overloaded*1"}  # retried, then fine
    elif roll < 0.035:
        body["metadata"] = {"emulate": "invalid_request"}  # the manual queue
    elif roll < 0.2:
        body["metadata"] = {"cache_read_tokens": 40, "cache_write_tokens": 10}
    return {"custom_id": f"demo-{i:06d}", "endpoint": "/v1/messages", "body": body}


def _gemini_task(i: int, rng: random.Random) -> dict[str, Any]:
    prompt = f"tag ticket {i}: " + "the printer is on fire " * rng.randint(1, 20)
    body: dict[str, Any] = {
        "model": rng.choice(["gemini-2.5-flash", "gemini-2.5-flash-lite"]),
        "contents": [{"role": "user", "parts": [{"text": prompt}]}],
        "generationConfig": {"maxOutputTokens": rng.choice([32, 64, 128])},
    }
    roll = rng.random()
    if roll < 0.03:
        body["emulate"] = "unavailable*1"
    elif roll < 0.035:
        body["emulate"] = "invalid_argument"
    return {"custom_id": f"demo-{i:06d}", "endpoint": "/v1beta/generateContent", "body": body}


def _task(i: int, rng: random.Random, providers: list[str] | None = None) -> dict[str, Any]:
    provider = rng.choice(providers or ["openai"])
    if provider == "anthropic":
        return _claude_task(i, rng)
    if provider == "gemini":
        return _gemini_task(i, rng)
    endpoint, model = rng.choice(_MODELS)
    body: dict[str, Any]
    if endpoint == "/v1/embeddings":
        body = {"model": model, "input": f"document {i}: " + "lorem ipsum " * rng.randint(5, 40)}
    else:
        body = {
            "model": model,
            "max_tokens": rng.choice([32, 64, 128]),
            "messages": [
                {
                    "role": "user",
                    "content": f"classify ticket {i}: "
                    + "the printer is on fire " * rng.randint(1, 20),
                }
            ],
        }
    task: dict[str, Any] = {"custom_id": f"demo-{i:06d}", "endpoint": endpoint, "body": body}
    if rng.random() < 0.05:
        task["lane"] = "sync"  # someone is waiting on these
    return task


async def run_demo(
    base: Settings, *, tasks: int, give_up_after: float, providers: list[str] | None = None
) -> int:
    providers = providers or ["openai"]
    emulator = Emulator(
        api_key="demo-key",
        failure_rates=_FAILURE_RATES,
        seed=7,
        in_progress_seconds=1.0,
        sync_latency_seconds=(0.2, 1.5),
    )
    emu_url = await emulator.start()
    claude = AnthropicEmulator("demo-key", in_progress_seconds=1.0)
    gemini = GeminiEmulator("demo-key", running_seconds=1.0)
    extra: dict[str, Any] = {}
    if "anthropic" in providers:
        extra.update(
            anthropic_base_url=await claude.start(), anthropic_api_key=SecretStr("demo-key")
        )
    if "gemini" in providers:
        extra.update(gemini_base_url=await gemini.start(), gemini_api_key=SecretStr("demo-key"))
    settings = base.model_copy(
        update={
            **extra,
            "openai_base_url": emu_url,
            "openai_api_key": SecretStr("demo-key"),
            "window_seconds": min(base.window_seconds, 3.0),
            "max_batch_items": min(base.max_batch_items, 200),
            "poll_interval_seconds": min(base.poll_interval_seconds, 1.0),
            "retry_backoff_seconds": min(base.retry_backoff_seconds, 1.0),
            "scheduler_interval_seconds": 0.5,
            "http_port": 0,
        }
    )
    engine, url = await open_engine(settings)
    await migrate(url)
    service = Service(settings, engine, build_provider(settings))
    stop, started = asyncio.Event(), asyncio.Event()
    runner = asyncio.create_task(service.run(stop, started))
    await started.wait()
    api = f"http://127.0.0.1:{service.port}"
    print(
        f"batchd demo: API on {api}, providers {', '.join(providers)} on their emulators, "
        f"sending {tasks} tasks"
    )
    rng = random.Random(42)
    run_tag = f"{int(time.time())}"
    t0 = time.monotonic()
    job = f"demo-{run_tag}"
    try:
        async with BatchdClient(api) as client:
            load = [_task(i, rng, providers) for i in range(tasks)]
            for t in load:
                t["custom_id"] = f"{t['custom_id']}-{run_tag}"
            await client.submit(load, chunk=500, job=job, concurrency=4)
            print(f"submitted {tasks} tasks as job {job}; `batchd job {job}` shows it")
            bar = JobBar(job)
            shown = [0.0]

            def progress(view: dict[str, Any]) -> None:
                bar(view)
                if not sys.stderr.isatty() and time.monotonic() - shown[0] >= 5:
                    shown[0] = time.monotonic()
                    print(f"  {time.monotonic() - t0:5.1f}s  {job_line(view)}")

            try:
                view = await client.wait_job(
                    job,
                    timeout=max(1.0, give_up_after - (time.monotonic() - t0)),
                    progress=progress,
                    min_tasks=tasks,
                )
            except JobNotFinished as exc:
                view = exc.job
            bar.close()
            pending = view["queued"] + view["submitted"]
            print(job_line(view))
        report = await service.reporter.daily()
        print()
        print(render_table(report))
        creates = {
            "openai": emulator.calls.get("create", 0),
            "anthropic": claude.calls.get("create", 0),
            "gemini": gemini.calls.get("create", 0),
        }
        print(
            "\nbatch creates by provider: "
            + ", ".join(f"{p} {creates[p]}" for p in providers)
            + f"; archive in {settings.archive_path}"
        )
        return 0 if pending == 0 else 1
    finally:
        stop.set()
        await runner
        await engine.dispose()
        await emulator.stop()
        await claude.stop()
        await gemini.stop()
