"""Whether the provider accepts our credentials (a leaf: imports no flow module).

A 401 or 403 from the provider is a configuration error, not a transient
one: a wrong or revoked key fails every call the same way until a person
fixes it. Every adapter reports each answer it gets here; the state is
logged at error level once per change (not once per call) and shown on
``/readyz``; ``batchd_provider_requests_total{code="401"|"403"}`` counts the
refused calls (alert BatchdProviderCredentialsRejected; the adapters start
those series at 0 so the first refusal is an increase). The scheduler and
the sync lane back off while it lasts instead of spending task attempts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from batchd import logs
from batchd.backoff import exponential

log = logs.get("batchd.health")

AUTH_STATUSES = frozenset({401, 403})
# Backoff while the key is refused: the first wait, doubling up to the cap.
FIRST_BACKOFF_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 300.0

_FIX = {
    401: "the provider refused the API key: set a valid key (OPENAI_API_KEY, or the key the "
    "emulator was started with: --api-key) and restart batchd",
    403: "the provider refused access with this key (revoked key, wrong project or "
    "organisation, or a model or endpoint the key may not use): fix the key's "
    "permissions or set another key, then restart batchd",
}


def auth_backoff(refusals: int) -> float:
    """Seconds to wait after ``refusals`` refused sends in a row."""
    return exponential(min(refusals - 1, 16), FIRST_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS)


@dataclass(slots=True)
class Rejection:
    status: int
    operation: str
    code: str | None
    since: float
    fix: str

    def as_json(self) -> dict[str, object]:
        return {
            "credentials": "rejected",
            "status": self.status,
            "operation": self.operation,
            "code": self.code,
            "since": self.since,
            "fix": self.fix,
        }


class ProviderHealth:
    """Per provider: refused credentials, or fine. One per process, like the metrics."""

    def __init__(self) -> None:
        self._rejected: dict[str, Rejection] = {}

    def observe(
        self, provider: str, operation: str, status: int | None, code: str | None = None
    ) -> None:
        """Record one answer (``status`` None: no answer, which says nothing
        about the key and changes nothing)."""
        if status is None:
            return
        if status in AUTH_STATUSES:
            self._refused(provider, operation, status, code)
        elif status < 500:
            # Any other answer below 500 (a 200, a 400 about the request, a
            # 429 for this key's limits) came past authentication: the key works.
            self._accepted(provider, operation)

    def _refused(self, provider: str, operation: str, status: int, code: str | None) -> None:
        current = self._rejected.get(provider)
        if current is not None and current.status == status:
            return  # logged when it began
        fix = _FIX[status]
        self._rejected[provider] = Rejection(status, operation, code, time.time(), fix)
        log.error(
            "provider.credentials_rejected",
            provider=provider,
            status=status,
            code=code,
            operation=operation,
            fix=fix,
        )

    def _accepted(self, provider: str, operation: str) -> None:
        if self._rejected.pop(provider, None) is None:
            return
        log.info("provider.credentials_accepted", provider=provider, operation=operation)

    def problems(self) -> dict[str, dict[str, object]]:
        return {name: r.as_json() for name, r in sorted(self._rejected.items())}

    def reset(self) -> None:
        """Forget everything (tests that run several services in one process)."""
        self._rejected.clear()


HEALTH = ProviderHealth()
