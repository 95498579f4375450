"""HTTP handlers for product settings, listings and bulk stock changes.

Kept apart from :mod:`.api` so the routes can grow without touching the hot handlers.
Same conventions: rows of a route table (:func:`catalog_routes`), handlers that parse
with msgspec, call :mod:`inventory.service.catalog` / :mod:`inventory.service.bulk` and
encode.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response

from ..domain.commerce import IsKit
from ..domain.model import MAX_QUANTITY, NotFound, ValidationFailed, is_product_id
from ..service import bulk, catalog
from .api import (
    MAX_PAGE,
    PRODUCT_ID_SCHEMA,
    READ_ERRORS,
    WRITE_ERRORS,
    Backend,
    RouteHandlers,
    _int_param,
    _product_id,
    level_out,
    read_body,
    reservation_out,
)
from .errors import json_response
from .routing import Link, QueryParam, RouteDoc, Row
from .schemas import (
    MAX_STOCK,
    NO_NUL,
    KitStockOut,
    LevelOut,
    ProductId,
    ProductStockOut,
    ReservationOut,
    StockBodyOrNull,
    _In,
    decode,
)

__all__ = [
    "BulkIn",
    "BulkOut",
    "ProductIn",
    "ProductOut",
    "ProductsOut",
    "ReservationsOut",
    "catalog_routes",
]

BULK_MAX_BODY = 1024 * 1024
Units = Annotated[int, Meta(ge=0, le=MAX_STOCK)]


class ComponentIn(_In):
    product_id: ProductId
    quantity: Annotated[int, Meta(ge=1, le=MAX_QUANTITY)]


class ProductIn(_In):
    name: Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)] | None = None
    safety_stock: Units = 0
    low_stock_threshold: Units | None = None
    max_per_customer: Annotated[int, Meta(ge=1, le=MAX_QUANTITY)] | None = None
    components: (
        Annotated[list[ComponentIn], Meta(min_length=1, max_length=catalog.MAX_COMPONENTS)] | None
    ) = None


class ComponentOut(Struct):
    product_id: str
    quantity: int


class ProductOut(Struct):
    product_id: str
    name: str | None
    safety_stock: int
    low_stock_threshold: int | None
    max_per_customer: int | None
    components: list[ComponentOut] | None
    stock: StockBodyOrNull  # ProductStockOut, KitStockOut for a kit, or null


class ProductsOut(Struct):
    products: list[ProductOut]
    next_after: str | None


class ReservationsOut(Struct):
    reservations: list[ReservationOut]
    next_after: str | None


class BulkItemIn(_In):
    product_id: ProductId
    warehouse_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    delta: Annotated[int, Meta(ge=-MAX_STOCK, le=MAX_STOCK)] | None = None
    quantity: Units | None = None
    expected_version: Annotated[int, Meta(ge=0, le=2**62)] | None = None
    reason: Annotated[str, Meta(max_length=500, pattern=NO_NUL)] | None = None


# Exactly one of ``delta`` (not 0) and ``quantity`` per item: the handler refuses the rest
# with 422, and the schema says so.
_ONE_CHANGE = {
    "oneOf": [
        {
            "required": ["delta"],
            "properties": {
                "delta": {"type": "integer", "not": {"const": 0}},
                "quantity": {"type": "null"},
            },
        },
        {
            "required": ["quantity"],
            "properties": {"quantity": {"type": "integer"}, "delta": {"type": "null"}},
        },
    ]
}


class BulkIn(_In):
    items: Annotated[
        list[Annotated[BulkItemIn, Meta(extra_json_schema=_ONE_CHANGE)]],
        Meta(min_length=1, max_length=bulk.MAX_ITEMS),
    ]
    atomic: bool = False


class BulkResultOut(Struct, omit_defaults=True):
    index: int
    status: int
    level: LevelOut | None = None
    error: dict[str, Any] | None = None


class BulkOut(Struct):
    results: list[BulkResultOut]


def _product_out(
    product_id: str,
    settings: catalog.ProductSettings | None,
    stock: ProductStockOut | KitStockOut | None,
) -> ProductOut:
    s = settings or catalog.ProductSettings(product_id)
    return ProductOut(
        product_id,
        s.name,
        s.safety_stock,
        s.low_stock_threshold,
        s.max_per_customer,
        None
        if s.components is None
        else [ComponentOut(c.product_id, c.quantity) for c in s.components],
        stock,
    )


class CatalogHandlers(RouteHandlers):
    """The catalog, listing and bulk routes."""

    async def _products(self, ids: list[str]) -> list[ProductOut]:
        """Bodies of ``ids`` (in that order), skipping ids with neither rows nor settings;
        ``stock`` is what ``GET /v1/products/{id}/stock`` answers (a kit's body for a kit)."""
        settings = await catalog.get_settings(self.store, ids)
        bodies = await self._stock_bodies(ids, settings)
        return [
            _product_out(p, settings.get(p), bodies.get(p))
            for p in ids
            if p in settings or p in bodies
        ]

    async def put_product(self, request: Request) -> Response:
        product_id = _product_id(request)
        body, _ = decode(await read_body(request), ProductIn)
        components = None
        if body.components is not None:
            components = tuple(catalog.Component(c.product_id, c.quantity) for c in body.components)
        _, created = await catalog.put_settings(
            self.store,
            catalog.ProductSettings(
                product_id,
                body.name,
                body.safety_stock,
                body.low_stock_threshold,
                body.max_per_customer,
                components,
            ),
        )
        self.service.settings_changed(product_id)
        [out] = await self._products([product_id])
        return json_response(out, 201 if created else 200)

    async def get_product(self, request: Request) -> Response:
        product_id = _product_id(request)
        found = await self._products([product_id])
        if not found:
            raise NotFound(
                f"product {product_id} has neither settings nor stock", {"product_id": product_id}
            )
        return json_response(found[0])

    async def list_products(self, request: Request) -> Response:
        after = request.query_params.get("after")
        if after is not None and not is_product_id(after):
            raise ValidationFailed("after must be a product id", {"field": "after"})
        limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
        ids = await catalog.list_product_ids(self.store, after or "", limit)
        products = await self._products(ids)
        return json_response(ProductsOut(products, ids[-1] if len(ids) == limit else None))

    async def list_reservations(self, request: Request) -> Response:
        q = request.query_params
        status = q.get("status") or None
        if status is not None and status not in ("active", "committed", "released", "expired"):
            raise ValidationFailed(
                "status must be active, committed, released or expired", {"field": "status"}
            )
        for name, longest in (("reference", 255), ("customer_id", 128)):
            value = q.get(name)
            if value is not None and (not value or len(value) > longest or "\x00" in value):
                raise ValidationFailed(f"{name} must be 1-{longest} characters", {"field": name})
        after = catalog.decode_cursor(q["after"]) if "after" in q else None
        limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
        page, next_after = await catalog.list_reservations(
            self.store,
            catalog.ReservationFilter(q.get("reference"), q.get("customer_id"), status),
            after,
            limit,
        )
        return json_response(ReservationsOut([reservation_out(r) for r in page], next_after))

    async def bulk_stock(self, request: Request) -> Response:
        body, _ = decode(await read_body(request, BULK_MAX_BODY), BulkIn)
        items = []
        for i, item in enumerate(body.items):
            if (item.delta is None) == (item.quantity is None):
                raise ValidationFailed(
                    "each item needs exactly one of delta and quantity",
                    {"field": f"items[{i}]"},
                )
            if item.delta == 0:
                raise ValidationFailed("delta must not be 0", {"field": f"items[{i}].delta"})
            items.append(
                bulk.BulkItem(
                    item.product_id,
                    item.warehouse_id,
                    item.delta,
                    item.quantity,
                    item.expected_version,
                    item.reason,
                )
            )
        try:
            results = await bulk.apply(self.service, self.store, items, atomic=body.atomic)
        except bulk.BulkFailed as exc:
            rendered = msgspec.to_builtins([_result_out(r) for r in exc.details])
            raise bulk.BulkFailed(exc.message, {"results": rendered}) from None
        return json_response(BulkOut([_result_out(r) for r in results]))


def _result_out(r: bulk.BulkResult) -> BulkResultOut:
    if r.error is not None:
        return BulkResultOut(
            r.index,
            r.error.status,
            error={"code": r.error.code, "message": r.error.message, "details": r.error.details},
        )
    assert r.level is not None
    return BulkResultOut(r.index, 200, level=level_out(r.level))


def catalog_routes(backend: Backend) -> list[Row]:
    """The product, reservation listing and bulk operations."""
    h = CatalogHandlers(backend)
    after_product = QueryParam(
        "after",
        {"type": "string", "pattern": PRODUCT_ID_SCHEMA["pattern"]},
        "`product_id` to continue after (`next_after` of the previous page).",
    )
    limit = QueryParam(
        "limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "Page size (default 100)."
    )
    return [
        ("/v1/products", "GET", h.list_products, RouteDoc(
            "List products (byte order of product_id)", "read", None, ProductsOut,
            operation_id="listProducts", tag="Products", errors=READ_ERRORS,
            query=(after_product, limit),
            description="Every product with a stock row or settings, ordered by `product_id` "
            "(byte order), in the body `getProduct` answers; `next_after` is null on the last "
            "page.",
        )),
        ("/v1/products/{product_id}", "GET", h.get_product, RouteDoc(
            "Read a product's settings and stock", "read", None, ProductOut,
            operation_id="getProduct", tag="Products", errors=(NotFound, *READ_ERRORS),
            description="`stock` is the body `getProductStock` answers (`KitStockOut` for a "
            "kit), null while a product that is no kit has no stock row. 404 when the product "
            "has neither settings nor a stock row.",
        )),
        ("/v1/products/{product_id}", "PUT", h.put_product, RouteDoc(
            "Create or replace a product's settings", "admin", ProductIn, ProductOut,
            operation_id="putProduct", tag="Products", also=(201,),
            errors=(IsKit, catalog.HasStock, catalog.IsComponent, *WRITE_ERRORS),
            example={"name": "Blue mug", "safety_stock": 2, "low_stock_threshold": 10},
            description="201 when the product had no settings yet, 200 when they were "
            "replaced (an omitted field takes its default).",
            links=(Link("getProduct", {"product_id": "$request.path.product_id"}),),
        )),
        ("/v1/reservations", "GET", h.list_reservations, RouteDoc(
            "List reservations, oldest first", "read", None, ReservationsOut,
            operation_id="listReservations", tag="Reservations", errors=READ_ERRORS,
            query=(
                QueryParam(
                    "reference",
                    {"type": "string", "minLength": 1, "maxLength": 255, "pattern": NO_NUL},
                ),
                QueryParam(
                    "customer_id",
                    {"type": "string", "minLength": 1, "maxLength": 128, "pattern": NO_NUL},
                ),
                QueryParam(
                    "status", {"enum": ["active", "committed", "released", "expired"]}
                ),
                QueryParam(
                    "after", {"type": "string", "pattern": catalog.CURSOR_PATTERN},
                    "The opaque `next_after` of the previous page.",
                ),
                limit,
            ),
        )),
        ("/v1/stock/bulk", "POST", h.bulk_stock, RouteDoc(
            "Up to 1,000 adjustments and sets", "admin", BulkIn, BulkOut,
            operation_id="bulkChangeStock", tag="Stock", errors=(bulk.BulkFailed, *WRITE_ERRORS),
            example={"items": [{"product_id": "mug", "warehouse_id": "w1", "delta": 5}]},
            description="Items are applied in order, each with the usual rules; `status` per "
            "item is what it alone would have answered. With `atomic: true`, any failing "
            "item -> 409 `bulk_failed` and nothing is written.",
        )),
    ]  # fmt: skip
