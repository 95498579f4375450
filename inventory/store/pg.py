"""The PostgreSQL store: :class:`Store`, the statement groups put together on one pool.

Each group holds the SQL of one concern, on :class:`~inventory.store.db.Database` (pool,
transactions, error translation): :mod:`.stock` (warehouses, stock rows, the ledger),
:mod:`.reservations` (the engine's batch write, reads, expiry), :mod:`.idempotency`
(keys) and :mod:`.commerce` (what the engine's batch reads of the flash-sale features).
Together they implement :class:`~inventory.store.port.InventoryStore`, the interface the
service layer's reservation core depends on; the features with SQL of their own use
:meth:`~inventory.store.db.Database.transaction` and ``_translated`` directly.
"""

from __future__ import annotations

from .commerce import CommerceStatements
from .db import open_pool
from .idempotency import IdempotencyStatements
from .port import InventoryStore
from .reservations import ReservationStatements
from .stock import StockStatements

__all__ = ["Store", "connect"]


class Store(
    StockStatements,
    ReservationStatements,
    IdempotencyStatements,
    CommerceStatements,
    InventoryStore,
):
    """Data access over an asyncpg pool (see the module docstring for where each part is)."""


async def connect(url: str, *, min_size: int, max_size: int, timeout: float) -> Store:
    """Open a pool; ``timeout`` bounds connecting and every command."""
    pool = await open_pool(url, min_size=min_size, max_size=max_size, timeout=timeout)
    return Store(pool, acquire_timeout=timeout)
