"""The store interface in memory: the service layer's rules without PostgreSQL.

:class:`MemoryStore` implements :class:`~inventory.store.port.InventoryStore` with plain
dicts, so tests of :class:`~inventory.service.inventory.InventoryService`, the reservation
engine and expiry run in milliseconds. It is a test double, not a deployment option: it
keeps nothing and serves one process.

What runs for real on top of it: the engine's lanes, combining and batch state
(allocation, kit expansion, safety stock, purchase limits), idempotency claims, replays
and repeats within a batch, the stock rules, the reservation state machine, expiry's
passes, and a ledger with one row per change and contiguous versions.

What it models simply:

- Transactions run one at a time (an :class:`asyncio.Lock`), so nothing is ever busy:
  :meth:`MemoryStore.lock_rows` locks every row, :class:`~inventory.store.port.RowsBusy`
  and :class:`~inventory.store.port.VersionMiss` never happen and ``lock_timeout`` is
  ignored. A transaction that raises is rolled back (the state is restored).
- The clock is the test's: :attr:`MemoryStore.now` (``created_at``, due reservations,
  held units) moves only when a test moves it, so expiry needs no sleeping.
- Product settings are :attr:`MemoryStore.rules` (safety stock, purchase limit, kit
  components), set by the test; there is no waitlist (no entry is ever waiting).

Not covered (PostgreSQL only): the SQL itself, row locks and ``SKIP LOCKED`` between
processes, the waiting path for busy rows, the database's own refusals (values out of
range, constraints), commit tickets and everything that reads the ledger afterwards (the
live feed, webhooks, alerts).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from ..domain.commerce import IsKit, KitComponent, ProductRules
from ..domain.model import (
    Movement,
    MovementKind,
    NotFound,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockLevel,
    Warehouse,
    row_deltas,
)
from .port import DueReservation, IdempotencyRecord, InventoryStore, LockedRows, VersionMiss

__all__ = ["MemoryStore"]


class _Tx:
    """The handle of the open transaction."""


@dataclass
class _State:
    warehouses: dict[str, Warehouse] = field(default_factory=dict)
    levels: dict[tuple[str, str], StockLevel] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    reservations: dict[UUID, Reservation] = field(default_factory=dict)
    customers: dict[UUID, str] = field(default_factory=dict)
    keys: dict[tuple[str, str], tuple[IdempotencyRecord, datetime]] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(
            dict(self.warehouses),
            dict(self.levels),
            list(self.ledger),
            dict(self.reservations),
            dict(self.customers),
            dict(self.keys),
        )


class MemoryStore(InventoryStore):
    """Warehouses, stock rows, the ledger, reservations and idempotency keys in dicts."""

    def __init__(self, now: datetime | None = None) -> None:
        #: The store's clock; tests move it forward.
        self.now = now or datetime.now(UTC)
        #: Product settings (defaults for a product not in here).
        self.rules: dict[str, ProductRules] = {}
        self._state = _State()
        self._lock = asyncio.Lock()
        self._tx: _Tx | None = None

    @contextlib.asynccontextmanager
    async def transaction(self, lock_timeout: float | None = None) -> AsyncIterator[_Tx]:
        async with self._lock:
            saved = self._state.copy()
            self._tx = tx = _Tx()
            try:
                yield tx
            except BaseException:
                self._state = saved
                raise
            finally:
                self._tx = None

    @contextlib.asynccontextmanager
    async def _in(self, conn: _Tx | None) -> AsyncIterator[None]:
        """Inside the caller's transaction ``conn``, or a transaction of its own."""
        if conn is None:
            async with self.transaction():
                yield
        else:
            assert conn is self._tx, "not the open transaction"
            yield

    # --- warehouses ---------------------------------------------------------------------

    async def put_warehouse(self, wh: Warehouse) -> tuple[Warehouse, bool]:
        async with self._in(None):
            created = wh.id not in self._state.warehouses
            self._state.warehouses[wh.id] = wh
        return wh, created

    async def get_warehouse(self, warehouse_id: str) -> Warehouse:
        async with self._in(None):
            found = self._state.warehouses.get(warehouse_id)
        if found is None:
            raise NotFound(f"warehouse {warehouse_id} not found", {"warehouse_id": warehouse_id})
        return found

    async def list_warehouses(self) -> list[Warehouse]:
        async with self._in(None):
            return sorted(self._state.warehouses.values(), key=lambda w: w.id)

    async def warehouses(self, conn: _Tx, ids: Iterable[str]) -> dict[str, Warehouse]:
        async with self._in(conn):
            found = self._state.warehouses
            return {i: found[i] for i in set(ids) if i in found}

    # --- stock rows and the ledger ------------------------------------------------------

    async def levels(
        self, product_ids: Sequence[str]
    ) -> tuple[list[StockLevel], dict[str, Warehouse]]:
        async with self._in(None):
            return self._rows(product_ids)

    def _rows(self, product_ids: Iterable[str]) -> tuple[list[StockLevel], dict[str, Warehouse]]:
        wanted = set(product_ids)
        rows = [lv for k, lv in sorted(self._state.levels.items()) if k[0] in wanted]
        return rows, {lv.warehouse_id: self._state.warehouses[lv.warehouse_id] for lv in rows}

    async def lock_level(self, conn: _Tx, product_id: str, warehouse_id: str) -> StockLevel:
        async with self._in(conn):
            key = (product_id, warehouse_id)
            return self._state.levels.get(key) or StockLevel(product_id, warehouse_id)

    async def insert_level(self, conn: _Tx, movement: Movement) -> StockLevel | None:
        async with self._in(conn):
            key = (movement.product_id, movement.warehouse_id)
            if key in self._state.levels:
                return None
            created = StockLevel(*key, movement.quantity, 0, 1, self.now)
            self._write(created, movement)
            return created

    async def apply_deltas(
        self,
        conn: _Tx,
        kind: MovementKind,
        deltas: Mapping[tuple[str, str], tuple[int, int, int | None]],
        reservation_id: UUID | None = None,
        reason: str | None = None,
    ) -> list[StockLevel]:
        async with self._in(conn):
            before = {k: self._state.levels.get(k) for k in sorted(deltas)}
            for key, level in before.items():
                version = deltas[key][2]
                if level is None or (version is not None and level.version != version):
                    raise VersionMiss()
            after = []
            for key, level in before.items():
                assert level is not None
                q, r, _ = deltas[key]
                new = replace(
                    level,
                    quantity=level.quantity + q,
                    reserved=level.reserved + r,
                    version=level.version + 1,
                    updated_at=self.now,
                )
                self._write(
                    new, Movement(*key, kind, q, r, new.quantity, new.reserved, new.version,
                                  reservation_id, reason),
                )  # fmt: skip
                after.append(new)
            return after

    def _write(self, level: StockLevel, movement: Movement) -> None:
        """Store a row's new state and append its ledger row (one per change)."""
        assert 0 <= level.reserved <= level.quantity, f"stock invariant broken: {level}"
        self._state.levels[(level.product_id, level.warehouse_id)] = level
        ledger = self._state.ledger
        ledger.append({
            "id": len(ledger) + 1, "product_id": movement.product_id,
            "warehouse_id": movement.warehouse_id, "kind": movement.kind.value,
            "quantity_delta": movement.quantity_delta, "reserved_delta": movement.reserved_delta,
            "quantity": movement.quantity, "reserved": movement.reserved,
            "version": movement.version, "reservation_id": movement.reservation_id,
            "reason": movement.reason, "created_at": self.now,
        })  # fmt: skip

    async def movements(
        self, product_id: str, after: int, limit: int
    ) -> list[dict[str, Any]] | None:
        async with self._in(None):
            if not any(k[0] == product_id for k in self._state.levels):
                return None
            rows = [m for m in self._state.ledger if m["product_id"] == product_id]
            return [dict(m) for m in rows if m["id"] > after][:limit]

    async def ensure_not_kit(self, conn: _Tx, product_id: str) -> None:
        async with self._in(conn):
            if self._rules(product_id).components is not None:
                raise IsKit(
                    f"{product_id} is a kit and has no stock rows", {"product_id": product_id}
                )

    # --- the reservation engine's batch -------------------------------------------------

    async def lock_rows(
        self,
        conn: _Tx,
        product_ids: Sequence[str],
        wait_for: Collection[str] = (),
        wait: float = 0.0,
        *,
        then_claims: bool = False,
    ) -> LockedRows:
        async with self._in(conn):
            rows, warehouses = self._rows(product_ids)
        # Like the PostgreSQL store: the rules come with the locks unless it waited.
        rules = None if wait_for else await self.load_rules(conn, product_ids)
        return LockedRows(rows, warehouses, set(), rules)

    async def insert_batch(
        self,
        conn: _Tx,
        rows: Sequence[tuple[StockLevel, StockLevel]],
        movements: Sequence[Movement],
        reservations: Sequence[tuple[UUID, str | None, int, str | None]],
        lines: Sequence[tuple[UUID, int, ReservationLine]],
    ) -> datetime:
        async with self._in(conn):
            state = self._state
            for before, _ in rows:
                if state.levels[(before.product_id, before.warehouse_id)] != before:
                    raise VersionMiss()
            for m in movements:  # in order: each row ends in its state after the batch
                level = StockLevel(m.product_id, m.warehouse_id, m.quantity, m.reserved, m.version)
                self._write(replace(level, updated_at=self.now), m)
            by_reservation: dict[UUID, list[tuple[int, ReservationLine]]] = {}
            for rid, n, line in lines:
                by_reservation.setdefault(rid, []).append((n, line))
            for rid, reference, ttl, customer in reservations:
                numbered = sorted(by_reservation[rid], key=lambda x: x[0])
                state.reservations[rid] = Reservation(
                    rid, ReservationStatus.ACTIVE, tuple(x for _, x in numbered), reference,
                    self.now, self.now + timedelta(seconds=ttl),
                )  # fmt: skip
                if customer is not None:
                    state.customers[rid] = customer
            return self.now

    def _rules(self, product_id: str) -> ProductRules:
        return self.rules.get(product_id, ProductRules())

    async def load_rules(self, conn: _Tx, product_ids: Sequence[str]) -> dict[str, ProductRules]:
        async with self._in(conn):
            return {p: replace(self._rules(p), waiting=0) for p in product_ids}

    async def kit_components(
        self, product_ids: Sequence[str]
    ) -> dict[str, tuple[tuple[KitComponent, ...] | None, int | None]]:
        return {
            p: (r.components, r.max_per_customer)
            for p in product_ids
            if (r := self.rules.get(p)) is not None
        }

    async def held_units(
        self, conn: _Tx, customers: Iterable[str], products: Iterable[str]
    ) -> dict[tuple[str, str], int]:
        async with self._in(conn):
            wanted_customers, wanted_products = set(customers), set(products)
            held: dict[tuple[str, str], int] = {}
            for rid, customer in self._state.customers.items():
                reservation = self._state.reservations[rid]
                if customer not in wanted_customers or reservation.status_at(self.now) not in (
                    ReservationStatus.ACTIVE,
                    ReservationStatus.COMMITTED,
                ):
                    continue
                for line in reservation.lines:
                    if line.product_id in wanted_products:
                        key = (customer, line.product_id)
                        held[key] = held.get(key, 0) + line.quantity
            return held

    async def lock_offers(
        self, conn: _Tx, entry_ids: Sequence[UUID]
    ) -> dict[UUID, tuple[int, int]]:
        """No waitlist here: no entry is waiting."""
        return {}

    async def mark_offered(self, conn: _Tx, offers: Mapping[UUID, UUID]) -> None:
        raise AssertionError("the memory store has no waitlist entries to offer")

    # --- reservations -------------------------------------------------------------------

    async def get_reservation(
        self, reservation_id: UUID, conn: _Tx | None = None, *, for_update: bool = False
    ) -> tuple[Reservation, datetime]:
        async with self._in(conn):
            found = self._state.reservations.get(reservation_id)
        if found is None:
            raise NotFound(f"reservation {reservation_id} not found", {"id": str(reservation_id)})
        return found, self.now

    async def update_reservation(self, conn: _Tx, reservation: Reservation) -> None:
        async with self._in(conn):
            self._state.reservations[reservation.id] = reservation

    async def expire_due(self, limit: int, exclude: Collection[UUID]) -> list[DueReservation]:
        async with self._in(None):
            due = sorted(
                (r for r in self._state.reservations.values()
                 if r.status is ReservationStatus.ACTIVE and r.expires_at <= self.now
                 and r.id not in exclude),
                key=lambda r: (r.expires_at, r.id),
            )[:limit]  # fmt: skip
            for reservation in due:
                for key, n in row_deltas(reservation.lines).items():
                    level, movement = self._state.levels[key].unreserve(
                        n, reservation.id, MovementKind.EXPIRED
                    )
                    self._write(replace(level, updated_at=self.now), movement)
                expired = replace(reservation, status=ReservationStatus.EXPIRED)
                self._state.reservations[reservation.id] = expired
            return [
                DueReservation(r.id, True, tuple(sorted({x.product_id for x in r.lines})))
                for r in due
            ]

    # --- idempotency keys ---------------------------------------------------------------

    async def claim_idempotency_keys(
        self, conn: _Tx, claims: Sequence[tuple[str, str, bytes]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        async with self._in(conn):
            keys = self._state.keys
            taken = {(s, k): keys[(s, k)][0] for s, k, _ in claims if (s, k) in keys}
            for scope, key, digest in claims:
                if (scope, key) not in taken:
                    keys[(scope, key)] = (IdempotencyRecord(digest, None, None), self.now)
            return taken

    async def store_idempotent_responses(
        self, conn: _Tx, answers: Sequence[tuple[str, str, int, bytes]]
    ) -> None:
        async with self._in(conn):
            keys = self._state.keys
            for scope, key, status, body in answers:
                record, at = keys[(scope, key)]
                keys[(scope, key)] = (replace(record, status_code=status, response=body), at)

    async def store_refusals(
        self, answers: Sequence[tuple[str, str, bytes, int, bytes]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        async with self._in(None):
            keys, taken = self._state.keys, {}
            for scope, key, digest, status, body in answers:
                if (found := keys.get((scope, key))) is not None:
                    taken[(scope, key)] = found[0]
                else:
                    keys[(scope, key)] = (IdempotencyRecord(digest, status, body), self.now)
            return taken

    async def drop_idempotency_keys(self, conn: _Tx, keys: Sequence[tuple[str, str]]) -> None:
        async with self._in(conn):
            for key in keys:
                del self._state.keys[key]

    async def purge_idempotency_keys(self, older_than_hours: int, limit: int) -> int:
        async with self._in(None):
            cutoff = self.now - timedelta(hours=older_than_hours)
            old = [k for k, (_, at) in self._state.keys.items() if at < cutoff][:limit]
            for key in old:
                del self._state.keys[key]
            return len(old)
