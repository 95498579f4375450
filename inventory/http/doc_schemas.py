"""Schemas that exist for ``/openapi.json`` only: the live-stream messages and the
operational routes' answers.

The WebSocket commands are decoded by :mod:`realtime.protocol`'s own msgspec Structs
(they check ids with the domain's regexes after decoding, faster than a per-item
``pattern``, so their types carry no pattern for a schema) and its outbound messages are
encoded with orjson, once per update; these declarations do not validate traffic, and
``tests/test_openapi.py`` holds them to what a real server sends.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from msgspec import Meta, Struct

from realtime.protocol import MAX_SUBSCRIPTIONS, ErrorCode

from .schemas import LevelOut, ProductId, WarehouseId

__all__ = [
    "HealthOut",
    "ReadyChecks",
    "ReadyOut",
    "StreamTicketOut",
    "WsClientMessage",
    "WsError",
    "WsPing",
    "WsPong",
    "WsServerMessage",
    "WsSnapshot",
    "WsStock",
    "WsSubscribe",
    "WsSubscribed",
    "WsUnsubscribe",
    "WsUnsubscribed",
]

ProductIds = Annotated[list[ProductId], Meta(min_length=1, max_length=MAX_SUBSCRIPTIONS)]


# --- client to server ------------------------------------------------------------------


class WsSubscribe(Struct, tag_field="op", tag="subscribe", forbid_unknown_fields=True):
    """Subscribe to products. ``since`` (per product, per warehouse: the last version the
    client holds) limits the snapshot to rows newer than that."""

    product_ids: ProductIds
    since: dict[ProductId, dict[WarehouseId, Annotated[int, Meta(ge=0)]]] | None = None


class WsUnsubscribe(Struct, tag_field="op", tag="unsubscribe", forbid_unknown_fields=True):
    product_ids: ProductIds


class WsPing(Struct, tag_field="op", tag="ping", forbid_unknown_fields=True):
    pass


WsClientMessage = WsSubscribe | WsUnsubscribe | WsPing


# --- server to client ------------------------------------------------------------------


class WsSnapshot(Struct, tag_field="type", tag="snapshot"):
    """Once per newly subscribed product, before any ``stock`` message for it."""

    product_id: str
    levels: list[LevelOut]


class WsStock(Struct, tag_field="type", tag="stock"):
    """The full state of one stock row after a change; ``event`` is the ledger kind
    (``adjusted``, ``reserved``, ``released``, ``committed``, ``expired``) or ``resync``
    when the row is re-sent after a disturbance. ``ts`` is Unix seconds."""

    product_id: str
    warehouse_id: str
    quantity: int
    reserved: int
    available: int
    version: int
    event: str
    ts: float


class WsSubscribed(Struct, tag_field="type", tag="subscribed"):
    product_ids: list[str]


class WsUnsubscribed(Struct, tag_field="type", tag="unsubscribed"):
    product_ids: list[str]


class WsPong(Struct, tag_field="type", tag="pong"):
    pass


class WsError(Struct, tag_field="type", tag="error"):
    """A message the server could not act on; the connection stays open."""

    code: ErrorCode
    message: str


WsServerMessage = WsSnapshot | WsStock | WsSubscribed | WsUnsubscribed | WsPong | WsError


# --- other answers ---------------------------------------------------------------------


class StreamTicketOut(Struct):
    """A single-use credential for ``?ticket=`` on ``/v1/ws`` and ``/v1/stream``."""

    ticket: str
    expires_at: datetime


class HealthOut(Struct):
    status: Literal["ok"]


class ReadyChecks(Struct):
    postgres: bool
    redis: bool


class ReadyOut(Struct):
    status: Literal["ready", "unavailable"]
    checks: ReadyChecks
