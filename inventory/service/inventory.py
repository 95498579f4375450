"""Use cases: warehouses, stock changes, reservations (expiry: :mod:`.expiry`).

Each use case is one transaction of the store, reached only through its interface
(:class:`~inventory.store.port.InventoryStore`: PostgreSQL in the server, memory in fast
tests); the rules come from :mod:`inventory.domain`. Every reservation, whatever its number
of lines, goes through the reservation engine (:mod:`.engine`: concurrent requests share
one transaction that locks their rows, allocates and writes them all). The two
``INVENTORY_RESERVE_STRATEGY`` values differ only in what the engine holds around a
batch's transaction:

``optimistic`` (default)
    Nothing: the batch's row locks and its version-checked write are the guard.
``lock``
    Take a Redis lock per product (sorted, :meth:`realtime.keys.RedisKeys.lock`) around the
    same version-checked write: the version check stays
    the fence against a holder whose lock expired.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any
from uuid import UUID

from .. import metrics
from ..domain.model import (
    Contention,
    InventoryError,
    Movement,
    MovementKind,
    NotFound,
    RequestedLine,
    Reservation,
    ReservationStatus,
    StockLevel,
    Warehouse,
    row_deltas,
)
from ..store.port import InventoryStore, Tx
from .engine import LockFactory, ReservationEngine, ReserveRequest
from .idempotency import Idempotency, Replay

__all__ = ["InventoryService"]

log = logging.getLogger("inventory.service")


class InventoryService:
    """The use cases over a store. ``on_change`` is called after every committed stock
    change; ``on_reserved`` (default ``on_change``) after a reservation batch, which only
    ever takes stock, so listeners that wait for stock to come back can skip it."""

    def __init__(
        self,
        store: InventoryStore,
        *,
        lock_products: LockFactory | None = None,
        on_change: Callable[[], None] | None = None,
        on_reserved: Callable[[], None] | None = None,
        lanes: int = 4,
        wait_bound: float = 5.0,
        wait_slots: int = 4,
    ) -> None:
        self.store = store
        self.on_change = on_change or (lambda: None)
        self.engine = ReservationEngine(
            store,
            lock_products=lock_products,
            on_change=on_reserved or self.on_change,
            lanes=lanes,
            wait_bound=wait_bound,
            wait_slots=wait_slots,
        )

    async def close(self) -> None:
        """Stop the combining workers (at shutdown)."""
        await self.engine.close()

    # --- warehouses and stock -------------------------------------------------------

    async def put_warehouse(self, warehouse: Warehouse) -> tuple[Warehouse, bool]:
        return await self.store.put_warehouse(warehouse)

    async def get_warehouse(self, warehouse_id: str) -> Warehouse:
        return await self.store.get_warehouse(warehouse_id)

    async def list_warehouses(self) -> list[Warehouse]:
        return await self.store.list_warehouses()

    async def stock(
        self, product_ids: Sequence[str]
    ) -> tuple[list[StockLevel], dict[str, Warehouse]]:
        return await self.store.levels(product_ids)

    async def change_stock(
        self,
        product_id: str,
        warehouse_id: str,
        *,
        delta: int | None = None,
        quantity: int | None = None,
        reason: str | None = None,
        expected_version: int | None = None,
    ) -> StockLevel:
        """Adjust by ``delta`` or set on-hand to ``quantity`` under the row lock.

        Errors in the spec's order: unknown warehouse (404), stale ``expected_version``
        (409 ``version_conflict``), then the stock rule (409 ``insufficient_stock``). A set
        that changes nothing returns the row untouched (no version bump, no ledger row).
        """
        for _ in range(3):
            async with self.store.transaction() as conn:
                if warehouse_id not in await self.store.warehouses(conn, [warehouse_id]):
                    raise NotFound(
                        f"warehouse {warehouse_id} not found", {"warehouse_id": warehouse_id}
                    )
                level = await self.store.lock_level(conn, product_id, warehouse_id)
                if not level.exists:
                    await self.store.ensure_not_kit(conn, product_id)
                level.check_version(expected_version)
                change: tuple[StockLevel, Movement] | None
                if delta is not None:
                    change = level.adjust(delta, reason)
                else:
                    assert quantity is not None
                    change = level.set_quantity(quantity, reason)
                if change is None:
                    return level
                _, movement = change
                if level.exists:
                    [result] = await self.store.apply_deltas(
                        conn,
                        MovementKind.ADJUSTED,
                        {(product_id, warehouse_id): (movement.quantity_delta, 0, level.version)},
                        reason=reason,
                    )
                else:
                    created = await self.store.insert_level(conn, movement)
                    if created is None:  # another transaction created the row: redo
                        continue
                    result = created
            self.engine.forget(product_id)
            self.on_change()
            return result
        raise Contention("the stock row kept changing; retry")

    def settings_changed(self, product_id: str) -> None:
        """A product's settings changed here: the engine reads them again, and stock may
        have become reservable (safety stock lowered) for the waitlist."""
        self.engine.forget_settings([product_id])
        self.on_change()

    async def movements(self, product_id: str, after: int, limit: int) -> list[dict[str, Any]]:
        page = await self.store.movements(product_id, after, limit)
        if page is None:
            raise NotFound(f"product {product_id} has no stock", {"product_id": product_id})
        return page

    # --- reservations -----------------------------------------------------------------

    async def reserve(
        self,
        lines: Sequence[RequestedLine],
        ttl_seconds: int,
        reference: str | None,
        idempotency: Idempotency | None = None,
        customer_id: str | None = None,
    ) -> Reservation | Replay:
        """Reserve every line or none (see :func:`~inventory.domain.model.allocate`); kit lines
        expand to their components, purchase limits count against ``customer_id``."""
        try:
            result = await self.engine.reserve(
                ReserveRequest(tuple(lines), ttl_seconds, reference, idempotency, customer_id)
            )
        except InventoryError as exc:
            metrics.RESERVATIONS.labels(exc.code).inc()
            raise
        metrics.RESERVATIONS.labels("replayed" if isinstance(result, Replay) else "reserved").inc()
        return result

    async def get_reservation(self, reservation_id: UUID) -> Reservation:
        reservation, now = await self.store.get_reservation(reservation_id)
        status = reservation.status_at(now)
        if status is not reservation.status:
            reservation = replace(reservation, status=status)
        return reservation

    async def finish(self, reservation_id: UUID, target: ReservationStatus) -> Reservation:
        """Commit or release; a repeat of the same transition returns it unchanged."""
        async with self.store.transaction() as conn:
            reservation, now = await self.store.get_reservation(
                reservation_id, conn, for_update=True
            )
            done = await self._finish_locked(conn, reservation, target, now)
        if done is not reservation:
            self.on_change()
        return done

    async def _finish_locked(
        self, conn: Tx, reservation: Reservation, target: ReservationStatus, now: Any
    ) -> Reservation:
        finished = reservation.finish(target, now)
        if finished is None:
            return reservation
        kind = finished.movement_kind()
        ships = kind is MovementKind.COMMITTED
        deltas = {
            key: (-n if ships else 0, -n, None) for key, n in row_deltas(reservation.lines).items()
        }
        await self.store.apply_deltas(conn, kind, deltas, reservation.id)
        await self.store.update_reservation(conn, finished)
        if not ships:  # stock came back: stop refusing these products from memory
            for product_id in {x.product_id for x in reservation.lines}:
                self.engine.forget(product_id)
        return finished

    async def extend(self, reservation_id: UUID, ttl_seconds: int) -> Reservation:
        async with self.store.transaction() as conn:
            reservation, now = await self.store.get_reservation(
                reservation_id, conn, for_update=True
            )
            extended = reservation.extend(ttl_seconds, now)
            await self.store.update_reservation(conn, extended)
        return extended
