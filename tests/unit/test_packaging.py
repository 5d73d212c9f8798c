"""`pip install batchd` is the client library: batchd.client and
batchd.signing import and work with the base dependencies alone, and the
command line names the extra it needs instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Everything the daemon needs that the client must not: each import of one
# of these raises, as it would where only the base dependencies are installed.
SERVER_ONLY = (
    "sqlalchemy",
    "asyncpg",
    "alembic",
    "openai",
    "anthropic",
    "google",
    "uvloop",
    "pgserver",
    "structlog",
    "prometheus_client",
    "pydantic",
    "pydantic_settings",
    "tiktoken",
    "tqdm",
    "msgspec",
)

_BLOCK = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {SERVER_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_base_dependencies_are_the_clients() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split("==")[0].lower() for d in project["dependencies"]}
    assert base == {"aiohttp", "orjson"}
    server = {
        d.split("==")[0].split("[")[0].lower() for d in project["optional-dependencies"]["server"]
    }
    assert {"sqlalchemy", "openai", "alembic", "asyncpg"} <= server
    assert [d.split("==")[0] for d in project["optional-dependencies"]["embedded"]] == ["pgserver"]


def test_the_client_and_signature_check_work_without_the_daemons_dependencies() -> None:
    done = _run(
        """
import asyncio, time
from batchd.client import BatchdClient, SyncBatchdClient, verify_callback
from batchd.signing import sign
body = b'{"custom_id": "t1", "state": "succeeded"}'
now = str(int(time.time()))
headers = {"Batchd-Timestamp": now, "Batchd-Signature": sign("s" * 32, now, body)}
assert verify_callback("s" * 32, headers, body)["custom_id"] == "t1"
async def build():
    async with BatchdClient("http://127.0.0.1:9", "token"):
        pass
asyncio.run(build())
SyncBatchdClient("http://127.0.0.1:9", "token").close()
print("ok", sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))
""".replace("BLOCKED", repr(SERVER_ONLY))
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []"


def test_the_command_line_names_the_extra_it_needs() -> None:
    done = _run("from batchd.entry import main; sys.exit(main())")
    assert done.returncode == 2
    assert "pip install 'batchd[server]'" in done.stderr
    assert "Traceback" not in done.stderr
