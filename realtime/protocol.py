"""The WebSocket wire protocol: parsing and validating client commands, encoding messages.

Pure (no I/O, no clock): every function maps values to values, so the whole protocol is
testable without a socket. Validation is strict and total: any input either parses into
a :data:`Command` or raises :class:`ProtocolError` carrying the ``code`` and ``message``
the client is sent; ids that fail validation never reach Redis or SQL. The commands are a
msgspec tagged union on ``op``: msgspec checks the shape in one pass, and a failure's
location (``$.product_ids[3]``) picks the SPEC's error code and message.

Limits: a frame is at most :data:`MAX_FRAME_BYTES` (the transport closes with 1009 above
it); one command names at most :data:`MAX_SUBSCRIPTIONS` products. Unknown fields are
rejected (as in the HTTP API) so a misspelt ``since`` is reported instead of ignored.

The server's messages are built here from the data the publishers send over Redis
(:mod:`realtime.feed`), so this module alone owns the client's wire format. Outbound
stock messages are encoded once per update and shared by every connection they go to
(:class:`Outgoing`): as text for the ASGI send path and as a complete WebSocket
frame (:func:`text_frame`) for direct socket writes. Server frames are unmasked and,
without extensions, byte-identical for every client, so the frame is built once too.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Any

import msgspec
import orjson
from msgspec import Meta

from inventory.domain.model import (  # the id rules (the domain's value rules, see ARCHITECTURE)
    PRODUCT_ID_RE,
    PRODUCT_ID_RULE,
    WAREHOUSE_ID_RE,
    WAREHOUSE_ID_RULE,
)
from realtime.feed import AlertData, KitData, StockData
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
    "encode_alert",
    "encode_error",
    "encode_kit",
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


# The id rules are checked in ``__post_init__`` with the domain's compiled regexes:
# msgspec's ``Meta(pattern=...)`` costs about 0.7 us per id here against 0.3 us for
# ``map(fullmatch)``, and a subscribe may carry 1,000 ids.
ProductIds = Annotated[tuple[str, ...], Meta(min_length=1, max_length=MAX_SUBSCRIPTIONS)]
Version = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # a PostgreSQL bigint


class _Command(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, frozen=True):
    """A client command: a JSON object whose ``op`` names its type (a tagged union).
    Decoding checks the shape; ``__post_init__`` the ids and what spans fields, raising
    :class:`ProtocolError` itself (msgspec lets it through unwrapped)."""

    product_ids: ProductIds

    def __post_init__(self) -> None:
        ids = self.product_ids
        if not all(map(PRODUCT_ID_RE.fullmatch, ids)):
            bad = next(i for i in ids if PRODUCT_ID_RE.fullmatch(i) is None)
            raise ProtocolError(
                ErrorCode.INVALID_PRODUCT_ID, f"product id {_quote(bad)} must be {PRODUCT_ID_RULE}"
            )
        if len(set(ids)) != len(ids):  # once each, in their first order
            msgspec.structs.force_setattr(self, "product_ids", tuple(dict.fromkeys(ids)))


class Subscribe(_Command, tag="subscribe", frozen=True):
    since: dict[str, dict[str, Version]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for product_id, versions in (self.since or {}).items():
            if product_id not in self.product_ids:
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE,
                    f"since names product {_quote(product_id)} that is not in product_ids",
                )
            if not all(map(WAREHOUSE_ID_RE.fullmatch, versions)):
                bad = next(w for w in versions if WAREHOUSE_ID_RE.fullmatch(w) is None)
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE,
                    f"warehouse id {_quote(bad)} must be {WAREHOUSE_ID_RULE}",
                )


class Unsubscribe(_Command, tag="unsubscribe", frozen=True):
    pass


class Ping(msgspec.Struct, tag_field="op", tag="ping", forbid_unknown_fields=True, frozen=True):
    pass


Command = Subscribe | Unsubscribe | Ping

_decode = msgspec.json.Decoder(Command).decode
_FIELDS = {
    kind.__struct_config__.tag: {"op", *kind.__struct_fields__}
    for kind in (Subscribe, Unsubscribe, Ping)
}


_SHALLOW = reprlib.Repr()
_SHALLOW.maxlevel = 2  # a deeply nested value must not exhaust the stack when quoted


def _quote(value: object) -> str:
    text = repr(value) if isinstance(value, str) else _SHALLOW.repr(value)
    return text if len(text) <= _ECHO_LIMIT else text[: _ECHO_LIMIT - 1] + "…"


def parse_command(text: str) -> Command:
    """Parse one text frame into a command, or raise :class:`ProtocolError`."""
    try:
        return _decode(text)
    except msgspec.ValidationError as exc:
        try:
            data = orjson.loads(text)  # only to quote the culprit back
        except orjson.JSONDecodeError:  # malformed further on: still a JSON error
            raise ProtocolError(ErrorCode.INVALID_JSON, "message is not valid JSON") from None
        raise _refusal(exc, data) from None
    except msgspec.DecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "message is not valid JSON") from None
    except RecursionError:  # msgspec skipping deep values in search of "op"
        raise ProtocolError(ErrorCode.INVALID_JSON, "message is nested too deeply") from None


def validate_product_ids(raw: Any) -> tuple[str, ...]:
    """Product ids to subscribe (as for ``subscribe``), deduplicated in order; for
    transports that take them elsewhere than in a message (SSE's query string)."""
    data = {"op": "subscribe", "product_ids": raw}
    try:
        return msgspec.convert(data, Subscribe).product_ids
    except msgspec.ValidationError as exc:
        raise _refusal(exc, data) from None


_IDS_MESSAGE = "product_ids must be a non-empty list of product ids"
_SINCE_MESSAGE = "since must be an object {product_id: {warehouse_id: version}}"
# msgspec's error location -> the SPEC's error code and message.
_AT: dict[str, tuple[ErrorCode, str]] = {
    "$.op": (ErrorCode.INVALID_MESSAGE, "message needs a string field 'op'"),
    "$.product_ids": (ErrorCode.INVALID_MESSAGE, _IDS_MESSAGE),
    "$.since": (ErrorCode.INVALID_MESSAGE, _SINCE_MESSAGE),
    "$.since[...]": (
        ErrorCode.INVALID_MESSAGE,
        "since values must be objects {warehouse_id: version}",
    ),
    "$.since[...][...]": (
        ErrorCode.INVALID_MESSAGE,
        "since versions must be integers from 0 to 2^63-1",
    ),
}


def _refusal(error: msgspec.ValidationError, data: Any) -> ProtocolError:
    """msgspec's validation error (``<what> - at `<where>```) as the protocol's error
    code and message, quoting the offending value from ``data`` (the message as plain
    JSON)."""
    what, _, where = str(error).partition(" - at `")
    where = where.removesuffix("`")
    op = data.get("op") if isinstance(data, dict) else None
    if not where:  # the object itself
        if not isinstance(data, dict):
            return ProtocolError(ErrorCode.INVALID_MESSAGE, "message must be a JSON object")
        if "unknown field" in what:
            unknown = sorted(set(data) - _FIELDS.get(op, {"op"}))
            return ProtocolError(
                ErrorCode.INVALID_MESSAGE, f"unknown field(s) for {op}: {_quote(unknown)}"
            )
        where = "$." + what.rpartition(" ")[2].strip("`")  # missing required field `x`
    if where == "$.op" and what.startswith("Invalid value"):
        return ProtocolError(
            ErrorCode.UNKNOWN_OP,
            f"unknown op {_quote(op)}; expected subscribe, unsubscribe or ping",
        )
    if where == "$.product_ids" and "length <=" in what:
        code = ErrorCode.TOO_MANY_SUBSCRIPTIONS if op == "subscribe" else ErrorCode.INVALID_MESSAGE
        return ProtocolError(code, f"at most {MAX_SUBSCRIPTIONS} product ids per message")
    if where.startswith("$.product_ids["):
        index = int(where[len("$.product_ids[") : -1])
        try:
            culprit = _quote(data["product_ids"][index])
        except (LookupError, TypeError):  # a repeated key: msgspec read another one
            culprit = f"number {index + 1}"
        return ProtocolError(
            ErrorCode.INVALID_PRODUCT_ID, f"product id {culprit} must be {PRODUCT_ID_RULE}"
        )
    code, message = _AT.get(where, (ErrorCode.INVALID_MESSAGE, what))
    return ProtocolError(code, message)


def encode_stock(product_id: str, data: StockData) -> bytes:
    """The ``stock`` message: the full state of one row after a change."""
    return orjson.dumps(
        {
            "type": "stock",
            "product_id": product_id,
            "warehouse_id": data.warehouse_id,
            "quantity": data.quantity,
            "reserved": data.reserved,
            "available": data.quantity - data.reserved,
            "version": data.version,
            "event": data.event,
            "ts": data.ts,
        }
    )


def stock_from_change(change: StockChange) -> bytes:
    """The ``stock`` message of one ledger row (``event`` is the movement kind)."""
    return encode_stock(change.product_id, StockData.from_change(change))


def stock_from_level(level: LevelState, event: str) -> bytes:
    """A ``stock`` message re-sent from the database (``event`` ``resync``)."""
    data = StockData(
        level.warehouse_id,
        event,
        level.quantity,
        level.reserved,
        level.version,
        level.updated_at.timestamp(),
    )
    return encode_stock(level.product_id, data)


def encode_kit(product_id: str, data: KitData) -> bytes:
    """The ``kit`` message: a kit's reservable number (``seq`` orders them)."""
    return orjson.dumps(
        {"type": "kit", "product_id": product_id, "reservable": data.reservable, "seq": data.seq}
    )


def encode_alert(product_id: str, data: AlertData) -> bytes:
    """The ``alert`` message: a low-stock crossing."""
    return orjson.dumps(
        {
            "type": "alert",
            "product_id": product_id,
            "event": data.event,
            "reservable": data.reservable,
            "ts": data.ts,
        }
    )


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
