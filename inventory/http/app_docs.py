"""Documentation of the routes served outside :func:`inventory.http.api.api_routes`: the
operational routes of :mod:`inventory.ops.app` and the live stream (WebSocket, SSE and their
tickets), in the same declarative form as the API's route table.
"""

from __future__ import annotations

from typing import Any

from realtime.protocol import MAX_SUBSCRIPTIONS

from ..service.inventory import InventoryService
from ..store.pg import Store
from .api import PRODUCT_ID_SCHEMA, Auth, Messages, QueryParam, RouteDoc, api_routes
from .catalog import catalog_routes
from .doc_schemas import HealthOut, ReadyOut, StreamTicketOut, WsClientMessage, WsServerMessage
from .openapi import openapi_document
from .waitlist import waitlist_routes
from .webhooks import webhook_routes

__all__ = ["APP_DOCS", "api_document"]

_SERVER_MESSAGES = Messages("WsServerMessage", WsServerMessage)

APP_DOCS: dict[str, dict[str, RouteDoc]] = {
    "/health": {
        "get": RouteDoc(
            "Liveness", None, None, HealthOut,
            operation_id="getHealth", tag="Operations",
            description="200 while the process serves requests; touches no dependency.",
        ),
    },
    "/ready": {
        "get": RouteDoc(
            "Readiness: PostgreSQL and Redis reachable", "read", None, ReadyOut,
            operation_id="getReadiness", tag="Operations", also=(503,), optional_auth=True,
            description="200 when both answer within 2 s, else 503 with the same body "
            "saying which failed. Open unless `INVENTORY_READY_PUBLIC=false`.",
        ),
    },
    "/metrics": {
        "get": RouteDoc(
            "Prometheus metrics", "read", None, str,
            operation_id="getMetrics", tag="Operations", optional_auth=True,
            media_type="text/plain",
            description="Prometheus text format, every worker process aggregated. Open "
            "unless `INVENTORY_METRICS_PUBLIC=false`.",
        ),
    },
    "/openapi.json": {
        "get": RouteDoc(
            "This document", None, None, dict[str, Any],
            operation_id="getOpenApi", tag="Operations",
        ),
    },
    "/v1/ws": {
        "get": RouteDoc(
            "Live stock over WebSocket", "read", None, None, 101,
            operation_id="openStockWebSocket", tag="Live stock", tickets=True,
            errors=("unavailable",),
            messages={
                "client": Messages("WsClientMessage", WsClientMessage),
                "server": _SERVER_MESSAGES,
            },
            description="A WebSocket handshake (RFC 6455); the messages are JSON text "
            "frames, `x-messages` gives their schemas. Send `subscribe` with product ids "
            "(at most 1,000 per connection); the server answers `subscribed`, one "
            "`snapshot` per newly subscribed product, then a `stock` message for every "
            "change (full state: a slow client may get only the newest state of a row; "
            "versions never go backwards per row). A bad message is answered with `error` "
            "and the connection stays open; frames over 64 KiB close it with 1009. A "
            "refused credential is refused at the handshake (401/403); past the "
            "connection cap the handshake answers 503.",
        ),
    },
    "/v1/stream": {
        "get": RouteDoc(
            "Live stock as Server-Sent Events", "read", None, str,
            operation_id="streamStock", tag="Live stock", tickets=True,
            media_type="text/event-stream", errors=("unavailable",),
            query=(
                QueryParam(
                    "product_ids",
                    {"type": "array", "items": PRODUCT_ID_SCHEMA, "minItems": 1,
                     "maxItems": MAX_SUBSCRIPTIONS},
                    "Comma-separated product ids to follow.",
                    required=True,
                ),
            ),
            messages={"server": _SERVER_MESSAGES},
            description="The WebSocket's server messages as `data:` events (one JSON "
            "message each, schemas in `x-messages`): snapshots first, then changes, with "
            "the same ordering, conflation and slow-client rules. A reconnect starts with "
            "fresh snapshots. For clients and proxies where WebSocket is not an option.",
        ),
    },
    "/v1/stream-tickets": {
        "post": RouteDoc(
            "A single-use ticket for a browser's live stream", "read", None,
            StreamTicketOut, 201,
            operation_id="createStreamTicket", tag="Live stock", errors=("unavailable",),
            description="Browsers cannot set `Authorization` on a WebSocket or an "
            "EventSource: they pass this ticket as `?ticket=` instead. Valid 30 s, once.",
        ),
    },
}  # fmt: skip


class _NoBackend:
    """The backend of a route table that is only read for its documentation."""

    def get_service(self) -> InventoryService:
        raise AssertionError("the route table is only read for its documentation here")

    def get_store(self) -> Store:
        raise AssertionError("the route table is only read for its documentation here")


def api_document() -> dict[str, Any]:
    """``/openapi.json`` for every route, built without a server (also for tests)."""
    auth, backend = Auth({}), _NoBackend()
    rows = [
        *webhook_routes(backend, auth, False),
        *catalog_routes(backend, auth),
        *waitlist_routes(backend, auth),
    ]
    _, docs = api_routes(backend, auth, rows)
    return openapi_document({**docs, **APP_DOCS})
