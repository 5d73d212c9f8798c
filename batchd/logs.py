"""structlog setup: JSON by default, console for people; secrets never logged."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys whose values are never written, whatever their content.
_REDACTED_KEYS = frozenset(
    {
        "body",
        "api_key",
        "authorization",
        "token",
        "tokens",
        "password",
        "secret",
        "messages",
        "input",
        "prompt",
        "response",
        "openai_api_key",
        "ingest_tokens",
    }
)
# Values that look like credentials anywhere in a string, and PostgreSQL's
# DETAIL lines, which quote the failing row (a task body) in tracebacks.
_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-]{8,}|Bearer\s+\S+|postgres(?:ql)?://[^@\s]*@|DETAIL:[^\n]*)"
)


def _scrub(value: Any) -> Any:
    """Credentials out of strings, and bodies out of nested context too:
    a dict or list handed to a log call can carry a task's request."""
    if isinstance(value, str):
        return _SECRET_PATTERNS.sub("[redacted]", value)
    if isinstance(value, dict):
        return {
            k: "[redacted]" if str(k).lower() in _REDACTED_KEYS else _scrub(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def redact(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop task bodies and credentials from every event."""
    for key in list(event_dict):
        if key.lower() in _REDACTED_KEYS:
            event_dict[key] = "[redacted]"
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def configure(level: str = "info", fmt: str = "json") -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)


def log_tick_failure(logger: Any, event: str, exc: BaseException, failures: int) -> None:
    """A loop's failed tick: the traceback the first time, then one line per
    tick while the cause (typically the database being down) lasts."""
    if failures == 1:
        logger.error(event, failures=failures, error=type(exc).__name__, exc_info=exc)
    else:
        logger.warning(event, failures=failures, error=type(exc).__name__)
