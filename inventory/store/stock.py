"""Warehouses, stock rows and their ledger: the statements of stock changes.

Every write of stock rows appends its ledger rows in the same statement
(:meth:`StockStatements.apply_deltas` for adjustments, commits and releases;
:meth:`~inventory.store.reservations.ReservationStatements.insert_batch` for the
reservation engine's batches), so a stock change and its movement can never be apart.
Rows of one transaction are locked in (product, warehouse) order, so multi-row writes
never deadlock each other.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any
from uuid import UUID

import asyncpg

from ..domain.model import (
    Movement,
    MovementKind,
    NotFound,
    StockLevel,
    Warehouse,
    WarehouseStatus,
)
from .commerce import product_rules
from .db import Conn, Database, Row
from .port import LockedRows, RowsBusy, VersionMiss

__all__ = ["StockStatements"]


def _level(r: Row) -> StockLevel:
    return StockLevel(
        r["product_id"], r["warehouse_id"], r["quantity"], r["reserved"], r["version"],
        r["updated_at"],
    )  # fmt: skip


def _warehouse(r: Row) -> Warehouse:
    return Warehouse(r["id"], r["name"], r["location"], WarehouseStatus(r["status"]))


_LEVEL_COLS = "product_id, warehouse_id, quantity, reserved, version, updated_at"

_LOCK_ROWS = """
SELECT 1 FROM stock_levels
WHERE (product_id, warehouse_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY product_id, warehouse_id
FOR UPDATE
"""

# One statement: update rows (version-checked where a version is given) and append one
# ledger row per updated row. Returns the rows after the change.
_APPLY = f"""
WITH d AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
        AS d(product_id, warehouse_id, q, r, v)
), u AS (
    UPDATE stock_levels s
    SET quantity = s.quantity + d.q, reserved = s.reserved + d.r,
        version = s.version + 1, updated_at = now()
    FROM d
    WHERE s.product_id = d.product_id AND s.warehouse_id = d.warehouse_id
      AND (d.v IS NULL OR s.version = d.v)
    RETURNING s.product_id, s.warehouse_id, s.quantity, s.reserved, s.version, s.updated_at,
              d.q, d.r
), m AS (
    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                           quantity, reserved, version, reservation_id, reason)
    SELECT product_id, warehouse_id, $6, q, r, quantity, reserved, version, $7, $8 FROM u
)
SELECT {_LEVEL_COLS} FROM u
"""

_INSERT_LEVEL = f"""
WITH i AS (
    INSERT INTO stock_levels (product_id, warehouse_id, quantity, reserved, version)
    VALUES ($1, $2, $3, 0, 1)
    ON CONFLICT DO NOTHING
    RETURNING {_LEVEL_COLS}
), m AS (
    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                           quantity, reserved, version, reason)
    SELECT product_id, warehouse_id, 'adjusted', quantity, 0, quantity, 0, 1, $4 FROM i
)
SELECT {_LEVEL_COLS} FROM i
"""

_LOCK_ROWS_FOR_BATCH = f"""
WITH got AS MATERIALIZED (
    SELECT {_LEVEL_COLS} FROM stock_levels
    WHERE product_id = ANY($1::text[])
    ORDER BY product_id, warehouse_id FOR UPDATE{{skip}}
)
SELECT s.product_id, s.warehouse_id, g.quantity, g.reserved, g.version, g.updated_at,
       g.product_id IS NOT NULL AS locked, w.id, w.name, w.location, w.status,
       p.safety_stock, p.max_per_customer, p.components,
       (SELECT coalesce(sum(q.quantity), 0) FROM waitlist q
        WHERE q.product_id = s.product_id AND q.status = 'waiting')::bigint AS waiting
FROM stock_levels s JOIN warehouses w ON w.id = s.warehouse_id
LEFT JOIN got g ON g.product_id = s.product_id AND g.warehouse_id = s.warehouse_id
LEFT JOIN products p ON p.product_id = s.product_id
WHERE s.product_id = ANY($1::text[])
"""
_LOCK_FREE_ROWS = _LOCK_ROWS_FOR_BATCH.format(skip=" SKIP LOCKED")
_LOCK_ALL_ROWS = _LOCK_ROWS_FOR_BATCH.format(skip="")


class StockStatements(Database):
    """Warehouses, stock rows and the ledger."""

    # --- warehouses ----------------------------------------------------------------

    async def put_warehouse(self, wh: Warehouse) -> tuple[Warehouse, bool]:
        """Create or update; returns the stored warehouse and whether it was created."""
        async with self.connection() as conn:
            row = await conn.fetchrow(
                """INSERT INTO warehouses (id, name, location, status) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (id) DO UPDATE
                   SET name = $2, location = $3, status = $4, updated_at = now()
                   RETURNING id, name, location, status, (xmax = 0) AS created""",
                wh.id,
                wh.name,
                wh.location,
                wh.status.value,
            )
        assert row is not None
        return _warehouse(row), bool(row["created"])

    async def get_warehouse(self, warehouse_id: str) -> Warehouse:
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT id, name, location, status FROM warehouses WHERE id = $1", warehouse_id
            )
        if row is None:
            raise NotFound(f"warehouse {warehouse_id} not found", {"warehouse_id": warehouse_id})
        return _warehouse(row)

    async def list_warehouses(self) -> list[Warehouse]:
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT id, name, location, status FROM warehouses ORDER BY id")
        return [_warehouse(r) for r in rows]

    async def warehouses(self, conn: Conn, ids: Iterable[str]) -> dict[str, Warehouse]:
        rows = await conn.fetch(
            "SELECT id, name, location, status FROM warehouses WHERE id = ANY($1::text[])",
            list(set(ids)),
        )
        return {r["id"]: _warehouse(r) for r in rows}

    # --- stock ---------------------------------------------------------------------

    async def levels(
        self, product_ids: Sequence[str], conn: Conn | None = None
    ) -> tuple[list[StockLevel], dict[str, Warehouse]]:
        """Every stock row of the products, ordered, and the warehouses they are in."""
        sql = f"""SELECT s.{_LEVEL_COLS.replace(", ", ", s.")},
                         w.id, w.name, w.location, w.status
                  FROM stock_levels s JOIN warehouses w ON w.id = s.warehouse_id
                  WHERE s.product_id = ANY($1::text[])
                  ORDER BY s.product_id, s.warehouse_id"""
        if conn is None:
            async with self.connection() as c:
                rows = await c.fetch(sql, list(product_ids))
        else:
            rows = await conn.fetch(sql, list(product_ids))
        return [_level(r) for r in rows], {r["id"]: _warehouse(r) for r in rows}

    async def lock_level(self, conn: Conn, product_id: str, warehouse_id: str) -> StockLevel:
        """The row FOR UPDATE, or an empty (version 0) level when it does not exist."""
        row = await conn.fetchrow(
            f"""SELECT {_LEVEL_COLS} FROM stock_levels
                WHERE product_id = $1 AND warehouse_id = $2 FOR UPDATE""",
            product_id,
            warehouse_id,
        )
        return _level(row) if row else StockLevel(product_id, warehouse_id)

    async def insert_level(self, conn: Conn, movement: Movement) -> StockLevel | None:
        """Create a row from its first movement; None when another transaction won."""
        row = await conn.fetchrow(
            _INSERT_LEVEL,
            movement.product_id,
            movement.warehouse_id,
            movement.quantity,
            movement.reason,
        )
        return _level(row) if row else None

    async def apply_deltas(
        self,
        conn: Conn,
        kind: MovementKind,
        deltas: Mapping[tuple[str, str], tuple[int, int, int | None]],
        reservation_id: UUID | None = None,
        reason: str | None = None,
    ) -> list[StockLevel]:
        """Apply ``{(product, warehouse): (quantity_delta, reserved_delta, version)}``.

        ``version`` None updates unconditionally (relative updates under the row lock);
        otherwise the row must still have that version, else :class:`VersionMiss`.
        """
        keys = sorted(deltas)
        products = [k[0] for k in keys]
        warehouses = [k[1] for k in keys]
        if len(keys) > 1:
            await conn.execute(_LOCK_ROWS, products, warehouses)
        rows = await conn.fetch(
            _APPLY,
            products,
            warehouses,
            [deltas[k][0] for k in keys],
            [deltas[k][1] for k in keys],
            [deltas[k][2] for k in keys],
            kind.value,
            reservation_id,
            reason,
        )
        if len(rows) != len(keys):
            raise VersionMiss()
        return [_level(r) for r in rows]

    async def lock_rows(
        self,
        conn: Conn,
        product_ids: Sequence[str],
        wait_for: Collection[str] = (),
        wait: float = 0.0,
        *,
        then_claims: bool = False,
    ) -> LockedRows:
        """Lock the products' stock rows in (product, warehouse) order.

        Rows of ``wait_for`` products are locked first, waiting at most ``wait`` seconds
        (the transaction's ``lock_timeout``, see :meth:`transaction`; then
        :class:`RowsBusy`, the transaction being unusable) while holding nothing else;
        the others never wait: rows another transaction holds are skipped (``SKIP
        LOCKED``). Returns the locked rows, the warehouses they are in, the products
        with a row that could not be locked and, when nothing waited, the products'
        rules read by the same statement (a round trip fewer per batch; after a wait the
        statement's snapshot predates the wait, so the caller reads them again).
        ``then_claims``: the transaction claims idempotency keys next, so the
        ``lock_timeout`` is lifted again (a claim waits for a racing transaction's key as
        long as it takes).
        """
        rows: list[Row] = []
        rest = list(product_ids)
        if wait_for:
            try:
                # The client-side command timeout must not fire before lock_timeout.
                rows = await conn.fetch(_LOCK_ALL_ROWS, sorted(wait_for), timeout=wait + 1)
            except asyncpg.LockNotAvailableError:
                raise RowsBusy() from None
            if then_claims:
                await conn.execute("SELECT set_config('lock_timeout', '0', true)")
            rest = [p for p in rest if p not in wait_for]
        if rest:
            rows += await conn.fetch(_LOCK_FREE_ROWS, rest)
        return LockedRows(
            [_level(r) for r in rows if r["locked"]],
            {r["id"]: _warehouse(r) for r in rows if r["locked"]},
            {r["product_id"] for r in rows if not r["locked"]},
            None if wait_for else {r["product_id"]: product_rules(r) for r in rows},
        )

    async def movements(
        self, product_id: str, after: int, limit: int
    ) -> list[dict[str, Any]] | None:
        """Ledger page of a product, oldest first; None when the product has no stock row."""
        async with self.connection() as conn:
            exists = await conn.fetchval(
                "SELECT 1 FROM stock_levels WHERE product_id = $1 LIMIT 1", product_id
            )
            if not exists:
                return None
            rows = await conn.fetch(
                """SELECT id, product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                          quantity, reserved, version, reservation_id, reason, created_at
                   FROM movements WHERE product_id = $1 AND id > $2 ORDER BY id LIMIT $3""",
                product_id,
                after,
                limit,
            )
        return [dict(r) for r in rows]
