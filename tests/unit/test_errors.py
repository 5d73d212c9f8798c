"""Every exception batchd defines is a BatchdError, so a caller (or the
command line) can catch batchd's failures in one clause; each keeps its
standard base (ValueError, TimeoutError, aiohttp.ClientError) too."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import batchd
from batchd.errors import BatchdError

# The emulators stand in for providers: their errors are the providers' HTTP
# replies, raised and caught inside the emulator, never seen by batchd's code.
EMULATED = {
    "batchd.emulator.anthropic.ApiError",
    "batchd.emulator.gemini.ApiError",
    "batchd.emulator.openai_wire.ApiError",
}


def test_every_exception_batchd_defines_is_a_batchd_error() -> None:
    found = {}
    for info in pkgutil.walk_packages(batchd.__path__, "batchd."):
        if info.name.endswith("__main__"):
            continue  # runs the command line when imported
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    assert len(found) > 15  # the walk found the package's exceptions
    strays = sorted(
        name
        for name, cls in found.items()
        if not issubclass(cls, BatchdError) and name not in EMULATED
    )
    assert strays == []
