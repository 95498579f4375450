"""The store as the service layer sees it: the one interface the reservation core depends on.

:class:`InventoryStore` lists exactly what :class:`~inventory.service.inventory.InventoryService`,
the reservation engine (:mod:`inventory.service.engine`) and expiry
(:mod:`inventory.service.expiry`) call, with the values and exceptions that cross it.
Two implementations: :class:`~inventory.store.pg.Store` on PostgreSQL, and
:class:`~inventory.store.memory.MemoryStore` in memory, which runs the service's rules in
tests without a database.

Methods taking ``conn`` run inside a transaction opened by :meth:`InventoryStore.transaction`
(:data:`Tx`: opaque to the service, which only hands it back); the others run on their own.
They return domain objects and raise domain errors, plus the two signals below that the
engine handles itself.

The features whose SQL is their own (product settings and listings, bulk changes, the
waitlist, alerts, webhooks, the live feed) talk to the PostgreSQL store directly and are
not behind this interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from ..domain.commerce import KitComponent, ProductRules
from ..domain.model import (
    Movement,
    MovementKind,
    Reservation,
    ReservationLine,
    StockLevel,
    Warehouse,
)

__all__ = [
    "DueReservation",
    "IdempotencyRecord",
    "InventoryStore",
    "LockedRows",
    "RowsBusy",
    "Tx",
    "VersionMiss",
]

#: An open transaction of the store (asyncpg's connection; the memory store's own handle).
Tx = Any


class VersionMiss(Exception):
    """A version-checked update found a newer row: the caller re-reads and retries."""


class RowsBusy(Exception):
    """Waiting for a stock row lock ran past the transaction's ``lock_timeout``."""


@dataclass(frozen=True, slots=True)
class LockedRows:
    """What :meth:`InventoryStore.lock_rows` found: the locked rows, their warehouses,
    the products with a row held by another transaction and, when the statement did not
    wait, the products' rules read with the locks (else None: read them after the wait)."""

    levels: list[StockLevel]
    warehouses: dict[str, Warehouse]
    busy: set[str]
    rules: dict[str, ProductRules] | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """What an ``Idempotency-Key`` holds: the body's hash and, once answered, the answer."""

    body_hash: bytes
    status_code: int | None
    response: bytes | None


@dataclass(frozen=True, slots=True)
class DueReservation:
    """A reservation an expiry pass found due: released, or left for a later pass (one of
    its rows was held by another transaction)."""

    id: UUID
    released: bool
    product_ids: tuple[str, ...]


class InventoryStore(Protocol):
    """Warehouses, stock rows with their ledger, reservations and idempotency keys."""

    def transaction(
        self, lock_timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[Tx]:
        """A transaction; ``lock_timeout`` (seconds) bounds every lock wait in it (then
        :class:`RowsBusy` from :meth:`lock_rows`)."""
        ...

    # --- warehouses ---------------------------------------------------------------------

    async def put_warehouse(self, wh: Warehouse) -> tuple[Warehouse, bool]:
        """Create or update; returns the stored warehouse and whether it was created."""
        ...

    async def get_warehouse(self, warehouse_id: str) -> Warehouse: ...

    async def list_warehouses(self) -> list[Warehouse]: ...

    async def warehouses(self, conn: Tx, ids: Iterable[str]) -> dict[str, Warehouse]:
        """Those of ``ids`` that exist."""
        ...

    # --- stock rows and the ledger ------------------------------------------------------

    async def levels(
        self, product_ids: Sequence[str]
    ) -> tuple[list[StockLevel], dict[str, Warehouse]]:
        """Every stock row of the products, ordered, and the warehouses they are in."""
        ...

    async def lock_level(self, conn: Tx, product_id: str, warehouse_id: str) -> StockLevel:
        """The row, locked, or an empty (version 0) level when it does not exist."""
        ...

    async def insert_level(self, conn: Tx, movement: Movement) -> StockLevel | None:
        """Create a row from its first movement; None when another transaction won."""
        ...

    async def apply_deltas(
        self,
        conn: Tx,
        kind: MovementKind,
        deltas: Mapping[tuple[str, str], tuple[int, int, int | None]],
        reservation_id: UUID | None = None,
        reason: str | None = None,
    ) -> list[StockLevel]:
        """Apply ``{(product, warehouse): (quantity_delta, reserved_delta, version)}`` with
        one ledger row per row; a ``version`` that no longer matches: :class:`VersionMiss`."""
        ...

    async def movements(
        self, product_id: str, after: int, limit: int
    ) -> list[dict[str, Any]] | None:
        """Ledger page of a product, oldest first; None when the product has no stock row."""
        ...

    async def ensure_not_kit(self, conn: Tx, product_id: str) -> None:
        """Raise :class:`~inventory.domain.commerce.IsKit` before a first stock row is
        created for a kit (and keep the product from becoming one until commit)."""
        ...

    # --- the reservation engine's batch -------------------------------------------------

    async def lock_rows(
        self,
        conn: Tx,
        product_ids: Sequence[str],
        wait_for: Collection[str] = (),
        wait: float = 0.0,
        *,
        then_claims: bool = False,
    ) -> LockedRows:
        """Lock the products' rows in (product, warehouse) order, waiting (at most ``wait``)
        only for the rows of ``wait_for``."""
        ...

    async def insert_batch(
        self,
        conn: Tx,
        rows: Sequence[tuple[StockLevel, StockLevel]],
        movements: Sequence[Movement],
        reservations: Sequence[tuple[UUID, str | None, int, str | None]],
        lines: Sequence[tuple[UUID, int, ReservationLine]],
    ) -> datetime:
        """Write a batch: rows (locked state, new state), ledger rows, reservations
        ``(id, reference, ttl seconds, customer)`` and lines ``(reservation, line number,
        line)``; returns the clock read under the row locks (``created_at``)."""
        ...

    async def load_rules(self, conn: Tx, product_ids: Sequence[str]) -> dict[str, ProductRules]:
        """Settings and waiting units of each product (defaults without settings)."""
        ...

    async def kit_components(
        self, product_ids: Sequence[str]
    ) -> dict[str, tuple[tuple[KitComponent, ...] | None, int | None]]:
        """``(components, max_per_customer)`` of each of ``product_ids`` with settings."""
        ...

    async def held_units(
        self, conn: Tx, customers: Iterable[str], products: Iterable[str]
    ) -> dict[tuple[str, str], int]:
        """Units of each (customer, product) in active and committed reservations."""
        ...

    async def lock_offers(self, conn: Tx, entry_ids: Sequence[UUID]) -> dict[UUID, tuple[int, int]]:
        """For the waitlist entries still waiting, locked: their ``seq`` and the units
        waiting before them."""
        ...

    async def mark_offered(self, conn: Tx, offers: Mapping[UUID, UUID]) -> None:
        """Entry id -> reservation id: the entries are now ``offered``."""
        ...

    # --- reservations -------------------------------------------------------------------

    async def get_reservation(
        self, reservation_id: UUID, conn: Tx | None = None, *, for_update: bool = False
    ) -> tuple[Reservation, datetime]:
        """The reservation and the store's clock (``now``) read with it."""
        ...

    async def update_reservation(self, conn: Tx, reservation: Reservation) -> None:
        """Store the reservation's status and ``expires_at``."""
        ...

    async def expire_due(self, limit: int, exclude: Collection[UUID]) -> list[DueReservation]:
        """One transaction: release up to ``limit`` due reservations (oldest deadline
        first, skipping ``exclude``) with an ``expired`` ledger row per row."""
        ...

    # --- idempotency keys ---------------------------------------------------------------

    async def claim_idempotency_keys(
        self, conn: Tx, claims: Sequence[tuple[str, str, bytes]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        """Claim ``(scope, key, body hash)`` keys; returns the records of those someone
        already had (a concurrent claimer waits until the first transaction ends)."""
        ...

    async def store_idempotent_responses(
        self, conn: Tx, answers: Sequence[tuple[str, str, int, bytes]]
    ) -> None:
        """Store ``(scope, key, status, body)`` answers of keys claimed in ``conn``."""
        ...

    async def store_refusals(
        self, answers: Sequence[tuple[str, str, bytes, int, bytes]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        """Claim ``(scope, key, body hash, status, body)`` keys with their answers at once,
        outside any transaction (refusals that needed no row); returns the records of
        those someone already had (a claim in flight is waited for)."""
        ...

    async def drop_idempotency_keys(self, conn: Tx, keys: Sequence[tuple[str, str]]) -> None:
        """Forget keys claimed in this transaction whose answer is not stored."""
        ...

    async def purge_idempotency_keys(self, older_than_hours: int, limit: int) -> int:
        """Delete up to ``limit`` keys older than ``older_than_hours`` (one short
        transaction); returns how many."""
        ...
