"""Ports: what the real-time side needs from storage, and the values that cross the border.

``realtime`` imports nothing from ``inventory`` but the domain's id rules; the inventory
side implements these protocols (``inventory/store/feed.py``) on PostgreSQL. Keeping the
SQL behind ports lets the hub and the relay be exercised against fakes and keeps one owner
for every query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

__all__ = ["LevelReader", "LevelState", "Outbox", "OutboxLease", "StockChange"]


@dataclass(frozen=True, slots=True)
class LevelState:
    """The current state of one stock row, as read from the source of truth."""

    product_id: str
    warehouse_id: str
    quantity: int
    reserved: int
    version: int
    updated_at: datetime

    @property
    def available(self) -> int:
        return self.quantity - self.reserved


@dataclass(frozen=True, slots=True)
class StockChange:
    """One ledger row (a committed change of a stock row) with its outbox position.

    ``position`` orders the outbox stream: (commit ticket of the writing transaction,
    row id); tickets follow the commit order of ledger writers.
    """

    ticket: int
    id: int
    product_id: str
    warehouse_id: str
    kind: str
    quantity: int
    reserved: int
    version: int
    created_at: datetime

    @property
    def position(self) -> tuple[int, int]:
        return (self.ticket, self.id)


class LevelReader(Protocol):
    """Reads current stock rows for many products in one round trip."""

    async def read_levels(self, product_ids: Sequence[str]) -> dict[str, list[LevelState]]:
        """Every requested product is a key; a product without rows maps to ``[]``."""
        ...


class OutboxLease(Protocol):
    """Exclusive right to publish the outbox, held until released or the session is lost."""

    async def fetch(self, limit: int) -> list[StockChange]:
        """Up to ``limit`` final changes strictly after the saved cursor, in stream order."""
        ...

    async def advance(self, position: tuple[int, int], *, save: bool = True) -> None:
        """Move the cursor to ``position`` (everything up to it was published): the next
        :meth:`fetch` starts after it; durably when ``save``, else in this lease only
        (a later leader starts after the last saved position)."""
        ...

    async def release(self) -> None:
        """Give up leadership and the underlying session; never raises."""
        ...


class Outbox(Protocol):
    """Leader election for outbox relays: one lease per ``name`` and database at a time.

    Each name has its own cursor, so relays feeding different Redis servers or channel
    namespaces never share or steal each other's progress.
    """

    async def acquire(self, name: str) -> OutboxLease | None:
        """The lease of ``name``, or ``None`` while another process holds it."""
        ...
