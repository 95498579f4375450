"""The HTTP-overhead ceiling: a bare Starlette app with the same routes' shapes.

It does what any endpoint of the real server must do at the least (route, read the
body, answer JSON) and nothing else: no validation, no database, no middleware. Served
with the same uvicorn settings as ``inventory serve`` (uvloop, httptools, no access
log), its throughput is the most the real server could reach on this machine.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["app"]

_NOW = datetime.now(UTC)
# Answers of the same size as the real ones: a one-line reservation and a one-row stock.
_RESERVATION = msgspec.json.encode(
    {
        "id": uuid.uuid4(),
        "status": "active",
        "lines": [{"product_id": "sku-1234", "warehouse_id": "wh-1", "quantity": 1}],
        "reference": None,
        "created_at": _NOW,
        "expires_at": _NOW,
    }
)
_STOCK = msgspec.json.encode(
    {
        "product_id": "sku-1234",
        "quantity": 1000000,
        "reserved": 12,
        "available": 999988,
        "reservable": 999988,
        "levels": [
            {
                "warehouse_id": "wh-1",
                "quantity": 1000000,
                "reserved": 12,
                "available": 999988,
                "version": 13,
                "updated_at": _NOW,
            }
        ],
    }
)


async def reserve(request: Request) -> Response:
    await request.body()
    return Response(_RESERVATION, 201, media_type="application/json")


async def stock(request: Request) -> Response:
    return Response(_STOCK, 200, media_type="application/json")


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', 200, media_type="application/json")


app = Starlette(
    routes=[
        Route("/v1/reservations", reserve, methods=["POST"]),
        Route("/v1/products/{product_id}/stock", stock, methods=["GET"]),
        Route("/ready", health, methods=["GET"]),
    ]
)
