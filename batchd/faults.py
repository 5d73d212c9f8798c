"""Crash points for the crash-safety tests.

``BATCHD_CRASH_AT=<point>[:<n>]`` makes the process die (``os._exit``, no
cleanup, like kill -9) the n-th time (default first) it reaches ``point``.
Unset, which is always the case in production, a crash point is one dict
lookup. Points: after_claim, after_upload, after_create, mid_route,
after_route.
"""

from __future__ import annotations

import os
import sys

EXIT_CODE = 86
_target = os.environ.get("BATCHD_CRASH_AT", "")
_name, _, _nth = _target.partition(":")
_remaining = int(_nth or 1) if _name else 0


def crash_point(name: str) -> None:
    global _remaining
    if not _name or name != _name:
        return
    _remaining -= 1
    if _remaining <= 0:
        sys.stderr.write(f"batchd: crash point {name} reached, exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
