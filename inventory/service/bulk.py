"""``POST /v1/stock/bulk``: up to 1,000 adjustments and sets in one transaction.

Each item follows the rules of its single-item route (unknown warehouse 404, a kit 409
``is_kit``, stale ``expected_version`` 409, removal beyond ``available`` 409, a set that
changes nothing writes nothing) and items apply in order: two items on one row are two
changes, two versions, two ledger rows, exactly as two requests one after the other.

Why one transaction and no savepoints: every touched row is locked up front (in the
(product, warehouse) order every writer uses, so no deadlocks), the items are applied in
memory through the domain, and only then is anything written: one UPDATE for existing
rows, one INSERT for new rows and one INSERT for all ledger rows. A failing item
therefore costs nothing to undo; ``atomic`` simply writes nothing when any item failed.
This is what makes ``inventory import`` fast (one round trip per 1,000 rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from ..domain.commerce import IsKit
from ..domain.model import Contention, InventoryError, Movement, NotFound, StockLevel
from ..store.commerce import kits_among
from ..store.db import Conn, _translated
from ..store.pg import Store
from ..store.stock import _LEVEL_COLS, _level

if TYPE_CHECKING:
    from .inventory import InventoryService

__all__ = ["MAX_ITEMS", "BulkFailed", "BulkItem", "BulkResult", "apply"]

MAX_ITEMS = 1000


class BulkFailed(InventoryError):
    """An ``atomic`` bulk request had a failing item; nothing was written."""

    code = "bulk_failed"
    status = 409


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One adjustment (``delta``) or set (``quantity``); exactly one of them is given."""

    product_id: str
    warehouse_id: str
    delta: int | None = None
    quantity: int | None = None
    expected_version: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class BulkResult:
    """The row after the item (``level``) or why the item failed (``error``)."""

    index: int
    level: StockLevel | None = None
    error: InventoryError | None = None


class _Retry(Exception):
    """Another transaction created one of the new rows first: roll back and redo."""


class _Abort(Exception):
    """``atomic`` and an item failed: roll back."""


async def apply(
    service: InventoryService, store: Store, items: Sequence[BulkItem], *, atomic: bool
) -> list[BulkResult]:
    """Apply ``items`` in order; per-item results in item order.

    With ``atomic`` and any failing item, nothing is written and :class:`BulkFailed` is
    raised with the results (``details`` is filled in by the HTTP layer, which knows the
    statuses).
    """
    for _ in range(3):
        try:
            with _translated():
                async with store.transaction() as conn:
                    results, changed = await _apply_locked(conn, items)
                    if atomic and any(r.error is not None for r in results):
                        raise _Abort()
        except _Retry:
            continue
        except _Abort:
            raise BulkFailed("an item failed, so nothing was written", results) from None
        for product_id in changed:
            service.engine.forget(product_id)
        if changed:
            service.on_change()
        return results
    raise Contention("stock rows kept being created concurrently; retry")


async def _apply_locked(conn: Conn, items: Sequence[BulkItem]) -> tuple[list[BulkResult], set[str]]:
    keys = sorted({(x.product_id, x.warehouse_id) for x in items})
    products = [k[0] for k in keys]
    warehouses_wanted = sorted({k[1] for k in keys})
    known_warehouses = {
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM warehouses WHERE id = ANY($1::text[])", warehouses_wanted
        )
    }
    kits = await kits_among(conn, products)
    rows = await conn.fetch(
        f"""SELECT {_LEVEL_COLS} FROM stock_levels
            WHERE (product_id, warehouse_id) IN
                  (SELECT * FROM unnest($1::text[], $2::text[]))
            ORDER BY product_id, warehouse_id
            FOR UPDATE""",
        products,
        [k[1] for k in keys],
    )
    state = {(r["product_id"], r["warehouse_id"]): _level(r) for r in rows}
    existed = set(state)
    original = {k: lv.version for k, lv in state.items()}
    results: list[BulkResult] = []
    movements: list[Movement] = []
    for index, item in enumerate(items):
        key = (item.product_id, item.warehouse_id)
        level = state.get(key) or StockLevel(*key)
        try:
            if item.warehouse_id not in known_warehouses:
                raise NotFound(
                    f"warehouse {item.warehouse_id} not found",
                    {"warehouse_id": item.warehouse_id},
                )
            if item.product_id in kits:
                raise IsKit(
                    f"{item.product_id} is a kit and has no stock rows",
                    {"product_id": item.product_id},
                )
            level.check_version(item.expected_version)
            if item.delta is not None:
                change: tuple[StockLevel, Movement] | None = level.adjust(item.delta, item.reason)
            else:
                assert item.quantity is not None
                change = level.set_quantity(item.quantity, item.reason)
        except InventoryError as exc:
            results.append(BulkResult(index, error=exc))
            continue
        if change is not None:
            level, movement = change
            state[key] = level
            movements.append(movement)
        results.append(BulkResult(index, level=level))
    if not movements:
        return results, set()
    now = await _write(conn, state, existed, movements)
    # A row this request changed reads as changed now (the transaction's time).
    return [
        BulkResult(r.index, level=replace(r.level, updated_at=now))
        if r.level is not None and r.level.version != original.get(_key(r.level), 0)
        else r
        for r in results
    ], {m.product_id for m in movements}


def _key(level: StockLevel) -> tuple[str, str]:
    return level.product_id, level.warehouse_id


async def _write(
    conn: Conn,
    state: dict[tuple[str, str], StockLevel],
    existed: set[tuple[str, str]],
    movements: Sequence[Movement],
) -> datetime:
    touched = sorted({(m.product_id, m.warehouse_id) for m in movements})
    old = [k for k in touched if k in existed]
    new = [k for k in touched if k not in existed]
    if old:
        await conn.execute(
            """UPDATE stock_levels s
               SET quantity = d.q, version = d.v, updated_at = now()
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                   AS d(p, w, q, v)
               WHERE s.product_id = d.p AND s.warehouse_id = d.w""",
            [k[0] for k in old],
            [k[1] for k in old],
            [state[k].quantity for k in old],
            [state[k].version for k in old],
        )
    if new:
        inserted = await conn.fetchval(
            """WITH i AS (
                   INSERT INTO stock_levels (product_id, warehouse_id, quantity, reserved, version)
                   SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                                        $5::bigint[])
                   ON CONFLICT DO NOTHING RETURNING 1)
               SELECT count(*) FROM i""",
            [k[0] for k in new],
            [k[1] for k in new],
            [state[k].quantity for k in new],
            [0] * len(new),
            [state[k].version for k in new],
        )
        if inserted != len(new):
            raise _Retry()
    now: datetime = await conn.fetchval(
        """WITH m AS (
               INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta,
                                      reserved_delta, quantity, reserved, version, reason)
               SELECT p, w, 'adjusted', qd, 0, q, r, v, reason
               FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[],
                           $6::bigint[], $7::text[])
                   WITH ORDINALITY AS m(p, w, qd, q, r, v, reason, n)
               ORDER BY n)
           SELECT now()""",
        [m.product_id for m in movements],
        [m.warehouse_id for m in movements],
        [m.quantity_delta for m in movements],
        [m.quantity for m in movements],
        [m.reserved for m in movements],
        [m.version for m in movements],
        [m.reason for m in movements],
    )
    return now
