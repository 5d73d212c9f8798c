"""`batchd demo --providers openai,anthropic,gemini` as the README gives it,
in its own process (the demo configures logging for the whole process): a
mixed load through all three emulators, each driven by its provider's SDK,
settles and the report shows each provider's share."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path


async def _demo(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchd",
        "demo",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=180)
    return proc.returncode or 0, out.decode(), err.decode()


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCHD_", "OPENAI_", "ANTHROPIC_", "GEMINI_", "AZURE_OPENAI_"))
    }
    return {**env, **extra}


async def test_demo_sends_a_mixed_load_through_three_providers(db_url: str, tmp_path: Path) -> None:
    code, out, err = await _demo(
        "--tasks",
        "90",
        "--timeout",
        "120",
        "--providers",
        "openai,anthropic,gemini",
        env=_env(BATCHD_DATABASE_URL=db_url, BATCHD_DATA_DIR=str(tmp_path)),
    )
    assert code == 0, out + err
    creates = out.split("batch creates by provider: ")[1].split(";")[0]
    counts = dict(part.split() for part in creates.split(", "))
    assert set(counts) == {"openai", "anthropic", "gemini"}
    assert all(int(n) > 0 for n in counts.values()), creates
    # The report's table by provider: a row for each of the three.
    table = out.split("provider")[-1]
    for name in ("openai", "anthropic", "gemini"):
        assert f" {name} " in table, out


async def test_demo_refuses_an_unknown_provider(tmp_path: Path) -> None:
    code, _, err = await _demo(
        "--providers", "openai,bedrock", env=_env(BATCHD_DATA_DIR=str(tmp_path))
    )
    assert code == 2 and "--providers: bedrock" in err
