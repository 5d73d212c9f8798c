"""schemathesis against the live API: a real socket, real PostgreSQL, every
check it has (no 5xx, status codes, headers, content types and bodies as
documented, schema-invalid input refused, schema-valid input accepted,
auth not ignored, 405 with Allow for undocumented methods).

Bounded by FUZZ_EXAMPLES per operation (default 25) and a fixed
seed, so CI runs the same cases each time; raise the count locally to dig.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.harness import running

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]
CALLER = "fuzz-caller"  # the bearer token schemathesis sends
SIGNING = "fuzz-callbacks-key-0123456789abcdef"  # signs callbacks (none is sent: no task finishes)


def _keep(text: str) -> None:
    """FUZZ_LOG=path keeps the whole schemathesis report for reading."""
    if os.environ.get("FUZZ_LOG"):
        Path(os.environ["FUZZ_LOG"]).write_text(text)


async def test_schemathesis_finds_nothing(db_url: str, tmp_path: Path) -> None:
    examples = os.environ.get("FUZZ_EXAMPLES", "25")
    seed = os.environ.get("FUZZ_SEED", "7")
    # ?wait would hold a request open; a second is enough to cover it.
    # Callbacks on, so the document offers callback_url and it is fuzzed too.
    async with running(
        db_url,
        tmp_path,
        ingest_tokens=CALLER,
        max_wait_seconds=1,
        callback_allowed_hosts="*",
        callback_secret=SIGNING,
    ) as h:
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
            "PYTHONPATH": str(ROOT),
            "NO_COLOR": "1",
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(ROOT / "tests" / "schemathesis.toml"),
            "run",
            f"{h.base_url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            examples,
            "--seed",
            seed,
            "--workers",
            "1",
            "--phases",
            "examples,coverage,fuzzing",
            "--header",
            f"Authorization: Bearer {CALLER}",
            "--request-timeout",
            "30",
            "--suppress-health-check",
            "all",
            "--max-failures",
            "20",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path / "report"),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        _keep(text)
        assert proc.returncode == 0, text[-20000:]
        assert "No issues found" in text or "passed" in text, text[-5000:]
        # The harness also checked every reply against the document.
        assert h.spec.checked > 100
