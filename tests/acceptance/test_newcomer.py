"""The first hour as a newcomer meets it: the README's own commands, and a
wrong key, run as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.acceptance.conftest import FAST, Cluster
from tests.acceptance.procs import chat_task

_ROOT = Path(__file__).resolve().parents[2]
_VENV_BIN = _ROOT / ".venv" / "bin"
# The README's commands use fixed ports (8099 for the emulator, batchd's
# default 8080): one run at a time on this machine, whoever runs it.
_PORT_LOCK = Path(tempfile.gettempdir()) / "batchd-readme-ports.lock"


def readme_commands() -> list[str]:
    """The shell block the README marks as the newcomer's commands."""
    text = (_ROOT / "README.md").read_text()
    found = re.search(r"<!-- newcomer:[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert found, "README.md lost its newcomer block"
    return [line for line in found.group(1).splitlines() if line.strip()]


@contextlib.contextmanager
def _ports_held() -> Iterator[None]:
    with _PORT_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.asynccontextmanager
async def _shell(
    command: str, env: dict[str, str], cwd: Path, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_shell(
            command,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


async def _until(http: aiohttp.ClientSession, url: str, ok: Any, within: float) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as r:
                last = (r.status, await r.json(content_type=None))
                if ok(*last):
                    return last[1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url}: still {last} after {within} s")


async def test_the_readme_emulator_commands_run_a_task(shared_db: str, tmp_path: Path) -> None:
    emulator_cmd, serve_cmd = readme_commands()
    assert emulator_cmd == "python -m batchd.emulator.openai --port 8099"
    assert serve_cmd == "BATCHD_OPENAI_BASE_URL=http://127.0.0.1:8099/v1 batchd serve"
    # The shell a newcomer has after `. .venv/bin/activate`: no key, no
    # batchd settings but the database (the README's serve would start an
    # embedded one; the tests use their own server) and a short window, so
    # the batch goes out within the test.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHD_", "OPENAI_"))}
    env.update(
        {
            "PATH": f"{_VENV_BIN}:{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(_VENV_BIN.parent),
            "BATCHD_DATABASE_URL": shared_db,
            "BATCHD_WINDOW_SECONDS": "1",
            "BATCHD_POLL_INTERVAL_SECONDS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    with _ports_held():
        async with (
            _shell(emulator_cmd, env, tmp_path, tmp_path / "emulator.log"),
            _shell(serve_cmd, env, tmp_path, tmp_path / "serve.log") as serve,
            aiohttp.ClientSession() as http,
        ):
            api = "http://127.0.0.1:8080"
            try:
                await _until(http, f"{api}/readyz", lambda s, b: s == 200, 60)
                async with http.post(f"{api}/v1/tasks", json=chat_task("newcomer-1")) as r:
                    assert r.status == 202, await r.text()
                task = await _until(
                    http,
                    f"{api}/v1/tasks/newcomer-1",
                    lambda s, b: b.get("state") in ("succeeded", "failed"),
                    60,
                )
            finally:
                log = (tmp_path / "serve.log").read_text(errors="replace")
            assert task["state"] == "succeeded", (task, log[-3000:])
            assert task["attempts"] == 1 and task["response"]["object"] == "chat.completion"
            assert task["location"]["stage"] == "routed"
            assert "credentials_rejected" not in log
            assert serve.returncode is None


async def test_a_wrong_key_is_logged_once_counted_and_shown_within_one_poll(
    shared_db: str, emulator: Any, cluster: Cluster
) -> None:
    emu, url = emulator
    emu.api_key = "sk-the-right-one"  # the replica sends the tests' own key
    (replica,) = await cluster(shared_db, url, 1, **{**FAST, "window_seconds": 0.2})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{replica.url}/v1/tasks", json=chat_task("wrong-1")) as r:
            assert r.status == 202
        # One scheduler tick (0.2 s) after the window: refused, logged, counted.
        ready = await _until(
            http, f"{replica.url}/readyz", lambda s, b: b.get("status") == "degraded", 10
        )
        assert ready["provider"]["openai"]["status"] == 401
        assert "OPENAI_API_KEY" in ready["provider"]["openai"]["fix"]
        async with http.get(f"{replica.url}/metrics") as r:
            exposed = await r.text()
        refused = re.search(
            r'batchd_provider_requests_total\{code="401",operation="upload_file"\}'
            r" ([0-9.e+]+)",
            exposed,
        )
        assert refused and float(refused.group(1)) >= 1, exposed[:2000]
        # It keeps being refused (the backoff retries), but is logged once.
        await asyncio.sleep(6)
        errors = replica.events("provider.credentials_rejected")
        assert len(errors) == 1, errors
        assert errors[0]["level"] == "error" and errors[0]["status"] == 401
        async with http.get(f"{replica.url}/v1/tasks/wrong-1") as r:
            task = await r.json()
        assert (task["state"], task["attempts"]) == ("queued", 0), task
    assert emu.calls["create_batch"] == 0
