"""The ``batchd`` command's entry point.

``pip install batchd`` installs the client library alone (aiohttp and
orjson); the daemon and the command line need the ``server`` extra. Without
it the command says which extra to install instead of a traceback.
"""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from batchd.cli import main as cli_main
    except ModuleNotFoundError as exc:
        print(
            f"batchd: the command line needs the daemon's dependencies ({exc.name} is not "
            "installed): pip install 'batchd[server]' (add 'embedded' for a PostgreSQL "
            "of its own)",
            file=sys.stderr,
        )
        return 2
    return cli_main()


if __name__ == "__main__":  # pragma: no cover - python -m batchd.entry
    sys.exit(main())
