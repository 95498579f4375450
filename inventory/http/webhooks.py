"""The webhook registration routes (admin scope), rows of the route table
(:func:`webhook_routes`).

A webhook's secret is write-only: it is stored to sign deliveries and never appears in
an answer, an error message or a log line (validation messages name the field, never
its value).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta, Struct
from starlette.requests import Request
from starlette.responses import Response

from ..domain.model import WAREHOUSE_ID_RULE, NotFound, ValidationFailed, is_warehouse_id
from ..service.webhooks.events import EVENT_TYPES
from ..service.webhooks.targets import MAX_URL, TargetRefused, parse_url, resolve
from ..store.webhooks import Delivery, Webhook, WebhookStore
from .api import MAX_PAGE, READ_ERRORS, Backend, _int_param, read_body
from .errors import json_response
from .routing import Link, QueryParam, RouteDoc, Row
from .schemas import decode

__all__ = [
    "URL_PATTERN",
    "DeliveriesOut",
    "WebhookIn",
    "WebhookOut",
    "WebhooksOut",
    "webhook_routes",
]

URL_PATTERN = (
    r"^[hH][tT][tT][pP][sS]?://[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?"
    r"(?::(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?"
    r"(?:[/?#][^ \t\r\n\x00]*)?$"
)
EventType = Literal[
    "stock.changed", "stock.low", "stock.out", "stock.back", "reservation.created",
    "reservation.committed", "reservation.released", "reservation.expired",
    "waitlist.offered",
]  # fmt: skip
assert set(EventType.__args__) == set(EVENT_TYPES)  # type: ignore[attr-defined]


class WebhookIn(Struct, forbid_unknown_fields=True):
    # A form parse_url accepts, stated so OpenAPI says it too: a host name or IPv4
    # address, a port within 0-65535, no credentials, no white space.
    url: Annotated[str, Meta(min_length=1, max_length=MAX_URL, pattern=URL_PATTERN)]
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


class DeliveriesOut(Struct):
    deliveries: list[Delivery]  # the stored attempt; its id is the page cursor
    next_after: str | None


def _out(w: Webhook) -> WebhookOut:
    return WebhookOut(w.id, w.url, list(w.events), w.active, w.created_at, w.updated_at)


def _webhook_id(request: Request) -> str:
    value: str = request.path_params["webhook_id"]
    if not is_warehouse_id(value):
        raise ValidationFailed(f"webhook_id must be {WAREHOUSE_ID_RULE}", {"field": "webhook_id"})
    return value


class WebhookHandlers:
    """The webhook routes; the store is built on the backend's pool per request (the
    pool exists only once the lifespan has run)."""

    def __init__(self, backend: Backend, allow_private: bool) -> None:
        self._backend = backend
        self._allow_private = allow_private

    @property
    def _store(self) -> WebhookStore:
        return WebhookStore(self._backend.get_store().pool)

    async def put(self, request: Request) -> Response:
        store = self._store
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
        return json_response(WebhooksOut([_out(w) for w in await self._store.list_all()]))

    async def get(self, request: Request) -> Response:
        return json_response(_out(await self._store.get(_webhook_id(request))))

    async def delete(self, request: Request) -> Response:
        await self._store.delete(_webhook_id(request))
        return Response(status_code=204)

    async def deliveries(self, request: Request) -> Response:
        store = self._store
        webhook_id = _webhook_id(request)
        after = _int_param(request, "after", 0, 0, 2**63 - 1)
        limit = _int_param(request, "limit", 100, 1, MAX_PAGE)
        page = await store.deliveries(webhook_id, after or None, limit)
        next_after = str(page[-1].id) if len(page) == limit else None
        return json_response(DeliveriesOut(page, next_after))


def webhook_routes(backend: Backend, allow_private: bool) -> list[Row]:
    """The webhook operations."""
    h = WebhookHandlers(backend, allow_private)
    one = "/v1/webhooks/{webhook_id}"
    return [
        (
            "/v1/webhooks",
            "GET",
            h.list_webhooks,
            RouteDoc(
                "List webhooks", "admin", None, WebhooksOut,
                operation_id="listWebhooks", tag="Webhooks", errors=READ_ERRORS,
            ),
        ),
        (
            one, "GET", h.get,
            RouteDoc(
                "Read a webhook", "admin", None, WebhookOut,
                operation_id="getWebhook", tag="Webhooks", errors=(NotFound, *READ_ERRORS),
            ),
        ),
        (
            one, "PUT", h.put,
            RouteDoc(
                "Create or update a webhook", "admin", WebhookIn, WebhookOut,
                operation_id="putWebhook", tag="Webhooks", also=(201,), errors=READ_ERRORS,
                description="201 when created, 200 when updated. A `url` whose host does "
                "not resolve, or resolves to a loopback, private or link-local address, is "
                "422 (unless `INVENTORY_WEBHOOK_ALLOW_PRIVATE=true`). Receives the events "
                "that happen after it was registered.",
                example={
                    "url": "https://hooks.example.com/inventory",
                    "events": ["stock.changed", "reservation.created"],
                    "secret": "a-long-shared-secret-0123456789",
                },
                links=(
                    Link("getWebhook", {"webhook_id": "$response.body#/id"}),
                    Link("deleteWebhook", {"webhook_id": "$response.body#/id"}),
                    Link("listWebhookDeliveries", {"webhook_id": "$response.body#/id"}),
                ),
            ),
        ),
        (
            one, "DELETE", h.delete,
            RouteDoc(
                "Delete a webhook", "admin", None, None, 204,
                operation_id="deleteWebhook", tag="Webhooks", errors=(NotFound, *READ_ERRORS),
            ),
        ),
        (
            f"{one}/deliveries",
            "GET",
            h.deliveries,
            RouteDoc(
                "Delivery attempts, newest first", "admin", None, DeliveriesOut,
                operation_id="listWebhookDeliveries", tag="Webhooks",
                errors=(NotFound, *READ_ERRORS),
                query=(
                    QueryParam(
                        "after", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                        "`next_after` of the previous page.",
                    ),
                    QueryParam(
                        "limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        "Page size (default 100).",
                    ),
                ),
            ),
        ),
    ]  # fmt: skip
