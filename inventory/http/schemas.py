"""Request and response schemas: they validate bodies, encode answers and make OpenAPI.

msgspec is used because one declaration gives strict validation (no ``"1"`` for 1, no
fractional numbers for integers, unknown fields refused), fast JSON encoding and a JSON Schema for
``/openapi.json``: a body's documented rules are the ones enforced. Path and query
parameters are checked in the handlers and described in :mod:`.openapi`;
tests/test_openapi.py and the schemathesis run check that the two agree.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import msgspec
from msgspec import Meta, Struct

from ..domain.model import (
    MAX_LINES,
    MAX_ON_HAND,
    MAX_QUANTITY,
    MAX_TTL_SECONDS,
    MIN_TTL_SECONDS,
    PRODUCT_ID_RE,
    WAREHOUSE_ID_RE,
    InventoryError,
    ValidationFailed,
    schema_pattern,
)

__all__ = [
    "MAX_JSON_DEPTH",
    "STOCK_BODY_KINDS",
    "AdjustmentIn",
    "ErrorOut",
    "ExtendIn",
    "KitComponentStockOut",
    "KitStockOut",
    "LevelOut",
    "MovementOut",
    "MovementsOut",
    "ProductStockOut",
    "ReservationLineOut",
    "ReservationOut",
    "ReserveIn",
    "ReserveLineIn",
    "SetQuantityIn",
    "StockBody",
    "StockBodyOrNull",
    "StockListOut",
    "WarehouseIn",
    "WarehouseOut",
    "WarehousesOut",
    "check_depth",
    "decode",
]

MAX_STOCK = MAX_ON_HAND

ProductId = Annotated[str, Meta(pattern=schema_pattern(PRODUCT_ID_RE))]
WarehouseId = Annotated[str, Meta(pattern=schema_pattern(WAREHOUSE_ID_RE))]
# PostgreSQL text cannot hold U+0000: refuse it here (422) instead of failing the write
# (a 500, and for reservations the whole combined batch of other clients).
NO_NUL = r"^[^\x00]*$"
Text = Annotated[str, Meta(max_length=500, pattern=NO_NUL)]
Version = Annotated[int, Meta(ge=0, le=2**62)]


class _In(Struct, forbid_unknown_fields=True):
    """Base of request bodies: unknown fields are a 422, never silently dropped."""


class WarehouseIn(_In):
    name: Annotated[str, Meta(min_length=1, max_length=200, pattern=NO_NUL)]
    status: Literal["active", "inactive", "maintenance"]
    location: Text | None = None


class AdjustmentIn(_In):
    delta: Annotated[
        int, Meta(ge=-MAX_STOCK, le=MAX_STOCK, extra_json_schema={"not": {"const": 0}})
    ]  # 0 is refused by the handler (422): the schema says so
    reason: Text | None = None
    expected_version: Version | None = None


class SetQuantityIn(_In):
    quantity: Annotated[int, Meta(ge=0, le=MAX_STOCK)]
    reason: Text | None = None
    expected_version: Version | None = None


class ReserveLineIn(_In):
    product_id: ProductId
    quantity: Annotated[int, Meta(ge=1, le=MAX_QUANTITY)]
    warehouse_id: WarehouseId | None = None


class ReserveIn(_In):
    lines: Annotated[list[ReserveLineIn], Meta(min_length=1, max_length=MAX_LINES)]
    ttl_seconds: Annotated[int, Meta(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)] = 900
    reference: Annotated[str, Meta(max_length=255, pattern=NO_NUL)] | None = None
    customer_id: Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_NUL)] | None = None


class ExtendIn(_In):
    ttl_seconds: Annotated[int, Meta(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)]


# --- responses ------------------------------------------------------------------------


class WarehouseOut(Struct):
    id: str
    name: str
    location: str | None
    status: str


class WarehousesOut(Struct):
    warehouses: list[WarehouseOut]


class LevelOut(Struct):
    warehouse_id: str
    quantity: int
    reserved: int
    available: int
    version: int
    updated_at: datetime | None


class ProductStockOut(Struct):
    product_id: str
    quantity: int
    reserved: int
    available: int
    reservable: int
    levels: list[LevelOut]
    low_stock: bool = False  # reservable <= low_stock_threshold


class KitComponentStockOut(Struct):
    product_id: str
    quantity: int  # units per kit
    stock: ProductStockOut | None  # null while the component has no stock row


class KitStockOut(Struct):
    product_id: str
    kit: bool
    reservable: int
    components: list[KitComponentStockOut]


#: The Structs a stock body may be, for OpenAPI's components (:data:`StockBody`).
STOCK_BODY_KINDS = (ProductStockOut, KitStockOut)

#: A product's stock body, or a kit's (``kit: true``). msgspec makes a schema for a union
#: of Structs only when they are tagged, and these bodies have no tag, so the schema is
#: written out (references into OpenAPI's components).
_STOCK_BODY_REFS = [{"$ref": f"#/components/schemas/{k.__name__}"} for k in STOCK_BODY_KINDS]
StockBody = Annotated[Any, Meta(extra_json_schema={"anyOf": _STOCK_BODY_REFS})]
#: The same or null (a product with settings and no stock row yet).
StockBodyOrNull = Annotated[
    Any, Meta(extra_json_schema={"anyOf": [*_STOCK_BODY_REFS, {"type": "null"}]})
]


class StockListOut(Struct):
    products: list[StockBody]  # a kit's body for a kit
    missing: list[str]  # neither a stock row nor a kit


class MovementOut(Struct):
    id: int
    product_id: str
    warehouse_id: str
    kind: str
    quantity_delta: int
    reserved_delta: int
    quantity: int
    reserved: int
    version: int
    reservation_id: UUID | None
    reason: str | None
    created_at: datetime


class MovementsOut(Struct):
    movements: list[MovementOut]
    next_after: int | None


class ReservationLineOut(Struct, omit_defaults=True):
    product_id: str
    warehouse_id: str
    quantity: int
    kit_id: str | None = None  # only on lines a kit line expanded to


class ReservationOut(Struct):
    id: UUID
    status: str
    lines: list[ReservationLineOut]
    reference: str | None
    created_at: datetime
    expires_at: datetime


class ErrorBody(Struct):
    code: str
    message: str
    details: Any = None


class ErrorOut(Struct):
    error: ErrorBody


T = TypeVar("T")

_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD = re.compile(r"field `([^`]+)`")


#: Bodies nested deeper are refused (422) before the decoder sees them; msgspec's own
#: recursion limit would otherwise surface as a ``RecursionError`` (a 500).
MAX_JSON_DEPTH = 32

# A string, or an unterminated one up to the end: every match runs forward only, so the
# cut is linear in the body whatever quotes and backslashes it holds.
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"?')
_BRACKETS = re.compile(rb"[\[\]{}]")


def check_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`ValidationFailed` (422) when JSON ``body`` nests deeper than ``limit``.

    Counting brackets is done in C (``bytes.count``) for the common case of a body with
    fewer openers than the limit; otherwise strings are cut out (a ``[`` inside one does
    not nest) and the remaining brackets are walked once. Malformed JSON is left to the
    decoder, which reports it as ``invalid_json``.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return
    depth = 0
    for bracket in _BRACKETS.findall(_STRING.sub(b"", body)):
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > limit:
                raise ValidationFailed(
                    f"the JSON body is nested deeper than {limit} levels",
                    {"field": None, "max_depth": limit},
                )
        else:
            depth -= 1


class InvalidJson(InventoryError):
    """The body is not JSON at all."""

    code = "invalid_json"
    status = 400


def decode(body: bytes, kind: type[T]) -> tuple[T, Any]:
    """Parse and validate a body; returns the typed value and the plain parsed JSON.

    Parsing first and converting second keeps the two failures apart: broken JSON is a
    400 ``invalid_json``, valid JSON of the wrong shape a 422 naming the field.
    """
    check_depth(body)  # deeper than 32 levels -> 422 (the decoder would raise RecursionError)
    try:
        raw = msgspec.json.decode(body)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(str(exc), {"field": _field(str(exc))}) from None
    except msgspec.DecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    try:
        return msgspec.convert(raw, kind), raw
    except msgspec.ValidationError as exc:
        error = exc
    # Retried only after a failure: the common body pays nothing for this.
    if _integral_floats_as_ints(raw):
        try:
            return msgspec.convert(raw, kind), raw
        except msgspec.ValidationError as exc:
            error = exc
    message = str(error)
    raise ValidationFailed(message, {"field": _field(message)}) from None


def _integral_floats_as_ints(raw: Any) -> bool:
    """Make every float without a fractional part (``1094.0``) in ``raw`` an int, in
    place; whether any was found.

    JSON has one number type and JSON Schema calls ``1094.0`` an integer, so the
    OpenAPI document promises it is accepted; msgspec's strict conversion would refuse
    it. No request field is a float, so the rewrite cannot change a float field. The
    rewritten body is the one hashed for idempotency, so ``1`` and ``1.0`` are the same
    body. Iterative, so nesting depth costs no recursion; a bare number is left alone
    (no request body is one).
    """
    changed = False
    stack = [raw] if isinstance(raw, dict | list) else []
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in list(items):
            if type(item) is float and item.is_integer():
                node[key] = int(item)
                changed = True
            elif isinstance(item, dict | list):
                stack.append(item)
    return changed


def _field(message: str) -> str | None:
    """The field a msgspec message is about: ``lines[0].quantity``, ``reserved``, ..."""
    at = _AT.search(message)
    path = at.group(1) if at else ""
    named = _FIELD.search(message)
    if named:
        return f"{path}.{named.group(1)}" if path else named.group(1)
    return path or None
