"""HTTP handlers of the waitlist (SPEC "Flash-sale protections"), rows of the route table
(:func:`waitlist_routes`) like the other feature modules.

``POST /v1/products/{id}/waitlist`` takes an ``Idempotency-Key`` as reservations do: a
repeat with the same body answers 201 with the entry as it is now (header
``Idempotent-Replayed: true``), another body 422. Errors are not stored: a repeat after
a 404/409 runs again (and typically answers the same).
"""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response

from ..domain.commerce import AlreadyWaiting, IsKit, PurchaseLimitExceeded
from ..domain.model import MAX_QUANTITY, InsufficientStock, InvalidState, NotFound, ValidationFailed
from ..service.idempotency import body_hash
from ..service.waitlist import JoinRequest, Waitlist, WaitlistEntryOut
from .api import (
    MAX_PAGE,
    PRODUCT_IDS_PARAM,
    READ_ERRORS,
    WRITE_ERRORS,
    Backend,
    RouteHandlers,
    _int_param,
    _product_id,
    idempotency_key,
    product_ids_param,
    read_body,
)
from .errors import json_response
from .routing import Link, QueryParam, RouteDoc, Row
from .schemas import NO_NUL, WarehouseId, _In, decode

__all__ = [
    "WaitlistEntryOut",
    "WaitlistIn",
    "WaitlistLengthOut",
    "WaitlistLengthsOut",
    "WaitlistOut",
    "waitlist_routes",
]


class WaitlistIn(_In):
    customer_id: Annotated[str, Meta(min_length=1, max_length=128, pattern=NO_NUL)]
    quantity: Annotated[int, Meta(ge=1, le=MAX_QUANTITY)]
    hold_seconds: Annotated[int, Meta(ge=1, le=86_400)] = 900
    warehouse_id: WarehouseId | None = None


class WaitlistOut(Struct):
    entries: list[WaitlistEntryOut]
    next_after: int | None  # pass as ``after`` for the next page (queue order)


class WaitlistLengthOut(Struct):
    product_id: str
    waiting: int  # entries waiting
    units: int  # their quantities added up: what new reservations cannot take


class WaitlistLengthsOut(Struct):
    waitlists: list[WaitlistLengthOut]


def _entry_id(request: Request) -> UUID:
    try:
        return UUID(request.path_params["entry_id"])
    except ValueError:
        raise ValidationFailed("waitlist entry id must be a UUID", {"field": "id"}) from None


class WaitlistHandlers(RouteHandlers):
    """The waitlist routes."""

    @property
    def waitlist(self) -> Waitlist:
        return Waitlist(self.service, self.store)

    async def join(self, request: Request) -> Response:
        identity: str = request.user.identity
        product_id = _product_id(request)
        key = idempotency_key(request)
        body, raw = decode(await read_body(request), WaitlistIn)
        idem = None
        if key is not None:  # the path is part of "the same request"
            idem = (identity, key, body_hash({"product_id": product_id, "body": raw}))
        entry, replayed = await self.waitlist.join(
            JoinRequest(
                product_id, body.customer_id, body.quantity, body.hold_seconds,
                body.warehouse_id, idem,
            )
        )  # fmt: skip
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        return json_response(entry.out(), 201, headers)

    async def get(self, request: Request) -> Response:
        return json_response((await self.waitlist.get(_entry_id(request))).out())

    async def cancel(self, request: Request) -> Response:
        return json_response((await self.waitlist.cancel(_entry_id(request))).out())

    async def lengths(self, request: Request) -> Response:
        ids = product_ids_param(request)
        found = await self.waitlist.lengths(ids)
        return json_response(
            WaitlistLengthsOut([WaitlistLengthOut(p, *found.get(p, (0, 0))) for p in ids])
        )

    async def list(self, request: Request) -> Response:
        product_id = _product_id(request)
        after = _int_param(request, "after", 0, 0, 2**63 - 1)
        limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
        page = await self.waitlist.waiting(product_id, after, limit)
        next_after = page[-1].seq if len(page) == limit else None
        return json_response(WaitlistOut([e.out() for e in page], next_after))


def waitlist_routes(backend: Backend) -> list[Row]:
    """The waitlist operations."""
    h = WaitlistHandlers(backend)
    return [
        ("/v1/products/{product_id}/waitlist", "POST", h.join, RouteDoc(
            "Join a product's waitlist", "reserve", WaitlistIn, WaitlistEntryOut, 201,
            operation_id="joinWaitlist", tag="Waitlist", idempotent=True,
            errors=(NotFound, IsKit, AlreadyWaiting, PurchaseLimitExceeded, InsufficientStock,
                    *WRITE_ERRORS),
            example={"customer_id": "c-1", "quantity": 1},
            description="201 `waiting` with its `position`, or `offered` at once when enough "
            "is reservable and nobody waits (the reservation is in `reservation_id`). One "
            "waiting entry per customer and product.",
            links=(Link("getWaitlistEntry", {"entry_id": "$response.body#/id"}),
                   Link("cancelWaitlistEntry", {"entry_id": "$response.body#/id"})),
        )),
        ("/v1/products/{product_id}/waitlist", "GET", h.list, RouteDoc(
            "Waiting entries of a product, in queue order", "admin", None, WaitlistOut,
            operation_id="listWaitlist", tag="Waitlist", errors=READ_ERRORS,
            query=(
                QueryParam("after", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                           "`next_after` of the previous page."),
                QueryParam("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                           "Page size (default 100)."),
            ),
        )),
        ("/v1/waitlists", "GET", h.lengths, RouteDoc(
            "Waitlist lengths of up to 500 products", "read", None, WaitlistLengthsOut,
            operation_id="listWaitlistLengths", tag="Waitlist", errors=READ_ERRORS,
            query=(PRODUCT_IDS_PARAM,),
            description="How many entries wait for each product, and their units, in "
            "request order (0 for a product nobody waits for, known or not). No customer "
            "is named, so the read scope suffices (the live dashboard shows these).",
        )),
        ("/v1/waitlist/{entry_id}", "GET", h.get, RouteDoc(
            "Read a waitlist entry", "read", None, WaitlistEntryOut,
            operation_id="getWaitlistEntry", tag="Waitlist", errors=(NotFound, *READ_ERRORS),
            or_scope="reserve",
        )),
        ("/v1/waitlist/{entry_id}", "DELETE", h.cancel, RouteDoc(
            "Cancel a waiting entry", "reserve", None, WaitlistEntryOut,
            operation_id="cancelWaitlistEntry", tag="Waitlist",
            errors=(NotFound, InvalidState, *WRITE_ERRORS),
            description="Only while `waiting`; later 409 `invalid_state`.",
        )),
    ]  # fmt: skip
