"""Product settings and listings: ``PUT/GET /v1/products/{id}``, ``GET /v1/products``,
``GET /v1/reservations`` (SQL and rules; HTTP lives in :mod:`inventory.http.catalog`).

A product exists once it has a stock row or settings. Settings are stored and validated
here; how reservations use them (safety stock, purchase limits, kit expansion) belongs
to the reservation engine. What this module does enforce is the shape of kits, because
a kit's stock is derived from its components and must never have rows of its own:

- a kit's components are 1-20 distinct products other than the kit, none of them a kit;
- a product with stock rows cannot become a kit (409 ``has_stock``), a component cannot
  become a kit (409 ``is_component``), and no stock row is ever created for a kit (409
  ``is_kit``, checked by the store's ``ensure_not_kit`` wherever rows are created).

The races between "make X a kit" and "create X's first stock row" are closed with a
transaction-scoped advisory lock per product id (shared by row creators, exclusive for
the settings writer), taken only on those two rare paths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson

from ..domain.commerce import IsKit
from ..domain.model import InventoryError, ValidationFailed
from ..store.commerce import kit_lock_sql
from ..store.db import Conn, _translated
from ..store.pg import Store
from ..store.reservations import _reservation

__all__ = [
    "CURSOR_PATTERN",
    "Component",
    "HasStock",
    "IsComponent",
    "ProductSettings",
    "ReservationFilter",
    "decode_cursor",
    "encode_cursor",
    "get_settings",
    "list_product_ids",
    "list_reservations",
    "put_settings",
]

MAX_COMPONENTS = 20


class HasStock(InventoryError):
    """Components were given to a product that has stock rows of its own."""

    code = "has_stock"
    status = 409


class IsComponent(InventoryError):
    """Components were given to a product that is a component of a kit (no kits of kits)."""

    code = "is_component"
    status = 409


@dataclass(frozen=True, slots=True)
class Component:
    product_id: str
    quantity: int


@dataclass(frozen=True, slots=True)
class ProductSettings:
    """What ``PUT /v1/products/{id}`` stores; the defaults are those of a product that
    never had settings."""

    product_id: str
    name: str | None = None
    safety_stock: int = 0
    low_stock_threshold: int | None = None
    max_per_customer: int | None = None
    components: tuple[Component, ...] | None = None

    def validate(self) -> None:
        """The rules that need no database: a kit's components are distinct, not itself."""
        if self.components is None:
            return
        seen: set[str] = set()
        for i, c in enumerate(self.components):
            if c.product_id == self.product_id:
                raise IsKit(f"{self.product_id} cannot be a component of itself: it is a kit")
            if c.product_id in seen:
                raise ValidationFailed(
                    f"component {c.product_id} is listed twice",
                    {"field": f"components[{i}].product_id"},
                )
            seen.add(c.product_id)


def _settings(row: Any) -> ProductSettings:
    components = None
    if row["components"] is not None:
        components = tuple(
            Component(c["product_id"], c["quantity"]) for c in orjson.loads(row["components"])
        )
    return ProductSettings(
        row["product_id"],
        row["name"],
        row["safety_stock"],
        row["low_stock_threshold"],
        row["max_per_customer"],
        components,
    )


_SETTINGS_COLS = "product_id, name, safety_stock, low_stock_threshold, max_per_customer, components"


async def put_settings(store: Store, settings: ProductSettings) -> tuple[ProductSettings, bool]:
    """Create or replace a product's settings; returns them and whether they are new.

    Errors (after :meth:`ProductSettings.validate`): a component that is a kit -> ``is_kit``;
    components for a product with stock rows -> ``has_stock``, or one that is itself a
    component of a kit -> ``is_component``.
    """
    settings.validate()
    components = settings.components
    with _translated():
        async with store.transaction() as conn:
            if components is not None:
                ids = sorted({settings.product_id, *(c.product_id for c in components)})
                await conn.execute(kit_lock_sql(shared=False), ids)
                await _check_kit(conn, settings.product_id, components)
            row = await conn.fetchrow(
                f"""INSERT INTO products ({_SETTINGS_COLS})
                    VALUES ($1, $2, $3, $4, $5, $6::jsonb)
                    ON CONFLICT (product_id) DO UPDATE SET
                        name = EXCLUDED.name, safety_stock = EXCLUDED.safety_stock,
                        low_stock_threshold = EXCLUDED.low_stock_threshold,
                        max_per_customer = EXCLUDED.max_per_customer,
                        components = EXCLUDED.components, updated_at = now()
                    RETURNING {_SETTINGS_COLS}, (xmax = 0) AS created""",
                settings.product_id,
                settings.name,
                settings.safety_stock,
                settings.low_stock_threshold,
                settings.max_per_customer,
                None
                if components is None
                else orjson.dumps(
                    [{"product_id": c.product_id, "quantity": c.quantity} for c in components]
                ).decode(),
            )
    assert row is not None
    return _settings(row), bool(row["created"])


async def _check_kit(conn: Conn, product_id: str, components: Sequence[Component]) -> None:
    ids = [c.product_id for c in components]
    kit = await conn.fetchval(
        """SELECT product_id FROM products
           WHERE product_id = ANY($1::text[]) AND components IS NOT NULL
           ORDER BY product_id LIMIT 1""",
        ids,
    )
    if kit is not None:
        raise IsKit(f"component {kit} is a kit; components cannot be kits", {"product_id": kit})
    if await conn.fetchval("SELECT 1 FROM stock_levels WHERE product_id = $1 LIMIT 1", product_id):
        raise HasStock(
            f"{product_id} has stock rows of its own, so it cannot be a kit",
            {"product_id": product_id},
        )
    parent = await conn.fetchval(
        """SELECT product_id FROM products
           WHERE components @> jsonb_build_array(jsonb_build_object('product_id', $1::text))
           ORDER BY product_id LIMIT 1""",
        product_id,
    )
    if parent is not None:
        raise IsComponent(
            f"{product_id} is a component of kit {parent}; components cannot be kits",
            {"product_id": product_id, "kit_id": parent},
        )


async def get_settings(store: Store, product_ids: Sequence[str]) -> dict[str, ProductSettings]:
    with _translated():
        async with store.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_SETTINGS_COLS} FROM products WHERE product_id = ANY($1::text[])",
                list(product_ids),
            )
    return {r["product_id"]: _settings(r) for r in rows}


async def list_product_ids(store: Store, after: str, limit: int) -> list[str]:
    """The first ``limit`` product ids after ``after`` (byte order) that have a stock row
    or settings. Both sources are read through byte-ordered indexes, ``limit`` each."""
    with _translated():
        async with store.connection() as conn:
            rows = await conn.fetch(
                """(SELECT DISTINCT product_id COLLATE "C" AS id FROM stock_levels
                    WHERE product_id COLLATE "C" > $1 ORDER BY 1 LIMIT $2)
                   UNION
                   (SELECT product_id FROM products WHERE product_id > $1
                    ORDER BY 1 LIMIT $2)
                   ORDER BY 1 LIMIT $2""",
                after,
                limit,
            )
    return [r["id"] for r in rows]


# --- reservations listing ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReservationFilter:
    reference: str | None = None
    customer_id: str | None = None
    status: str | None = None


CURSOR_PATTERN = r"^[0-9]{1,16}_[0-9a-f]{32}$"
_CURSOR_RE = re.compile(CURSOR_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_cursor(created_at: datetime, reservation_id: UUID) -> str:
    """Page cursor: the (created_at, id) of the last reservation of a page, as
    ``<microseconds since the epoch>_<id hex>``. Clients treat it as opaque; every string
    matching :data:`CURSOR_PATTERN` is a valid cursor, so the schema states exactly what
    the server accepts."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}_{reservation_id.hex}"


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    if _CURSOR_RE.fullmatch(cursor) is None:
        raise ValidationFailed(
            "after must be the next_after of a previous page", {"field": "after"}
        )
    micros, rid = cursor.split("_")
    return _EPOCH + timedelta(microseconds=int(micros)), UUID(hex=rid)


async def list_reservations(
    store: Store, where: ReservationFilter, after: tuple[datetime, UUID] | None, limit: int
) -> tuple[list[Any], str | None]:
    """A page of reservations, oldest first (reservations from the domain), and the
    cursor of the next page (None on the last). An overdue active reservation reads
    ``expired``, as ``GET /v1/reservations/{id}`` has it."""
    args: list[Any] = [where.reference, where.customer_id, where.status, limit + 1]
    cursor_sql = ""
    if after is not None:
        args += [after[0], after[1]]
        cursor_sql = "AND (r.created_at, r.id) > ($5::timestamptz, $6::uuid)"
    sql = f"""
        SELECT r.id, CASE WHEN r.status = 'active' AND r.expires_at <= clock_timestamp()
                          THEN 'expired' ELSE r.status END AS status,
               r.reference, r.created_at, r.expires_at,
               coalesce((SELECT jsonb_agg(jsonb_build_object('product_id', l.product_id,
                                 'warehouse_id', l.warehouse_id, 'quantity', l.quantity,
                                 'kit_id', l.kit_id)
                                 ORDER BY l.line_no)
                         FROM reservation_lines l WHERE l.reservation_id = r.id),
                        '[]') AS lines
        FROM reservations r
        WHERE ($1::text IS NULL OR r.reference = $1)
          AND ($2::text IS NULL OR r.customer_id = $2)
          AND ($3::text IS NULL OR (CASE WHEN r.status = 'active'
                                          AND r.expires_at <= clock_timestamp()
                                     THEN 'expired' ELSE r.status END) = $3)
          {cursor_sql}
        ORDER BY r.created_at, r.id
        LIMIT $4"""
    with _translated():
        async with store.connection() as conn:
            rows = await conn.fetch(sql, *args)
    page = [_reservation(r, orjson.loads(r["lines"])) for r in rows[:limit]]
    next_after = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_after = encode_cursor(last["created_at"], last["id"])
    return page, next_after
