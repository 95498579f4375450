"""Idempotency-Key values shared by the reservation paths.

The entry point hashes the parsed body (:func:`body_hash`) and supplies ``render``; the
service stores the rendered answer in the same transaction as the reservation, so a replay
is byte-for-byte the original and the service never needs to know about HTTP.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..domain.model import IdempotencyKeyReused, InventoryError, Reservation
from ..store.port import IdempotencyRecord

__all__ = ["Idempotency", "Render", "Replay", "body_hash", "replay_stored"]

Render = Callable[[Reservation | InventoryError], tuple[int, bytes]]


def body_hash(body: Any) -> bytes:
    """SHA-256 of the canonical JSON of a parsed body (key order and spacing ignored)."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored answer to a repeated ``Idempotency-Key``."""

    status_code: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Idempotency:
    """What the entry point knows about an ``Idempotency-Key`` request."""

    scope: str
    key: str
    digest: bytes
    render: Render

    def replay(self, outcome: Reservation | InventoryError) -> Replay:
        """The answer a repeat of this request gets once ``outcome`` is stored."""
        return Replay(*self.render(outcome))


def replay_stored(stored: IdempotencyRecord, idempotency: Idempotency) -> Replay:
    """The stored answer, or 422 when the key was first used with another body."""
    if stored.body_hash != idempotency.digest:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used with a different body", {"key": idempotency.key}
        )
    assert stored.status_code is not None
    assert stored.response is not None
    return Replay(stored.status_code, bytes(stored.response))
