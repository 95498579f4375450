"""HTTP API of stock, warehouses and reservations, and the request helpers every route
module shares (:mod:`.catalog`, :mod:`.waitlist` and :mod:`.webhooks` hold the other
routes). Handlers are thin: parse, call the service, encode. Each operation is a row of
:func:`api_routes`'s table, its scope declared in its :class:`~.routing.RouteDoc`
(:mod:`.routing` enforces it); every error leaves through :mod:`.errors`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol
from uuid import UUID

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..domain.commerce import (
    CustomerRequired,
    IsKit,
    PurchaseLimitExceeded,
    active_available,
    kit_reservable,
    reservable,
)
from ..domain.model import (
    IDEMPOTENCY_KEY_RE,
    IDEMPOTENCY_KEY_RULE,
    PRODUCT_ID_RE,
    PRODUCT_ID_RULE,
    WAREHOUSE_ID_RULE,
    Contention,
    InsufficientStock,
    InvalidState,
    InventoryError,
    NotFound,
    RequestedLine,
    Reservation,
    ReservationStatus,
    StockLevel,
    Unavailable,
    ValidationFailed,
    VersionConflict,
    Warehouse,
    WarehouseStatus,
    WarehouseUnavailable,
    is_product_id,
    is_warehouse_id,
    schema_pattern,
)
from ..service.catalog import ProductSettings, get_settings
from ..service.idempotency import Idempotency, Replay, body_hash
from ..service.inventory import InventoryService
from ..store.db import StoreIntegrityError
from ..store.pg import Store
from .errors import (
    ClientDisconnected,
    PayloadTooLarge,
    UnsupportedMediaType,
    error_body,
    json_response,
)
from .routing import Errors, Link, QueryParam, RouteDoc, Row
from .schemas import (
    AdjustmentIn,
    ExtendIn,
    KitComponentStockOut,
    KitStockOut,
    LevelOut,
    MovementOut,
    MovementsOut,
    ProductStockOut,
    ReservationLineOut,
    ReservationOut,
    ReserveIn,
    SetQuantityIn,
    StockBody,
    StockListOut,
    WarehouseIn,
    WarehouseOut,
    WarehousesOut,
    decode,
)

__all__ = [
    "MAX_BODY",
    "PRODUCT_IDS_PARAM",
    "PRODUCT_ID_SCHEMA",
    "READ_ERRORS",
    "WRITE_ERRORS",
    "Backend",
    "RouteHandlers",
    "api_routes",
    "idempotency_key",
    "product_ids_param",
    "read_body",
    "reservation_out",
]

MAX_BODY = 64 * 1024
MAX_STOCK_QUERY = 500
MAX_PAGE = 1000


# --- request helpers ------------------------------------------------------------------


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The JSON body, refusing other media types and more than ``limit`` bytes (without
    reading them all)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType("the body must be sent as Content-Type: application/json")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the body exceeds {limit} bytes")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("the client disconnected before the body arrived") from None
    return b"".join(chunks)


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` (``None`` without one); 422 when malformed."""
    key = request.headers.get("idempotency-key")
    if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ValidationFailed(
            f"Idempotency-Key must be {IDEMPOTENCY_KEY_RULE}", {"field": "Idempotency-Key"}
        )
    return key


def _product_id(request: Request) -> str:
    value: str = request.path_params["product_id"]
    if not is_product_id(value):
        raise ValidationFailed(f"product_id must be {PRODUCT_ID_RULE}", {"field": "product_id"})
    return value


def _warehouse_id(request: Request) -> str:
    value: str = request.path_params["warehouse_id"]
    if not is_warehouse_id(value):
        raise ValidationFailed(
            f"warehouse_id must be {WAREHOUSE_ID_RULE}", {"field": "warehouse_id"}
        )
    return value


def _reservation_id(request: Request) -> UUID:
    try:
        return UUID(request.path_params["reservation_id"])
    except ValueError:
        raise ValidationFailed("reservation id must be a UUID", {"field": "id"}) from None


def product_ids_param(request: Request) -> list[str]:
    """The ``product_ids`` query parameter, exactly as :data:`PRODUCT_IDS_PARAM` states:
    1-500 comma-separated ids, an empty one included ("a,,b") is invalid; repeats count
    towards the 500 and are answered once (the list keeps first occurrences, in order)."""
    raw = request.query_params.get("product_ids", "")
    if not raw:
        raise ValidationFailed("product_ids is required", {"field": "product_ids"})
    entries = raw.split(",", MAX_STOCK_QUERY)
    if len(entries) > MAX_STOCK_QUERY:
        raise ValidationFailed(f"at most {MAX_STOCK_QUERY} product_ids", {"field": "product_ids"})
    bad = [x for x in entries if not is_product_id(x)]
    if bad:
        raise ValidationFailed(f"invalid product id {bad[0][:140]!r}", {"field": "product_ids"})
    return list(dict.fromkeys(entries))


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?\d{1,19}", raw) or not lo <= int(raw) <= hi:
        raise ValidationFailed(f"{name} must be an integer from {lo} to {hi}", {"field": name})
    return int(raw)


# --- presentation ---------------------------------------------------------------------


def warehouse_out(w: Warehouse) -> WarehouseOut:
    return WarehouseOut(w.id, w.name, w.location, w.status.value)


def level_out(lv: StockLevel) -> LevelOut:
    return LevelOut(
        lv.warehouse_id, lv.quantity, lv.reserved, lv.available, lv.version, lv.updated_at
    )


def product_stock(
    product_id: str,
    levels: list[StockLevel],
    warehouses: dict[str, Warehouse],
    settings: ProductSettings | None = None,
) -> ProductStockOut:
    """The stock body; ``reservable`` and ``low_stock`` follow the product's settings."""
    free = reservable(
        active_available(levels, warehouses), settings.safety_stock if settings else 0
    )
    threshold = settings.low_stock_threshold if settings else None
    return ProductStockOut(
        product_id,
        sum(lv.quantity for lv in levels),
        sum(lv.reserved for lv in levels),
        sum(lv.available for lv in levels),
        free,
        [level_out(lv) for lv in levels],
        threshold is not None and free <= threshold,
    )


def reservation_out(r: Reservation) -> ReservationOut:
    return ReservationOut(
        r.id,
        r.status.value,
        [ReservationLineOut(x.product_id, x.warehouse_id, x.quantity, x.kit_id) for x in r.lines],
        r.reference,
        r.created_at,
        r.expires_at,
    )


# --- handlers -------------------------------------------------------------------------


class Backend(Protocol):
    """What route handlers reach per request: the process's service and its PostgreSQL
    store (for the features whose SQL is their own: product settings and listings, bulk
    changes, the waitlist, webhook registrations).

    Looked up per request: routes are built before the lifespan has opened the database
    pool; until it has, both raise :class:`~inventory.domain.model.Unavailable`.
    """

    def get_service(self) -> InventoryService: ...

    def get_store(self) -> Store: ...


class RouteHandlers:
    """Route handlers bound to the process's backend (the base of every route module's
    handlers)."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def service(self) -> InventoryService:
        return self._backend.get_service()

    @property
    def store(self) -> Store:
        return self._backend.get_store()

    async def _stock_bodies(
        self, ids: Sequence[str], settings: dict[str, ProductSettings] | None = None
    ) -> dict[str, ProductStockOut | KitStockOut]:
        """The stock body of each of ``ids`` that has one: its rows' body, or for a kit
        its reservable and each component's body (read in the same queries). ``settings``:
        those of ``ids``, when the caller has read them already."""
        if settings is None:
            settings = await get_settings(self.store, ids)
        kits = [s for s in settings.values() if s.components is not None]
        parts = {c.product_id for k in kits for c in k.components or ()}.difference(ids)
        if parts:
            settings = settings | await get_settings(self.store, sorted(parts))
        levels, warehouses = await self.service.stock([*ids, *sorted(parts)])
        by_product: dict[str, list[StockLevel]] = {}
        for lv in levels:
            by_product.setdefault(lv.product_id, []).append(lv)
        products = {
            p: product_stock(p, rows, warehouses, settings.get(p)) for p, rows in by_product.items()
        }
        bodies: dict[str, ProductStockOut | KitStockOut] = dict(products)
        free = {p: b.reservable for p, b in products.items()}
        for kit in kits:
            assert kit.components is not None
            bodies[kit.product_id] = KitStockOut(
                kit.product_id,
                True,
                kit_reservable(kit.components, free),
                [KitComponentStockOut(c.product_id, c.quantity, products.get(c.product_id))
                 for c in kit.components],
            )  # fmt: skip
        return bodies


class Handlers(RouteHandlers):
    """The stock, warehouse and reservation routes."""

    async def put_warehouse(self, request: Request) -> Response:
        warehouse_id = _warehouse_id(request)
        body, _ = decode(await read_body(request), WarehouseIn)
        warehouse, created = await self.service.put_warehouse(
            Warehouse(warehouse_id, body.name, body.location, WarehouseStatus(body.status))
        )
        return json_response(warehouse_out(warehouse), 201 if created else 200)

    async def list_warehouses(self, request: Request) -> Response:
        found = await self.service.list_warehouses()
        return json_response(WarehousesOut([warehouse_out(w) for w in found]))

    async def get_warehouse(self, request: Request) -> Response:
        return json_response(
            warehouse_out(await self.service.get_warehouse(_warehouse_id(request)))
        )

    async def product_stock(self, request: Request) -> Response:
        product_id = _product_id(request)
        body = (await self._stock_bodies([product_id])).get(product_id)
        if body is None:
            raise NotFound(f"product {product_id} has no stock", {"product_id": product_id})
        return json_response(body)

    async def stock_list(self, request: Request) -> Response:
        ids = product_ids_param(request)
        bodies = await self._stock_bodies(ids)
        return json_response(
            StockListOut(
                [bodies[p] for p in ids if p in bodies], [p for p in ids if p not in bodies]
            )
        )

    async def adjust(self, request: Request) -> Response:
        product_id, warehouse_id = _product_id(request), _warehouse_id(request)
        body, _ = decode(await read_body(request), AdjustmentIn)
        if body.delta == 0:
            raise ValidationFailed("delta must not be 0", {"field": "delta"})
        level = await self.service.change_stock(
            product_id, warehouse_id, delta=body.delta, reason=body.reason,
            expected_version=body.expected_version,
        )  # fmt: skip
        return json_response(level_out(level))

    async def set_quantity(self, request: Request) -> Response:
        product_id, warehouse_id = _product_id(request), _warehouse_id(request)
        body, _ = decode(await read_body(request), SetQuantityIn)
        level = await self.service.change_stock(
            product_id, warehouse_id, quantity=body.quantity, reason=body.reason,
            expected_version=body.expected_version,
        )  # fmt: skip
        return json_response(level_out(level))

    async def movements(self, request: Request) -> Response:
        product_id = _product_id(request)
        after = _int_param(request, "after", 0, 0, 2**63 - 1)
        limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
        page = await self.service.movements(product_id, after, limit)
        items = [MovementOut(**m) for m in page]
        next_after = items[-1].id if len(items) == limit else None
        return json_response(MovementsOut(items, next_after))

    async def reserve(self, request: Request) -> Response:
        identity: str = request.user.identity
        key = idempotency_key(request)
        body, raw = decode(await read_body(request), ReserveIn)
        idempotency = None
        if key is not None:
            idempotency = Idempotency(identity, key, body_hash(raw), _render_reservation)
        lines = [RequestedLine(x.product_id, x.quantity, x.warehouse_id) for x in body.lines]
        result = await self.service.reserve(
            lines, body.ttl_seconds, body.reference, idempotency, body.customer_id
        )
        if isinstance(result, Replay):
            return Response(
                result.body,
                result.status_code,
                {"Idempotent-Replayed": "true"},
                media_type="application/json",
            )
        return json_response(reservation_out(result), 201)

    async def get_reservation(self, request: Request) -> Response:
        return json_response(
            reservation_out(await self.service.get_reservation(_reservation_id(request)))
        )

    async def commit(self, request: Request) -> Response:
        return await self._finish(request, ReservationStatus.COMMITTED)

    async def release(self, request: Request) -> Response:
        return await self._finish(request, ReservationStatus.RELEASED)

    async def _finish(self, request: Request, target: ReservationStatus) -> Response:
        reservation_id = _reservation_id(request)
        return json_response(reservation_out(await self.service.finish(reservation_id, target)))

    async def extend(self, request: Request) -> Response:
        reservation_id = _reservation_id(request)
        body, _ = decode(await read_body(request), ExtendIn)
        return json_response(
            reservation_out(await self.service.extend(reservation_id, body.ttl_seconds))
        )


def _render_reservation(outcome: Reservation | InventoryError) -> tuple[int, bytes]:
    if isinstance(outcome, InventoryError):
        return outcome.status, error_body(outcome)
    return 201, msgspec.json.encode(reservation_out(outcome))


# The errors most operations can answer, beyond those their doc's facts imply.
READ_ERRORS: Errors = (Unavailable,)
WRITE_ERRORS: Errors = (StoreIntegrityError, Contention, Unavailable)
_STOCK_WRITE: Errors = (NotFound, InsufficientStock, VersionConflict, IsKit, *WRITE_ERRORS)
_FINISH: Errors = (NotFound, InvalidState, *WRITE_ERRORS)
PRODUCT_ID_SCHEMA = {"type": "string", "pattern": schema_pattern(PRODUCT_ID_RE)}
PRODUCT_IDS_PARAM = QueryParam(
    "product_ids",
    {"type": "array", "items": PRODUCT_ID_SCHEMA, "minItems": 1, "maxItems": MAX_STOCK_QUERY},
    "Comma-separated product ids (repeats are answered once).",
    required=True,
)
_READ_BACK = (Link("getReservation", {"reservation_id": "$response.body#/id"}),)
_STOCK_LINKS = (
    Link("getProductStock", {"product_id": "$request.path.product_id"}),
    Link("listMovements", {"product_id": "$request.path.product_id"}),
    Link(
        "createReservation",
        request_body={
            "lines": [
                {
                    "product_id": "$request.path.product_id",
                    "warehouse_id": "$request.path.warehouse_id",
                    "quantity": 1,
                }
            ]
        },
    ),
)


def api_routes(backend: Backend) -> list[Row]:
    """The stock, warehouse and reservation operations."""
    h = Handlers(backend)
    return [
        (
            "/v1/warehouses",
            "GET",
            h.list_warehouses,
            RouteDoc(
                "List warehouses", "read", None, WarehousesOut,
                operation_id="listWarehouses", tag="Warehouses", errors=READ_ERRORS,
                description="Every warehouse, ordered by id.",
            ),
        ),
        (
            "/v1/warehouses/{warehouse_id}",
            "GET",
            h.get_warehouse,
            RouteDoc(
                "Read a warehouse", "read", None, WarehouseOut,
                operation_id="getWarehouse", tag="Warehouses", errors=(NotFound, *READ_ERRORS),
            ),
        ),
        (
            "/v1/warehouses/{warehouse_id}",
            "PUT",
            h.put_warehouse,
            RouteDoc(
                "Create or update a warehouse", "admin", WarehouseIn, WarehouseOut,
                operation_id="putWarehouse", tag="Warehouses", errors=WRITE_ERRORS, also=(201,),
                example={"name": "Main", "location": "Berlin", "status": "active"},
                description="201 when the warehouse was created, 200 when it was updated. "
                "Only `active` warehouses are allocated from; status does not affect "
                "existing reservations.",
                links=(
                    Link("getWarehouse", {"warehouse_id": "$response.body#/id"}),
                    Link("adjustStock", {"warehouse_id": "$response.body#/id"}),
                ),
            ),
        ),
        (
            "/v1/stock",
            "GET",
            h.stock_list,
            RouteDoc(
                "Stock of up to 500 products", "read", None, StockListOut,
                operation_id="listStock", tag="Stock", errors=READ_ERRORS,
                query=(PRODUCT_IDS_PARAM,),
                description="The bodies `getProductStock` answers, in request order (a kit's "
                "is `KitStockOut`); products with neither a stock row nor kit components are "
                "listed in `missing`.",
            ),
        ),
        (
            "/v1/products/{product_id}/stock",
            "GET",
            h.product_stock,
            RouteDoc(
                "Stock of one product (a kit: KitStockOut)", "read", None, StockBody,
                operation_id="getProductStock", tag="Stock", errors=(NotFound, *READ_ERRORS),
                description="404 when the product has no stock row anywhere. `reservable` "
                "sums `available` over active warehouses only, less `safety_stock` (a new "
                "reservation takes only what lies beyond the waitlist's waiting units). A kit "
                "answers `KitStockOut` (`kit: true`, its `reservable` and its components' "
                "bodies).",
            ),
        ),
        (
            "/v1/products/{product_id}/stock/{warehouse_id}/adjustments",
            "POST",
            h.adjust,
            RouteDoc(
                "Receive or remove stock", "admin", AdjustmentIn, LevelOut,
                operation_id="adjustStock", tag="Stock", errors=_STOCK_WRITE,
                example={"delta": 10, "reason": "receipt"},
                description="Adds `delta` (non-zero) to on-hand; creates the row on first "
                "receipt. Removing more than `available` is 409 `insufficient_stock`; a "
                "stale `expected_version` 409 `version_conflict`.",
                links=_STOCK_LINKS,
            ),
        ),
        (
            "/v1/products/{product_id}/stock/{warehouse_id}",
            "PUT",
            h.set_quantity,
            RouteDoc(
                "Set on-hand (cycle count)", "admin", SetQuantityIn, LevelOut,
                operation_id="setStock", tag="Stock", errors=_STOCK_WRITE,
                example={"quantity": 40, "reason": "cycle count", "expected_version": 3},
                description="Creates the row when missing; below `reserved` is 409 "
                "`insufficient_stock`. Setting the quantity a row already has writes nothing.",
                links=_STOCK_LINKS,
            ),
        ),
        (
            "/v1/products/{product_id}/movements",
            "GET",
            h.movements,
            RouteDoc(
                "Movement ledger of a product", "read", None, MovementsOut,
                operation_id="listMovements", tag="Stock", errors=(NotFound, *READ_ERRORS),
                query=(
                    QueryParam(
                        "after", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                        "Movement id to continue after (`next_after` of the previous page).",
                    ),
                    QueryParam(
                        "limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        "Page size (default 100).",
                    ),
                ),
                description="Oldest first, paged by id; `next_after` is null on the last page.",
            ),
        ),
        (
            "/v1/reservations",
            "POST",
            h.reserve,
            RouteDoc(
                "Reserve stock (all lines or none)", "reserve", ReserveIn, ReservationOut, 201,
                operation_id="createReservation", tag="Reservations", idempotent=True,
                example={
                    "lines": [{"product_id": "sku-1", "quantity": 2}],
                    "ttl_seconds": 600, "reference": "order-42",
                },
                errors=(
                    NotFound, InsufficientStock, WarehouseUnavailable, CustomerRequired,
                    PurchaseLimitExceeded, *WRITE_ERRORS,
                ),
                description="Lines without `warehouse_id` are allocated from active "
                "warehouses (the one with the most available first, split when none holds "
                "the line). Short stock is 409 `insufficient_stock` listing every short "
                "product; nothing is reserved then.",
                links=tuple(
                    Link(op, {"reservation_id": "$response.body#/id"})
                    for op in (
                        "getReservation", "commitReservation", "releaseReservation",
                        "extendReservation",
                    )
                ),
            ),
        ),
        (
            "/v1/reservations/{reservation_id}",
            "GET",
            h.get_reservation,
            RouteDoc(
                "Read a reservation", "read", None, ReservationOut,
                operation_id="getReservation", tag="Reservations", errors=(NotFound, *READ_ERRORS),
                or_scope="reserve",
                description="A reservation past `expires_at` reads as `expired` at once.",
            ),
        ),
        (
            "/v1/reservations/{reservation_id}/commit",
            "POST",
            h.commit,
            RouteDoc(
                "Commit a reservation", "reserve", None, ReservationOut,
                operation_id="commitReservation", tag="Reservations", errors=_FINISH,
                description="Active to committed: the stock leaves. Repeating it answers the "
                "same body; a released or expired reservation is 409 `invalid_state`.",
                links=_READ_BACK,
            ),
        ),
        (
            "/v1/reservations/{reservation_id}/release",
            "POST",
            h.release,
            RouteDoc(
                "Release a reservation", "reserve", None, ReservationOut,
                operation_id="releaseReservation", tag="Reservations", errors=_FINISH,
                description="Active to released: the stock returns. Repeating it answers the "
                "same body; a committed or expired reservation is 409 `invalid_state`.",
                links=_READ_BACK,
            ),
        ),
        (
            "/v1/reservations/{reservation_id}/extend",
            "POST",
            h.extend,
            RouteDoc(
                "Extend a reservation", "reserve", ExtendIn, ReservationOut,
                operation_id="extendReservation", tag="Reservations", errors=_FINISH,
                example={"ttl_seconds": 900},
                description="`expires_at` becomes now + `ttl_seconds` (which may shorten "
                "it); only for an active reservation, else 409 `invalid_state`.",
                links=_READ_BACK,
            ),
        ),
    ]  # fmt: skip
