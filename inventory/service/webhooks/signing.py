"""The ``Inventory-Signature`` header: ``t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The MAC covers ``"<t>.<raw body>"``: the timestamp is signed with the body, so a
captured delivery cannot be replayed later with a fresh ``t``; a receiver rejects
signatures older than its tolerance (5 minutes by default). Every attempt is signed
anew (new ``t``, same body and event id).
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["TOLERANCE", "sign", "signature_header", "verify"]

TOLERANCE = 300  # seconds a receiver accepts between ``t`` and its own clock


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"`` under ``secret``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={sign(secret, t, body)}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance: int = TOLERANCE,
    now: float | None = None,
) -> bool:
    """True when ``header`` is a valid signature of ``body`` made within ``tolerance``
    seconds. Several ``v1`` values are accepted (any may match), as during a secret
    rotation; comparison is constant-time."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, c) for c in candidates)
