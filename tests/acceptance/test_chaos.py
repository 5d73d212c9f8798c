"""The acceptance chaos run: 5,000 tasks from 3 clients sharing every
custom_id, spread over three providers (OpenAI, Anthropic and Gemini, each
through its own SDK and emulator), through 3 replicas, while replicas are
killed at random at least 10 times (kill -9 and crash points), the database
restarts once and every provider injects faults on its calls; then zero lost,
zero duplicated (the invariant checker audits all three emulators' records:
no request paid twice, none forgotten), every task in its expected terminal
state, and no client's task touched by another's (the isolation invariant).

The figures are printed (``-s``) and written to ``chaos-summary.json`` in
the test's tmp dir; ``BATCHD_CHAOS_SUMMARY=path`` writes them there too.
tests/acceptance/soak.py runs the same scenario longer.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import orjson
import pytest

from batchd.emulator.anthropic import AnthropicEmulator
from batchd.emulator.gemini import GeminiEmulator
from batchd.emulator.openai import Emulator
from tests.acceptance.chaos import Chaos
from tests.acceptance.procs import API_KEY, PrivatePostgres

pytestmark = pytest.mark.chaos


async def test_chaos_loses_nothing_and_pays_nothing_twice(
    private_pg: PrivatePostgres, private_db: str, emulator: tuple[Emulator, str], tmp_path: Path
) -> None:
    emu, url = emulator
    emu.in_progress_seconds = 0.5  # batches stay live while replicas die around them
    claude = AnthropicEmulator(API_KEY, in_progress_seconds=0.5)
    gem = GeminiEmulator(API_KEY, running_seconds=0.5)
    await claude.start()
    await gem.start()
    try:
        chaos = Chaos(
            private_pg,
            private_db,
            emu,
            url,
            tmp_path,
            tasks=5000,
            replicas=3,
            kills=10,
            pg_restarts=1,
            seed=4,
            clients=3,
            anthropic=claude,
            gemini=gem,
        )
        fig = await chaos.run()
    finally:
        await claude.stop()
        await gem.stop()
    summary = orjson.dumps(asdict(fig), option=orjson.OPT_INDENT_2)
    for path in [tmp_path / "chaos-summary.json", os.environ.get("BATCHD_CHAOS_SUMMARY")]:
        if path:
            Path(path).write_bytes(summary)  # noqa: ASYNC240 (once, after the run)
    print("\n" + fig.line())
    assert not fig.violations, fig.violations
    assert fig.lost == 0 and fig.duplicated == 0 and fig.wrong_state == 0
    assert fig.tasks == 5000 and sum(fig.by_state.values()) == 5000
    assert fig.clients == 3
    assert fig.kills >= 10 and fig.pg_restarts == 1 and fig.provider_faults_applied > 0
    assert fig.sigterm_exit_codes == [0, 0, 0]
    # Every provider carried its share of the load and created batches.
    assert set(fig.by_provider) == {"openai", "anthropic", "gemini"}
    assert all(sum(states.values()) > 1500 for states in fig.by_provider.values())
    assert claude.calls["create"] > 0 and gem.calls["create"] > 0
