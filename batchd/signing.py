"""Callback signatures: HMAC-SHA256 over ``<timestamp>.<body>``.

batchd sends ``Batchd-Timestamp: <unix seconds>`` and
``Batchd-Signature: v1=<hex digest>``, where the digest is
HMAC-SHA256(key = the client's callback secret as UTF-8, message = the
timestamp's ASCII digits, one ``.``, then the raw request body bytes). A
receiver recomputes it over the bytes it received (before parsing the JSON),
compares in constant time, and refuses timestamps too far from its clock so
a captured request cannot be replayed later. Stdlib only: receivers import
it through ``batchd.client`` without pulling in the daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from batchd.errors import BatchdError

TIMESTAMP_HEADER = "Batchd-Timestamp"
SIGNATURE_HEADER = "Batchd-Signature"
DELIVERY_HEADER = "Batchd-Delivery"
ATTEMPT_HEADER = "Batchd-Attempt"
SCHEME = "v1"
DEFAULT_TOLERANCE_SECONDS = 300


class SignatureError(BatchdError, ValueError):
    """The callback's signature does not verify; do not trust its body."""


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``Batchd-Signature`` header value for ``body`` sent at ``timestamp``."""
    message = str(timestamp).encode() + b"." + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"{SCHEME}={digest}"


def verify(
    secret: str,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    tolerance: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Raise SignatureError unless ``signature`` signs ``body`` at ``timestamp``
    with ``secret`` and the timestamp is within ``tolerance`` seconds of now.

    The header may list several comma-separated ``v1=`` values; any match
    passes (room for signing with an old and a new secret during rotation).
    """
    if not timestamp or not signature:
        raise SignatureError(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} is not unix seconds") from None
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance:
        raise SignatureError(f"{TIMESTAMP_HEADER} is more than {tolerance:g}s from now")
    expected = sign(secret, timestamp, body)
    offered = [part.strip() for part in signature.split(",")]
    if not any(hmac.compare_digest(expected, part) for part in offered):
        raise SignatureError("signature does not match the body and timestamp")
