"""The webhook registration routes (admin scope), added to the ``/v1`` route table.

A webhook's secret is write-only: it is stored to sign deliveries and never appears in
an answer, an error message or a log line (validation messages name the field, never
its value).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response

from ..api import (
    MAX_PAGE,
    Auth,
    Handler,
    RouteDoc,
    _int_param,
    bearer,
    json_response,
    read_body,
)
from ..domain import ValidationFailed, is_warehouse_id
from ..schemas import decode
from ..service import InventoryService
from .events import EVENT_TYPES
from .store import Delivery, Webhook, WebhookStore
from .targets import MAX_URL, TargetRefused, parse_url, resolve

__all__ = [
    "DeliveriesOut",
    "DeliveryOut",
    "WebhookIn",
    "WebhookOut",
    "WebhooksOut",
    "webhook_routes",
]

EventType = Literal[
    "stock.changed", "stock.low", "stock.out", "stock.back", "reservation.created",
    "reservation.committed", "reservation.released", "reservation.expired",
    "waitlist.offered",
]  # fmt: skip
assert set(EventType.__args__) == set(EVENT_TYPES)  # type: ignore[attr-defined]


class WebhookIn(Struct, forbid_unknown_fields=True):
    url: Annotated[str, Meta(min_length=1, max_length=MAX_URL)]
    events: Annotated[list[EventType], Meta(min_length=1, max_length=len(EVENT_TYPES))]
    # printable ASCII, long enough not to be guessed
    secret: Annotated[str, Meta(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")]
    active: bool = True


class WebhookOut(Struct):
    id: str
    url: str
    events: list[str]
    active: bool
    created_at: datetime
    updated_at: datetime


class WebhooksOut(Struct):
    webhooks: list[WebhookOut]


class DeliveryOut(Struct):
    event_id: UUID
    type: str
    attempt: int
    status_code: int | None
    error: str | None
    at: datetime
    next_retry_at: datetime | None


class DeliveriesOut(Struct):
    deliveries: list[DeliveryOut]
    next_after: str | None


def _out(w: Webhook) -> WebhookOut:
    return WebhookOut(w.id, w.url, list(w.events), w.active, w.created_at, w.updated_at)


def _delivery(d: Delivery) -> DeliveryOut:
    return DeliveryOut(d.event_id, d.type, d.attempt, d.status_code, d.error, d.at, d.next_retry_at)


def _webhook_id(request: Request) -> str:
    value: str = request.path_params["webhook_id"]
    if not is_warehouse_id(value):
        raise ValidationFailed("webhook_id must be 1-64 of [A-Za-z0-9._-]", {"field": "webhook_id"})
    return value


class WebhookHandlers:
    """The webhook routes; the store is built on the service's pool per request (the
    pool exists only once the lifespan has run)."""

    def __init__(
        self, get_service: Callable[[], InventoryService], auth: Auth, allow_private: bool
    ) -> None:
        self._get_service = get_service
        self._auth = auth
        self._allow_private = allow_private

    def _store(self, request: Request) -> WebhookStore:
        self._auth.check(bearer(request.headers), "admin")
        return WebhookStore(self._get_service().store.pool)

    async def put(self, request: Request) -> Response:
        store = self._store(request)
        webhook_id = _webhook_id(request)
        body, _ = decode(await read_body(request), WebhookIn)
        url = parse_url(body.url)
        try:
            await resolve(url, self._allow_private)
        except TargetRefused as exc:
            raise ValidationFailed(str(exc), {"field": "url"}) from None
        events = list(dict.fromkeys(body.events))
        webhook, created = await store.put(webhook_id, body.url, events, body.secret, body.active)
        return json_response(_out(webhook), 201 if created else 200)

    async def list_webhooks(self, request: Request) -> Response:
        store = self._store(request)
        return json_response(WebhooksOut([_out(w) for w in await store.list_all()]))

    async def get(self, request: Request) -> Response:
        store = self._store(request)
        return json_response(_out(await store.get(_webhook_id(request))))

    async def delete(self, request: Request) -> Response:
        store = self._store(request)
        await store.delete(_webhook_id(request))
        return Response(status_code=204)

    async def deliveries(self, request: Request) -> Response:
        store = self._store(request)
        webhook_id = _webhook_id(request)
        after = _int_param(request, "after", 0, 0, 2**63 - 1)
        limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
        page = await store.deliveries(webhook_id, after or None, limit)
        next_after = str(page[-1].id) if len(page) == limit else None
        return json_response(DeliveriesOut([_delivery(d) for d in page], next_after))


def webhook_routes(
    get_service: Callable[[], InventoryService], auth: Auth, allow_private: bool
) -> list[tuple[str, str, Handler, RouteDoc]]:
    """Rows for the ``/v1`` route table of :func:`inventory.api.api_routes`."""
    h = WebhookHandlers(get_service, auth, allow_private)
    one = "/v1/webhooks/{webhook_id}"
    return [
        (
            "/v1/webhooks",
            "GET",
            h.list_webhooks,
            RouteDoc("List webhooks", "admin", None, WebhooksOut),
        ),
        (one, "GET", h.get, RouteDoc("Read a webhook", "admin", None, WebhookOut)),
        (one, "PUT", h.put, RouteDoc("Create or update a webhook", "admin", WebhookIn, WebhookOut)),
        (one, "DELETE", h.delete, RouteDoc("Delete a webhook", "admin", None, None, 204)),
        (
            f"{one}/deliveries",
            "GET",
            h.deliveries,
            RouteDoc("Delivery attempts, newest first", "admin", None, DeliveriesOut),
        ),
    ]
