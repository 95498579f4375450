"""The stock invariants ``inventory check`` verifies (the flash-sale ones are in
:data:`inventory.store.commerce.COMMERCE_INVARIANTS`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .db import Conn, _translated

__all__ = ["INVARIANTS", "invariant_violations"]

INVARIANTS: dict[str, str] = {
    "0 <= reserved <= quantity on every row": """
        SELECT product_id, warehouse_id, quantity, reserved FROM stock_levels
        WHERE reserved < 0 OR reserved > quantity OR quantity < 0""",
    "reserved equals the sum of active reservation lines": """
        WITH active AS (
            SELECT l.product_id, l.warehouse_id, sum(l.quantity) AS held
            FROM reservation_lines l JOIN reservations r ON r.id = l.reservation_id
            WHERE r.status = 'active' GROUP BY 1, 2)
        SELECT coalesce(s.product_id, a.product_id) AS product_id,
               coalesce(s.warehouse_id, a.warehouse_id) AS warehouse_id,
               s.reserved, a.held
        FROM stock_levels s FULL JOIN active a USING (product_id, warehouse_id)
        WHERE coalesce(s.reserved, 0) <> coalesce(a.held, 0)""",
    "the ledger replays to quantity, reserved and version": """
        WITH replay AS (
            SELECT product_id, warehouse_id, sum(quantity_delta) AS quantity,
                   sum(reserved_delta) AS reserved, count(*) AS changes,
                   max(version) AS version
            FROM movements GROUP BY 1, 2)
        SELECT coalesce(s.product_id, r.product_id) AS product_id,
               coalesce(s.warehouse_id, r.warehouse_id) AS warehouse_id,
               s.quantity, r.quantity AS replayed_quantity, s.reserved,
               r.reserved AS replayed_reserved, s.version, r.changes
        FROM stock_levels s FULL JOIN replay r USING (product_id, warehouse_id)
        WHERE s.quantity IS DISTINCT FROM r.quantity OR s.reserved IS DISTINCT FROM r.reserved
           OR s.version IS DISTINCT FROM r.changes OR s.version IS DISTINCT FROM r.version""",
    "versions are contiguous and each ledger row records its running state": """
        SELECT product_id, warehouse_id, version, quantity, running_quantity
        FROM (SELECT product_id, warehouse_id, version, quantity, reserved,
                     row_number() OVER w AS n,
                     sum(quantity_delta) OVER w AS running_quantity,
                     sum(reserved_delta) OVER w AS running_reserved
              FROM movements
              WINDOW w AS (PARTITION BY product_id, warehouse_id ORDER BY version, id)) m
        WHERE version <> n OR quantity <> running_quantity OR reserved <> running_reserved""",
    "reservation lines match their ledger rows": """
        WITH lines AS (
            SELECT reservation_id, product_id, warehouse_id, sum(quantity) AS quantity
            FROM reservation_lines GROUP BY 1, 2, 3),
        booked AS (
            SELECT reservation_id, product_id, warehouse_id, sum(reserved_delta) AS quantity
            FROM movements WHERE kind = 'reserved' GROUP BY 1, 2, 3)
        SELECT reservation_id, product_id, warehouse_id, l.quantity, b.quantity AS booked
        FROM lines l FULL JOIN booked b USING (reservation_id, product_id, warehouse_id)
        WHERE l.quantity IS DISTINCT FROM b.quantity""",
}


async def invariant_violations(
    conn: Conn, limit: int = 20, invariants: Mapping[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Each invariant's name and up to ``limit`` offending rows (empty when it holds);
    ``invariants`` (name -> SQL) defaults to :data:`INVARIANTS`.

    Runs in one REPEATABLE READ transaction so all checks see the same snapshot.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    with _translated():
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for name, sql in (INVARIANTS if invariants is None else invariants).items():
                rows = await conn.fetch(f"SELECT * FROM ({sql}) v LIMIT {int(limit)}")
                found[name] = [dict(r) for r in rows]
    return found
