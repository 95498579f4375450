"""The single-line reservation path: request combining (the hot-SKU fast path, group
commit for the rest).

Every single-line reservation goes through a :class:`~inventory.combining.Combiner`
keyed by *lane*: a product always maps to the same one of ``lanes`` lanes, so at most
``lanes`` batches are in flight per process and never two for one product (no request
of this process waits on another's row lock). A batch is one transaction: claim the
members' idempotency keys, lock the rows of the batch's products (``FOR UPDATE``, in
(product, warehouse) order like every other writer), allocate the members one after
another in arrival order against the running state, then write all their reservations,
lines and ledger rows with one statement that updates each touched row once. The ledger
still gets one row per reservation per stock row, each with its own version, exactly as
if the reservations had been applied one by one; a row's version moves by the number of
changes. Members that no longer fit get ``insufficient_stock``; the others commit.

Why lanes and not one batch per product: a flash sale piles requests onto one product,
but ordinary traffic spreads them over thousands, where per-product batches are batches
of one and each reservation pays its own four round trips. Sharing a lane, requests for
different products that arrive together share those round trips too (group commit).
The cost is that a batch's products wait for each other's rows; ``lanes`` bounds how
many such transactions one process runs at once (default 4, under the default pool of
10 connections, measured in ``bench/``).

Sold-out refusal: after a batch leaves a product with nothing reservable, unpinned
requests without an ``Idempotency-Key`` are refused from memory for ``sold_out_ttl``
seconds (default 0.2 s) instead of queueing behind the database. A restock through this
process clears that at once; one through another process is seen after at most
``sold_out_ttl``. A refusal is never an oversell, so the only cost of the shortcut is a
bounded window in which fresh stock can be refused.
"""

from __future__ import annotations

import contextlib
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from . import metrics
from .combining import Combiner
from .domain import (
    Contention,
    IdempotencyKeyReused,
    InsufficientStock,
    InventoryError,
    Movement,
    NotFound,
    RequestedLine,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockLevel,
    Warehouse,
    allocate,
)
from .idempotency import Idempotency, Replay, replay_stored
from .store import Conn, IdempotencyRecord, Store, VersionMiss

__all__ = ["BatchReserver", "SingleLine", "lane_of"]


@dataclass(frozen=True, slots=True)
class SingleLine:
    """One single-line reservation request waiting for its batch."""

    line: RequestedLine
    ttl_seconds: int
    reference: str | None
    idempotency: Idempotency | None = None


Outcome = Reservation | Replay | InventoryError


class BatchReserver:
    def __init__(
        self,
        store: Store,
        *,
        lock_products: Callable[[Sequence[str]], contextlib.AbstractAsyncContextManager[Any]]
        | None = None,
        on_change: Callable[[], None] = lambda: None,
        sold_out_ttl: float = 0.2,
        max_batch: int = 256,
        lanes: int = 4,
    ) -> None:
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        self.store = store
        self._lanes = lanes
        self._lock_products = lock_products
        self._on_change = on_change
        self._sold_out_ttl = sold_out_ttl
        self._sold_out: dict[str, float] = {}
        self.combiner: Combiner[int, SingleLine, Reservation | Replay] = Combiner(
            self._run_batch, max_batch=max_batch
        )

    async def reserve(self, request: SingleLine) -> Reservation | Replay:
        line = request.line
        if request.idempotency is None and line.warehouse_id is None:
            until = self._sold_out.get(line.product_id)
            if until is not None and until > time.monotonic():
                raise InsufficientStock(
                    "not enough stock for every line",
                    [{"product_id": line.product_id, "requested": line.quantity, "available": 0}],
                )
        return await self.combiner.submit(lane_of(line.product_id, self._lanes), request)

    def forget(self, product_id: str) -> None:
        """Stock of the product changed here: stop refusing it from memory."""
        self._sold_out.pop(product_id, None)

    async def _run_batch(self, lane: int, batch: Sequence[SingleLine]) -> list[Outcome]:
        products = sorted({request.line.product_id for request in batch})
        metrics.BATCHES.inc()
        metrics.BATCH_MEMBERS.inc(len(batch))
        try:
            if self._lock_products is None:
                results = await self._apply(products, batch)
            else:
                async with self._lock_products(products):
                    results = await self._apply(products, batch)
        except VersionMiss:  # the rows are locked: only a bug or manual SQL gets here
            raise Contention("the stock row changed under the batch; retry") from None
        if any(isinstance(r, Reservation) for r in results):
            self._on_change()
        return results

    async def _apply(self, products: Sequence[str], batch: Sequence[SingleLine]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(batch)
        fresh: list[int] = []  # members whose key this batch claimed
        duplicates: dict[int, int] = {}  # member -> earlier member with the same key
        stored: dict[tuple[str, str], IdempotencyRecord] = {}  # keys answered before
        async with self.store.transaction() as conn:
            live = await self._claim_keys(conn, batch, results, fresh, duplicates, stored)
            levels, warehouses = await self.store.lock_products(
                conn, [batch[i].line.product_id for i in live]
            )
            pinned = {batch[i].line.warehouse_id for i in live} - {None} - warehouses.keys()
            if pinned:
                found = await self.store.warehouses(conn, [w for w in pinned if w is not None])
                warehouses = {**warehouses, **found}
            current: dict[str, dict[str, StockLevel]] = {}  # product -> warehouse -> row
            for lv in levels:
                current.setdefault(lv.product_id, {})[lv.warehouse_id] = lv
            movements: list[Movement] = []
            planned: list[tuple[int, UUID, tuple[ReservationLine, ...]]] = []
            for i in live:
                line = batch[i].line
                rows = current.get(line.product_id)
                try:
                    if rows is None:
                        raise NotFound(
                            f"product {line.product_id} has no stock",
                            {"product_ids": [line.product_id]},
                        )
                    if line.warehouse_id is not None and line.warehouse_id not in warehouses:
                        raise NotFound(
                            f"warehouse {line.warehouse_id} not found",
                            {"warehouse_id": line.warehouse_id},
                        )
                    allocation = allocate([line], rows.values(), warehouses)
                except InventoryError as exc:
                    results[i] = exc
                    continue
                reservation_id = uuid.uuid4()
                for part in allocation.lines:
                    rows[part.warehouse_id], movement = rows[part.warehouse_id].reserve(
                        part.quantity, reservation_id
                    )
                    movements.append(movement)
                planned.append((i, reservation_id, allocation.lines))
            if planned:
                now = await self._write(conn, batch, levels, current, movements, planned)
                for i, reservation_id, lines in planned:
                    request = batch[i]
                    results[i] = Reservation(
                        reservation_id,
                        ReservationStatus.ACTIVE,
                        lines,
                        request.reference,
                        now,
                        now + timedelta(seconds=request.ttl_seconds),
                    )
            await self._remember(conn, batch, results, fresh)
        for i, first in duplicates.items():
            results[i] = _mirror(batch[first], results[first], batch[i], stored)
        for product_id in products:
            self._note_sold_out(product_id, current.get(product_id, {}), warehouses)
        done = [r for r in results if r is not None]
        assert len(done) == len(batch), "every member gets exactly one answer"
        return done

    async def _claim_keys(
        self,
        conn: Conn,
        batch: Sequence[SingleLine],
        results: list[Outcome | None],
        fresh: list[int],
        duplicates: dict[int, int],
        stored: dict[tuple[str, str], IdempotencyRecord],
    ) -> list[int]:
        """Claim idempotency keys; returns the members still to allocate."""
        live = [i for i, request in enumerate(batch) if request.idempotency is None]
        seen: dict[tuple[str, str], int] = {}
        # Claim in key order: two batches sharing keys can then never deadlock.
        keyed = sorted(
            (r.idempotency.scope, r.idempotency.key, i, r.idempotency)
            for i, r in enumerate(batch)
            if r.idempotency is not None
        )
        for _, _, i, idem in keyed:
            if (idem.scope, idem.key) in seen:
                duplicates[i] = seen[(idem.scope, idem.key)]
                continue
            seen[(idem.scope, idem.key)] = i
            record = await self.store.claim_idempotency_key(conn, idem.scope, idem.key, idem.digest)
            if record is None:
                fresh.append(i)
                live.append(i)
                continue
            stored[(idem.scope, idem.key)] = record
            results[i] = _from_record(record, idem)
        return sorted(live)

    async def _write(
        self,
        conn: Conn,
        batch: Sequence[SingleLine],
        levels: list[StockLevel],
        current: dict[str, dict[str, StockLevel]],
        movements: list[Movement],
        planned: list[tuple[int, UUID, tuple[ReservationLine, ...]]],
    ) -> datetime:
        after = ((lv, current[lv.product_id][lv.warehouse_id]) for lv in levels)
        rows = [(before, now) for before, now in after if now is not before]
        reservations = [(rid, batch[i].reference, batch[i].ttl_seconds) for i, rid, _ in planned]
        lines = [
            (rid, n, line) for _, rid, parts in planned for n, line in enumerate(parts, start=1)
        ]
        return await self.store.insert_batch(conn, rows, movements, reservations, lines)

    async def _remember(
        self,
        conn: Conn,
        batch: Sequence[SingleLine],
        results: list[Outcome | None],
        fresh: list[int],
    ) -> None:
        """Store the answers of newly claimed keys (201, 404 and 409: nothing else
        reaches this point)."""
        answers: dict[str, dict[str, tuple[int, bytes]]] = {}
        for i in fresh:
            idem, outcome = batch[i].idempotency, results[i]
            assert idem is not None
            assert isinstance(outcome, Reservation | InventoryError)
            answers.setdefault(idem.scope, {})[idem.key] = idem.render(outcome)
        for scope, by_key in answers.items():
            await self.store.store_idempotent_responses(conn, scope, by_key)

    def _note_sold_out(
        self,
        product_id: str,
        current: dict[str, StockLevel],
        warehouses: dict[str, Warehouse],
    ) -> None:
        reservable = sum(
            lv.available for lv in current.values() if warehouses[lv.warehouse_id].can_allocate
        )
        if current and reservable == 0:
            self._sold_out[product_id] = time.monotonic() + self._sold_out_ttl
        else:
            self._sold_out.pop(product_id, None)


def lane_of(product_id: str, lanes: int) -> int:
    """The lane a product's single-line reservations take (stable across processes)."""
    return zlib.crc32(product_id.encode()) % lanes


def _from_record(record: IdempotencyRecord, idem: Idempotency) -> Outcome:
    try:
        return replay_stored(record, idem)
    except InventoryError as exc:
        return exc


def _mirror(
    first: SingleLine,
    outcome: Outcome | None,
    request: SingleLine,
    stored: dict[tuple[str, str], IdempotencyRecord],
) -> Outcome:
    """The answer to a repeat of a key already used earlier in the same batch."""
    idem, first_idem = request.idempotency, first.idempotency
    assert idem is not None
    assert first_idem is not None
    assert outcome is not None
    record = stored.get((idem.scope, idem.key))
    if record is not None:  # answered before this batch: judge the repeat on its own
        return _from_record(record, idem)
    if idem.digest != first_idem.digest:
        return IdempotencyKeyReused(
            "this Idempotency-Key was used with a different body", {"key": idem.key}
        )
    assert isinstance(outcome, Reservation | InventoryError)
    return first_idem.replay(outcome)
