"""What goes over Redis pub/sub: versioned data messages on the products' stock channels.

Publishers (the outbox relay, inventory's commerce feed) send data; the hubs own the
client's wire format (:mod:`realtime.protocol`) and build each client frame from it, once
per message and process. So a change of the WebSocket messages needs only the hubs
upgraded, and a change of the data can roll out process by process.

Encoding: a JSON array ``[kind, field, ...]`` (msgspec ``array_like`` Structs, a tagged
union on the first element), e.g. ``["stock.v1","w1","reserved",10,4,3,1700000000.5]``:
short, readable with ``redis-cli subscribe``, about half a microsecond to decode. The
product is the channel's (:meth:`realtime.keys.RedisKeys.product_of_channel`), not a field.

Versioning rules:

* A new field goes at the end and has a default: an older hub ignores the extra element,
  a newer hub reading an older publisher's message gets the default.
* Any other change (a field's meaning, type or place, a removal) is a new kind
  (``stock.v2``), published only once every hub reads it: upgrade the hubs first.
* A hub that cannot read a message (a kind it does not know, or garbage) re-reads the
  product from PostgreSQL, since a stock change may hide behind it: its clients are never
  left on a stale value, whatever a newer publisher sends.

Pure: no I/O.
"""

from __future__ import annotations

import msgspec

from realtime.ports import StockChange

__all__ = ["AlertData", "FeedMessage", "KitData", "StockData", "decode", "encode"]


class StockData(msgspec.Struct, array_like=True, frozen=True, tag="stock.v1"):
    """The state of one stock row after a committed change (``event``: the ledger kind)."""

    warehouse_id: str
    event: str
    quantity: int
    reserved: int
    version: int
    ts: float  # Unix seconds of the change

    @classmethod
    def from_change(cls, change: StockChange) -> StockData:
        return cls(
            change.warehouse_id,
            change.kind,
            change.quantity,
            change.reserved,
            change.version,
            change.created_at.timestamp(),
        )


class KitData(msgspec.Struct, array_like=True, frozen=True, tag="kit.v1"):
    """A kit's reservable number; ``seq`` only goes up (a Redis counter per kit)."""

    reservable: int
    seq: int


class AlertData(msgspec.Struct, array_like=True, frozen=True, tag="alert.v1"):
    """A low-stock crossing (``event``: ``stock.low``, ``stock.out`` or ``stock.back``)."""

    event: str
    reservable: int
    ts: float


FeedMessage = StockData | KitData | AlertData

encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(FeedMessage).decode


def decode(data: bytes) -> FeedMessage | None:
    """The message published as ``data``, or ``None`` if this version cannot read it."""
    try:
        return _decode(data)
    except (msgspec.DecodeError, RecursionError):  # deep nesting among ignored elements
        return None
