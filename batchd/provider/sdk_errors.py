"""One translation of an SDK's failures into ``ProviderError`` for every adapter.

Each adapter says how its SDK signals an HTTP error answer, a timeout and a
lost connection (``SdkErrors``); ``translated`` wraps each call, counts it in
``batchd_provider_requests_total`` (code ``error`` when nothing answered) and
re-raises what went wrong as a sentence that says whether to retry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.errors import ProviderError, TruncatedFileError


@dataclass(frozen=True, slots=True)
class SdkErrors:
    name: str  # who did not answer, in messages: "Anthropic", "the provider"
    status: type[Exception]  # an HTTP answer that is an error
    timeout: tuple[type[Exception], ...]  # caught before ``connection``: SDKs subclass it
    connection: tuple[type[Exception], ...]
    status_code: Callable[[Any], str]  # the status's label in the request counter
    status_error: Callable[[str, Any], ProviderError]
    reason: Callable[[Any], str]  # why the connection failed, briefly
    count: Callable[[str, str], None]  # (operation, code): one provider call


@contextmanager
def translated(operation: str, sdk: SdkErrors) -> Iterator[None]:
    try:
        yield
    except sdk.status as exc:
        sdk.count(operation, sdk.status_code(exc))
        raise sdk.status_error(operation, exc) from exc
    except TruncatedFileError:
        sdk.count(operation, "error")
        raise
    except sdk.timeout as exc:
        sdk.count(operation, "error")
        raise ProviderError(
            f"{operation}: {sdk.name} did not answer in time; retry later.", operation=operation
        ) from exc
    except sdk.connection as exc:
        sdk.count(operation, "error")
        raise ProviderError(
            f"{operation}: could not reach {sdk.name} ({sdk.reason(exc)}); retry later.",
            operation=operation,
        ) from exc
    except (json.JSONDecodeError, orjson.JSONDecodeError) as exc:
        sdk.count(operation, "error")
        raise ProviderError(
            f"{operation}: {sdk.name} answered with invalid JSON; retry later.", operation=operation
        ) from exc
    sdk.count(operation, "200")
