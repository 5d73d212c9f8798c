"""The chaos scenario at any size, outside pytest:

    .venv/bin/python -m tests.acceptance.soak --tasks 50000 --kills 100 --pg-restarts 3

Starts its own PostgreSQL (initdb + pg_ctl, never the shared server), an
emulator and the replicas; prints one CHAOS line of figures and exits 1 if
any invariant broke. ``--summary FILE`` also writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import orjson
from alembic import command

from batchd.emulator.openai import Emulator
from batchd.service import alembic_config
from batchd.store.engine import async_url
from tests.acceptance.chaos import Chaos
from tests.acceptance.procs import API_KEY, PrivatePostgres, find_pg_bindir
from tests.conftest import _admin


async def soak(args: argparse.Namespace) -> int:
    bindir = find_pg_bindir()
    if bindir is None:
        print("soak: no initdb/pg_ctl found; set BATCHD_TEST_PG_BINDIR", file=sys.stderr)
        return 2
    pg = PrivatePostgres(bindir)
    await asyncio.to_thread(pg.init)
    emu = Emulator(api_key=API_KEY, in_progress_seconds=args.in_progress_seconds, seed=args.seed)
    try:
        await _admin(pg.url, 'CREATE DATABASE "batchd_soak"')
        url = pg.url.rsplit("/", 1)[0] + "/batchd_soak"
        await asyncio.to_thread(command.upgrade, alembic_config(async_url(url)), "head")
        emu_url = await emu.start()
        workdir = Path(tempfile.mkdtemp(prefix="batchd-soak-"))
        chaos = Chaos(
            pg,
            url,
            emu,
            emu_url,
            workdir,
            tasks=args.tasks,
            replicas=args.replicas,
            kills=args.kills,
            pg_restarts=args.pg_restarts,
            seed=args.seed,
            settle_within=args.settle_within,
        )
        fig = await chaos.run()
    finally:
        await emu.stop()
        await asyncio.to_thread(pg.destroy)
    print(fig.line())
    print(f"replica logs: {workdir}")
    if args.summary:
        Path(args.summary).write_bytes(  # noqa: ASYNC240 (once, at the end)
            orjson.dumps(asdict(fig), option=orjson.OPT_INDENT_2)
        )
    for v in fig.violations:
        print(f"VIOLATION {v}", file=sys.stderr)
    return 1 if fig.violations else 0


def main() -> None:
    # A replica killed mid-request makes the in-process emulator's server log a
    # reset connection; that is the point of the exercise, not news.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    p = argparse.ArgumentParser(
        prog="python -m tests.acceptance.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--kills", type=int, default=40, help="at least this many replica deaths")
    p.add_argument("--pg-restarts", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--in-progress-seconds", type=float, default=0.5, help="how long each emulated batch runs"
    )
    p.add_argument(
        "--settle-within",
        type=float,
        default=1800,
        help="seconds allowed after the havoc for every task to settle",
    )
    p.add_argument("--summary", default=None, help="also write the figures as JSON here")
    sys.exit(asyncio.run(soak(p.parse_args())))


if __name__ == "__main__":
    main()
