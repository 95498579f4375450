"""The server's whole route table (:func:`app_routes`): the API's operations from their
feature modules, then the operational ones (``/health``, ``/ready``, ``/metrics``,
``/openapi.json``, whose handlers :mod:`inventory.ops.app` supplies), the live streams
and their tickets; and :func:`api_document`, the table's ``/openapi.json``, built without
a server.

The WebSocket and SSE routes are :mod:`realtime`'s (they authenticate through
:class:`~inventory.http.stream_auth.StreamAuth`): their rows have no handler and only
document them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from realtime.protocol import MAX_SUBSCRIPTIONS

from ..domain.model import Unavailable
from ..service.inventory import InventoryService
from ..store.pg import Store
from .api import PRODUCT_ID_SCHEMA, Backend, api_routes
from .auth import Handler
from .catalog import catalog_routes
from .doc_schemas import HealthOut, ReadyOut, StreamTicketOut, WsClientMessage, WsServerMessage
from .openapi import openapi_document
from .routing import Messages, QueryParam, RouteDoc, Row, route_docs
from .stream_auth import STREAM_SCOPE
from .waitlist import waitlist_routes
from .webhooks import webhook_routes

__all__ = ["OpsHandlers", "api_document", "app_routes"]

_SERVER_MESSAGES = Messages("WsServerMessage", WsServerMessage)


@dataclass(frozen=True, slots=True)
class OpsHandlers:
    """The handlers of the operational routes and of the stream tickets."""

    health: Handler
    ready: Handler
    metrics: Handler
    openapi: Handler
    create_ticket: Handler


def app_routes(backend: Backend, ops: OpsHandlers, webhook_allow_private: bool) -> list[Row]:
    """Every operation, in the order ``/openapi.json`` lists them."""
    return [
        *api_routes(backend),
        *webhook_routes(backend, webhook_allow_private),
        *catalog_routes(backend),
        *waitlist_routes(backend),
        *_ops_routes(ops),
    ]


def _ops_routes(ops: OpsHandlers) -> list[Row]:
    return [
        ("/health", "GET", ops.health, RouteDoc(
            "Liveness", None, None, HealthOut,
            operation_id="getHealth", tag="Operations",
            description="200 while the process serves requests; touches no dependency.",
        )),
        ("/ready", "GET", ops.ready, RouteDoc(
            "Readiness: PostgreSQL and Redis reachable", "read", None, ReadyOut,
            operation_id="getReadiness", tag="Operations", also=(503,), optional_auth=True,
            description="200 when both answer within 2 s, else 503 with the same body "
            "saying which failed. Open unless `INVENTORY_READY_PUBLIC=false`.",
        )),
        ("/metrics", "GET", ops.metrics, RouteDoc(
            "Prometheus metrics", "read", None, str,
            operation_id="getMetrics", tag="Operations", optional_auth=True,
            media_type="text/plain",
            description="Prometheus text format, every worker process aggregated. Open "
            "unless `INVENTORY_METRICS_PUBLIC=false`.",
        )),
        ("/openapi.json", "GET", ops.openapi, RouteDoc(
            "This document", None, None, dict[str, Any],
            operation_id="getOpenApi", tag="Operations",
        )),
        ("/v1/ws", "GET", None, RouteDoc(
            "Live stock over WebSocket", STREAM_SCOPE, None, None, 101,
            operation_id="openStockWebSocket", tag="Live stock", tickets=True,
            errors=(Unavailable,),
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
        )),
        ("/v1/stream", "GET", None, RouteDoc(
            "Live stock as Server-Sent Events", STREAM_SCOPE, None, str,
            operation_id="streamStock", tag="Live stock", tickets=True,
            media_type="text/event-stream", errors=(Unavailable,),
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
            "fresh snapshots. The credential is checked before the products (401/403 "
            "before 422); a request refused with 422 leaves its `ticket` unspent. For "
            "clients and proxies where WebSocket is not an option.",
        )),
        ("/v1/stream-tickets", "POST", ops.create_ticket, RouteDoc(
            "A single-use ticket for a browser's live stream", STREAM_SCOPE, None,
            StreamTicketOut, 201,
            operation_id="createStreamTicket", tag="Live stock", errors=(Unavailable,),
            description="Browsers cannot set `Authorization` on a WebSocket or an "
            "EventSource: they pass this ticket as `?ticket=` instead. Valid 30 s, once.",
        )),
    ]  # fmt: skip


class _NoBackend:
    """The backend of a route table that is only read for its documentation."""

    def get_service(self) -> InventoryService:
        raise AssertionError("the route table is only read for its documentation here")

    def get_store(self) -> Store:
        raise AssertionError("the route table is only read for its documentation here")


async def _unserved(request: Request) -> Response:
    raise AssertionError("the route table is only read for its documentation here")


def api_document() -> dict[str, Any]:
    """``/openapi.json`` for every route, built without a server (also for tests)."""
    ops = OpsHandlers(_unserved, _unserved, _unserved, _unserved, _unserved)
    return openapi_document(route_docs(app_routes(_NoBackend(), ops, False)))
