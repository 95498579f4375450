"""The WebSocket wire protocol: parsing and validating client commands, encoding messages.

Pure (no I/O, no clock): every function maps values to values, so the whole protocol is
testable without a socket. Validation is strict and total: any input either parses into
a :data:`Command` or raises :class:`ProtocolError` carrying the ``code`` and ``message``
the client is sent; ids that fail validation never reach Redis or SQL.

Limits: a frame is at most :data:`MAX_FRAME_BYTES` (the transport closes with 1009 above
it); one command names at most :data:`MAX_SUBSCRIPTIONS` products. Unknown fields are
rejected (as in the HTTP API) so a misspelt ``since`` is reported instead of ignored.

Outbound stock messages are encoded once per update and shared by every connection they
go to (:class:`Outgoing`): as text for the ASGI send path and as a complete WebSocket
frame (:func:`text_frame`) for direct socket writes. Server frames are unmasked and,
without extensions, byte-identical for every client, so the frame is built once too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from inventory.domain.model import (  # the id rules (the domain's value rules, see ARCHITECTURE)
    PRODUCT_ID_RE,
    PRODUCT_ID_RULE,
    WAREHOUSE_ID_RE,
    WAREHOUSE_ID_RULE,
)
from realtime.ports import LevelState, StockChange

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_SUBSCRIPTIONS",
    "PONG",
    "PRODUCT_ID_RE",
    "WAREHOUSE_ID_RE",
    "Command",
    "ErrorCode",
    "Outgoing",
    "Ping",
    "ProtocolError",
    "Subscribe",
    "Unsubscribe",
    "decode_stock",
    "encode_error",
    "encode_snapshot",
    "encode_stock",
    "encode_subscribed",
    "encode_unsubscribed",
    "parse_command",
    "stock_from_change",
    "stock_from_level",
    "text_frame",
    "validate_product_ids",
]

MAX_FRAME_BYTES = 64 * 1024
MAX_SUBSCRIPTIONS = 1000

_ECHO_LIMIT = 64  # longest piece of client input quoted back in an error message


class ErrorCode(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_OP = "unknown_op"
    INVALID_PRODUCT_ID = "invalid_product_id"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    UNSUPPORTED_FRAME = "unsupported_frame"
    UNAVAILABLE = "unavailable"


class ProtocolError(Exception):
    """A client message that is answered with ``{"type": "error", ...}``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Subscribe:
    product_ids: tuple[str, ...]
    since: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    product_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    pass


Command = Subscribe | Unsubscribe | Ping

_FIELDS: dict[str, frozenset[str]] = {
    "subscribe": frozenset({"op", "product_ids", "since"}),
    "unsubscribe": frozenset({"op", "product_ids"}),
    "ping": frozenset({"op"}),
}


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _ECHO_LIMIT else text[: _ECHO_LIMIT - 1] + "…"


def _product_ids(raw: Any, *, subscribing: bool) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "product_ids must be a non-empty list of product ids"
        )
    if len(raw) > MAX_SUBSCRIPTIONS:
        code = ErrorCode.TOO_MANY_SUBSCRIPTIONS if subscribing else ErrorCode.INVALID_MESSAGE
        raise ProtocolError(code, f"at most {MAX_SUBSCRIPTIONS} product ids per message")
    for value in raw:
        if not isinstance(value, str) or PRODUCT_ID_RE.fullmatch(value) is None:
            raise ProtocolError(
                ErrorCode.INVALID_PRODUCT_ID,
                f"product id {_quote(value)} must be {PRODUCT_ID_RULE}",
            )
    return tuple(dict.fromkeys(raw))


def validate_product_ids(raw: Any) -> tuple[str, ...]:
    """Product ids to subscribe (as for ``subscribe``), deduplicated in order; for
    transports that take them elsewhere than in a message (SSE's query string)."""
    return _product_ids(raw, subscribing=True)


def _since(raw: Any, product_ids: tuple[str, ...]) -> dict[str, dict[str, int]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            "since must be an object {product_id: {warehouse_id: version}}",
        )
    wanted = set(product_ids)
    since: dict[str, dict[str, int]] = {}
    for product_id, versions in raw.items():
        if product_id not in wanted:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"since names product {_quote(product_id)} that is not in product_ids",
            )
        if not isinstance(versions, dict):
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "since values must be objects {warehouse_id: version}"
            )
        for warehouse_id, version in versions.items():
            if WAREHOUSE_ID_RE.fullmatch(warehouse_id) is None:
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE,
                    f"warehouse id {_quote(warehouse_id)} must be {WAREHOUSE_ID_RULE}",
                )
            if type(version) is not int or version < 0:
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE, "since versions must be non-negative integers"
                )
        since[product_id] = dict(versions)
    return since


def parse_command(text: str) -> Command:
    """Parse one text frame into a command, or raise :class:`ProtocolError`."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "message is not valid JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")
    op = data.get("op")
    if not isinstance(op, str):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "message needs a string field 'op'")
    allowed = _FIELDS.get(op)
    if allowed is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_OP,
            f"unknown op {_quote(op)}; expected subscribe, unsubscribe or ping",
        )
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"unknown field(s) for {op}: {_quote(unknown)}"
        )
    if op == "ping":
        return Ping()
    if op == "unsubscribe":
        return Unsubscribe(_product_ids(data.get("product_ids"), subscribing=False))
    product_ids = _product_ids(data.get("product_ids"), subscribing=True)
    return Subscribe(product_ids, _since(data.get("since"), product_ids))


def encode_stock(
    *,
    product_id: str,
    warehouse_id: str,
    quantity: int,
    reserved: int,
    version: int,
    event: str,
    ts: float,
) -> bytes:
    """The ``stock`` message: the full state of one row after a change."""
    return orjson.dumps(
        {
            "type": "stock",
            "product_id": product_id,
            "warehouse_id": warehouse_id,
            "quantity": quantity,
            "reserved": reserved,
            "available": quantity - reserved,
            "version": version,
            "event": event,
            "ts": ts,
        }
    )


def stock_from_change(change: StockChange) -> bytes:
    """What the relay publishes for one ledger row (``event`` is the movement kind)."""
    return encode_stock(
        product_id=change.product_id,
        warehouse_id=change.warehouse_id,
        quantity=change.quantity,
        reserved=change.reserved,
        version=change.version,
        event=change.kind,
        ts=change.created_at.timestamp(),
    )


def stock_from_level(level: LevelState, event: str) -> bytes:
    """A ``stock`` message re-sent from the database (``event`` ``resync``)."""
    return encode_stock(
        product_id=level.product_id,
        warehouse_id=level.warehouse_id,
        quantity=level.quantity,
        reserved=level.reserved,
        version=level.version,
        event=event,
        ts=level.updated_at.timestamp(),
    )


def decode_stock(data: bytes) -> tuple[str, int] | None:
    """``(warehouse_id, version)`` of a published ``stock`` payload; ``None`` if malformed."""
    try:
        message = orjson.loads(data)
        warehouse_id = message["warehouse_id"]
        version = message["version"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None
    if not isinstance(warehouse_id, str) or type(version) is not int:
        return None
    return warehouse_id, version


def encode_snapshot(product_id: str, levels: Iterable[LevelState]) -> str:
    return orjson.dumps(
        {
            "type": "snapshot",
            "product_id": product_id,
            "levels": [
                {
                    "warehouse_id": level.warehouse_id,
                    "quantity": level.quantity,
                    "reserved": level.reserved,
                    "available": level.available,
                    "version": level.version,
                    "updated_at": level.updated_at,
                }
                for level in levels
            ],
        },
        option=orjson.OPT_UTC_Z,  # "...Z", as in every HTTP body
    ).decode()


def encode_subscribed(product_ids: Iterable[str]) -> str:
    return orjson.dumps({"type": "subscribed", "product_ids": list(product_ids)}).decode()


def encode_unsubscribed(product_ids: Iterable[str]) -> str:
    return orjson.dumps({"type": "unsubscribed", "product_ids": list(product_ids)}).decode()


def encode_error(code: ErrorCode, message: str) -> str:
    return orjson.dumps({"type": "error", "code": code.value, "message": message}).decode()


PONG = orjson.dumps({"type": "pong"}).decode()


def text_frame(payload: bytes) -> bytes:
    """``payload`` (UTF-8 text) as one complete server-to-client WebSocket frame (RFC 6455
    section 5.2): FIN set, opcode text, no mask. Valid only on a connection without
    extensions; the server never negotiates permessage-deflate."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = b"\x81\x7e" + size.to_bytes(2, "big")
    else:
        header = b"\x81\x7f" + size.to_bytes(8, "big")
    return header + payload


class Outgoing:
    """One stock message encoded for every connection at once: ``text`` for the ASGI send
    path, ``frame`` (:func:`text_frame`) for direct writes. Built once per update and
    shared, so the per-connection cost of a delivery is a reference, not an encoding."""

    __slots__ = ("frame", "text")

    def __init__(self, payload: bytes) -> None:
        self.text = payload.decode()
        self.frame = text_frame(payload)
