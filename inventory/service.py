"""Use cases: warehouses, stock changes, reservations (expiry: :mod:`inventory.expiry`).

Each use case is one database transaction through :class:`~inventory.store.Store`; the
rules come from :mod:`inventory.domain`. Single-line reservations are combined
(:mod:`inventory.batch_reserve`: concurrent requests share one locked transaction, the
hot-SKU fast path and group commit for the rest). Multi-line reservations use one of two strategies:

``optimistic`` (default)
    Read the rows, allocate in the domain, then write with ``... WHERE version = $v``.
    A lost race re-reads and retries with full-jitter backoff, at most
    ``retry_attempts`` times and within ``retry_deadline`` seconds, then answers
    :class:`~inventory.domain.Contention` (503 with ``Retry-After``).
``lock``
    Take a Redis lock per product (sorted, :meth:`realtime.keys.RedisKeys.lock`) around the
    same version-checked write: the lock removes most lost races, the version check stays
    the fence against a holder whose lock expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from . import metrics
from .batch_reserve import BatchReserver, SingleLine
from .catalog import ensure_not_kit
from .domain import (
    Allocation,
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
    allocate,
    row_deltas,
)
from .idempotency import Idempotency, Replay, replay_stored
from .store import Conn, Store, VersionMiss

__all__ = ["InventoryService", "RetryPolicy"]

log = logging.getLogger("inventory.service")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with full-jitter exponential backoff and an overall deadline."""

    attempts: int = 8
    base_delay: float = 0.002
    max_delay: float = 0.1
    deadline: float = 2.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


LockFactory = Callable[[Sequence[str]], contextlib.AbstractAsyncContextManager[Any]]


class InventoryService:
    def __init__(
        self,
        store: Store,
        *,
        retry: RetryPolicy | None = None,
        lock_products: LockFactory | None = None,
        on_change: Callable[[], None] | None = None,
        lanes: int = 4,
    ) -> None:
        self.store = store
        self.retry = retry or RetryPolicy()
        self.lock_products = lock_products
        self.on_change = on_change or (lambda: None)
        self.single_line = BatchReserver(
            store, lock_products=lock_products, on_change=self.on_change, lanes=lanes
        )

    async def close(self) -> None:
        """Stop the combining workers (at shutdown)."""
        await self.single_line.combiner.close()

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
                    await ensure_not_kit(conn, product_id)
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
            self.single_line.forget(product_id)
            self.on_change()
            return result
        raise Contention("the stock row kept changing; retry")

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
    ) -> Reservation | Replay:
        """Reserve every line or none (see :func:`~inventory.domain.allocate`)."""
        products = sorted({x.product_id for x in lines})
        try:
            if len(lines) == 1:
                result = await self.single_line.reserve(
                    SingleLine(lines[0], ttl_seconds, reference, idempotency)
                )
            elif self.lock_products is None:
                result = await self._reserve_retrying(lines, ttl_seconds, reference, idempotency)
            else:
                async with self.lock_products(products):
                    result = await self._reserve_retrying(
                        lines, ttl_seconds, reference, idempotency
                    )
        except InventoryError as exc:
            metrics.RESERVATIONS.labels(exc.code).inc()
            raise
        metrics.RESERVATIONS.labels("replayed" if isinstance(result, Replay) else "reserved").inc()
        return result

    async def _reserve_retrying(
        self,
        lines: Sequence[RequestedLine],
        ttl_seconds: int,
        reference: str | None,
        idempotency: Idempotency | None,
    ) -> Reservation | Replay:
        deadline = time.monotonic() + self.retry.deadline
        for attempt in range(self.retry.attempts):
            try:
                return await self._reserve_once(lines, ttl_seconds, reference, idempotency)
            except VersionMiss:
                metrics.VERSION_CONFLICTS.inc()
            pause = self.retry.delay(attempt)
            if attempt + 1 == self.retry.attempts or time.monotonic() + pause > deadline:
                break
            metrics.RETRIES.inc()
            await asyncio.sleep(pause)
        raise Contention("too many concurrent updates of the same stock; retry", 1.0)

    async def _reserve_once(
        self,
        lines: Sequence[RequestedLine],
        ttl_seconds: int,
        reference: str | None,
        idempotency: Idempotency | None,
    ) -> Reservation | Replay:
        products = list(dict.fromkeys(x.product_id for x in lines))
        async with self.store.transaction() as conn:
            if idempotency is not None:
                stored = await self.store.claim_idempotency_key(
                    conn, idempotency.scope, idempotency.key, idempotency.digest
                )
                if stored is not None:
                    return replay_stored(stored, idempotency)
            # Read without locking: the version-checked write below is the guard.
            levels, warehouses = await self.store.levels(products, conn)
            try:
                allocation = await self._allocate(conn, lines, levels, warehouses)
            except InventoryError as exc:
                if idempotency is None:
                    raise
                await self._remember(conn, idempotency, exc)
                failure: InventoryError | None = exc
            else:
                failure = None
                reservation_id = uuid.uuid4()
                deltas = {
                    key: (0, n, allocation.rows[key].version)
                    for key, n in allocation.deltas().items()
                }
                await self.store.apply_deltas(conn, MovementKind.RESERVED, deltas, reservation_id)
                reservation = await self.store.insert_reservation(
                    conn, reservation_id, allocation.lines, ttl_seconds, reference
                )
                if idempotency is not None:
                    await self._remember(conn, idempotency, reservation)
        if failure is not None:
            raise failure
        self.on_change()
        return reservation

    async def _allocate(
        self,
        conn: Conn,
        lines: Sequence[RequestedLine],
        levels: list[StockLevel],
        warehouses: dict[str, Warehouse],
    ) -> Allocation:
        known = {lv.product_id for lv in levels}
        missing = [p for p in dict.fromkeys(x.product_id for x in lines) if p not in known]
        if missing:
            raise NotFound(f"product {missing[0]} has no stock", {"product_ids": missing})
        pinned = {x.warehouse_id for x in lines if x.warehouse_id is not None}
        if pinned - warehouses.keys():
            warehouses = {**warehouses, **await self.store.warehouses(conn, pinned)}
            unknown = sorted(pinned - warehouses.keys())
            if unknown:
                raise NotFound(f"warehouse {unknown[0]} not found", {"warehouse_id": unknown[0]})
        return allocate(lines, levels, warehouses)

    async def _remember(
        self, conn: Conn, idempotency: Idempotency, outcome: Reservation | InventoryError
    ) -> None:
        status, body = idempotency.render(outcome)
        await self.store.store_idempotent_response(
            conn, idempotency.scope, idempotency.key, status, body
        )

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
        self, conn: Conn, reservation: Reservation, target: ReservationStatus, now: Any
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
                self.single_line.forget(product_id)
        return finished

    async def extend(self, reservation_id: UUID, ttl_seconds: int) -> Reservation:
        async with self.store.transaction() as conn:
            reservation, now = await self.store.get_reservation(
                reservation_id, conn, for_update=True
            )
            extended = reservation.extend(ttl_seconds, now)
            await self.store.update_reservation(conn, extended)
        return extended
