"""Reservations: the engine's batch write, reads, status changes and expiry."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from ..domain.model import (
    Movement,
    NotFound,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockLevel,
)
from .db import Conn, Database, Row
from .port import DueReservation, VersionMiss

__all__ = ["ReservationStatements"]


def _reservation(r: Row, lines: Iterable[Row | Mapping[str, Any]]) -> Reservation:
    return Reservation(
        r["id"],
        ReservationStatus(r["status"]),
        tuple(
            ReservationLine(x["product_id"], x["warehouse_id"], x["quantity"], x.get("kit_id"))
            for x in lines
        ),
        r["reference"],
        r["created_at"],
        r["expires_at"],
    )


# ``at`` is read when the row locks are held (clock_timestamp(), not the transaction's
# start): created_at and expires_at count from it.
_INSERT_BATCH = """
WITH t AS MATERIALIZED (SELECT clock_timestamp() AS at), u AS (
    UPDATE stock_levels s
    SET reserved = s.reserved + d.r, version = s.version + d.n, updated_at = now()
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
        AS d(product_id, warehouse_id, r, n, v)
    WHERE s.product_id = d.product_id AND s.warehouse_id = d.warehouse_id AND s.version = d.v
    RETURNING 1
), m AS (
    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                           quantity, reserved, version, reservation_id)
    SELECT p, w, 'reserved', 0, r, q, res, v, rid
    FROM unnest($6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],
                $11::bigint[], $12::uuid[]) AS m(p, w, r, q, res, v, rid)
), r AS (
    INSERT INTO reservations (id, status, reference, created_at, expires_at, customer_id)
    SELECT id, 'active', ref, t.at, t.at + make_interval(secs => ttl), cid
    FROM unnest($13::uuid[], $14::text[], $15::float8[], $21::text[]) AS r(id, ref, ttl, cid), t
), l AS (
    INSERT INTO reservation_lines (reservation_id, line_no, product_id, warehouse_id, quantity,
                                   kit_id)
    SELECT * FROM unnest($16::uuid[], $17::int[], $18::text[], $19::text[], $20::bigint[],
                         $22::text[])
)
SELECT (SELECT count(*) FROM u) AS updated, (SELECT at FROM t) AS at
"""

# Set-based expiry (policy: inventory/service/expiry.py). $1 batch size, $2 reservation
# ids to leave alone this round. One row per due reservation: released (all its rows
# were locked) or not, and its products. A ledger row is never dated before the
# expires_at it records (the transaction may have begun just before it).
_EXPIRE = """
WITH due AS (
    SELECT id, expires_at FROM reservations
    WHERE status = 'active' AND expires_at <= clock_timestamp() AND id <> ALL($2::uuid[])
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), lines AS (
    SELECT l.reservation_id, d.expires_at, l.product_id, l.warehouse_id, sum(l.quantity) AS n
    FROM reservation_lines l JOIN due d ON d.id = l.reservation_id
    GROUP BY 1, 2, 3, 4
), locked AS (
    SELECT s.product_id, s.warehouse_id, s.quantity, s.reserved, s.version
    FROM stock_levels s
    WHERE (s.product_id, s.warehouse_id) IN (SELECT product_id, warehouse_id FROM lines)
    ORDER BY s.product_id, s.warehouse_id
    FOR UPDATE SKIP LOCKED
), eligible AS (
    SELECT d.id FROM due d
    WHERE NOT EXISTS (
        SELECT 1 FROM lines l LEFT JOIN locked k USING (product_id, warehouse_id)
        WHERE l.reservation_id = d.id AND k.product_id IS NULL)
), moves AS (
    SELECT l.reservation_id, l.expires_at, l.product_id, l.warehouse_id, l.n, k.quantity,
           k.reserved - sum(l.n) OVER w AS reserved,
           k.version + row_number() OVER w AS version
    FROM lines l
    JOIN eligible e ON e.id = l.reservation_id
    JOIN locked k USING (product_id, warehouse_id)
    WINDOW w AS (PARTITION BY l.product_id, l.warehouse_id
                 ORDER BY l.expires_at, l.reservation_id)
), rows AS (
    UPDATE stock_levels s
    SET reserved = s.reserved - t.n, version = s.version + t.changes, updated_at = now()
    FROM (SELECT product_id, warehouse_id, sum(n) AS n, count(*) AS changes
          FROM moves GROUP BY 1, 2) t
    WHERE s.product_id = t.product_id AND s.warehouse_id = t.warehouse_id
), ledger AS (
    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                           quantity, reserved, version, reservation_id, created_at)
    SELECT product_id, warehouse_id, 'expired', 0, -n, quantity, reserved, version,
           reservation_id, greatest(now(), expires_at)
    FROM moves ORDER BY product_id, warehouse_id, version
), done AS (
    UPDATE reservations r SET status = 'expired', updated_at = now()
    FROM eligible e WHERE r.id = e.id
)
SELECT d.id, (d.id IN (SELECT id FROM eligible)) AS released,
       ARRAY(SELECT DISTINCT product_id FROM lines WHERE reservation_id = d.id) AS products
FROM due d
"""


class ReservationStatements(Database):
    """Reservations and their lines."""

    async def insert_batch(
        self,
        conn: Conn,
        rows: Sequence[tuple[StockLevel, StockLevel]],
        movements: Sequence[Movement],
        reservations: Sequence[tuple[UUID, str | None, int, str | None]],
        lines: Sequence[tuple[UUID, int, ReservationLine]],
    ) -> datetime:
        """Write a combined batch of reservations in one statement.

        ``rows`` are (locked state, state after the batch) pairs: each row is updated once
        (version-checked against the locked state) while ``movements`` records every
        individual change with its own version, exactly as if the reservations had been
        applied one after another. Returns ``created_at``, the database clock read
        while the row locks are held (``expires_at`` is it plus each TTL).
        """
        before = [b for b, _ in rows]
        result = await conn.fetchrow(
            _INSERT_BATCH,
            [b.product_id for b in before],
            [b.warehouse_id for b in before],
            [a.reserved - b.reserved for b, a in rows],
            [a.version - b.version for b, a in rows],
            [b.version for b in before],
            [m.product_id for m in movements],
            [m.warehouse_id for m in movements],
            [m.reserved_delta for m in movements],
            [m.quantity for m in movements],
            [m.reserved for m in movements],
            [m.version for m in movements],
            [m.reservation_id for m in movements],
            [r[0] for r in reservations],
            [r[1] for r in reservations],
            [float(r[2]) for r in reservations],
            [x[0] for x in lines],
            [x[1] for x in lines],
            [x[2].product_id for x in lines],
            [x[2].warehouse_id for x in lines],
            [x[2].quantity for x in lines],
            [r[3] for r in reservations],
            [x[2].kit_id for x in lines],
        )
        assert result is not None
        if result["updated"] != len(rows):
            raise VersionMiss()
        at: datetime = result["at"]
        return at

    # --- reservations --------------------------------------------------------------

    async def get_reservation(
        self, reservation_id: UUID, conn: Conn | None = None, *, for_update: bool = False
    ) -> tuple[Reservation, datetime]:
        """The reservation and the database clock (``now``) read with it."""
        sql = """SELECT id, status, reference, created_at, expires_at, clock_timestamp() AS now
                 FROM reservations WHERE id = $1""" + (" FOR UPDATE" if for_update else "")
        lines_sql = """SELECT product_id, warehouse_id, quantity, kit_id FROM reservation_lines
                       WHERE reservation_id = $1 ORDER BY line_no"""
        if conn is None:
            async with self.connection() as c:
                row = await c.fetchrow(sql, reservation_id)
                lines = await c.fetch(lines_sql, reservation_id) if row else []
        else:
            row = await conn.fetchrow(sql, reservation_id)
            lines = await conn.fetch(lines_sql, reservation_id) if row else []
        if row is None:
            raise NotFound(f"reservation {reservation_id} not found", {"id": str(reservation_id)})
        return _reservation(row, lines), row["now"]

    async def update_reservation(self, conn: Conn, reservation: Reservation) -> None:
        await conn.execute(
            "UPDATE reservations SET status = $2, expires_at = $3, updated_at = now() "
            "WHERE id = $1",
            reservation.id,
            reservation.status.value,
            reservation.expires_at,
        )

    async def expire_due(self, limit: int, exclude: Collection[UUID]) -> list[DueReservation]:
        """One transaction: release up to ``limit`` due reservations, oldest deadline
        first, ``exclude`` left alone; a reservation with a row another transaction holds
        is not released (``released`` false)."""
        async with self.transaction() as conn:
            rows = await conn.fetch(_EXPIRE, limit, list(exclude))
        return [DueReservation(r["id"], r["released"], tuple(r["products"])) for r in rows]
