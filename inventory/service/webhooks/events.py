"""Events from the ledger: a table of event type -> producer.

A producer turns a batch of committed ledger rows (in outbox order) into the events of
its type. Every event carries the ledger position it stems from (events of one batch
are queued in that order), the products it concerns (delivery order is kept per
product) and a stable id: a UUIDv5 of the type and the source (ledger row id or
reservation id), so the same event has the same id at every attempt, in every process
and for every endpoint, and a receiver can dedupe on it.

``stock.changed`` is one event per ledger row (``data``: the live stream's ``stock``
message); ``reservation.*`` is one event per reservation transition, not per row
(``data``: the reservation body with the status of that transition). Types without a
producer yet (``stock.low``/``out``/``back``, ``waitlist.offered``) can be registered
by a webhook; :func:`register_producer` adds their producer.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import orjson

from realtime.ports import StockChange
from realtime.protocol import stock_from_change

from ...domain.model import ReservationStatus
from ...http.api import reservation_out
from ...store.pg import Conn, Store

__all__ = [
    "EVENT_TYPES",
    "PRODUCERS",
    "Event",
    "LedgerRow",
    "ProduceContext",
    "Producer",
    "event_id",
    "produce",
    "register_producer",
]

# Every type a webhook may subscribe to (SPEC "Webhooks"), in documentation order.
EVENT_TYPES = (
    "stock.changed",
    "stock.low",
    "stock.out",
    "stock.back",
    "reservation.created",
    "reservation.committed",
    "reservation.released",
    "reservation.expired",
    "waitlist.offered",
)

_NAMESPACE = uuid.UUID("6f1c1c3e-6b51-4c8e-9a51-5e0b7d0f3a11")


@dataclass(frozen=True, slots=True)
class LedgerRow(StockChange):
    """One committed ``movements`` row: a stock change and the reservation it belongs to.

    Here ``ticket`` is the writing transaction's id (``movements.xid``): the webhook
    cursor is ``(xid, id)``, read only below the oldest running transaction.
    """

    reservation_id: UUID | None


@dataclass(frozen=True, slots=True)
class Event:
    """An event ready to queue: ``body`` is the exact JSON every attempt sends."""

    event_id: UUID
    type: str
    products: tuple[str, ...]
    created_at: datetime
    position: tuple[int, int]
    body: bytes


@dataclass(frozen=True, slots=True)
class ProduceContext:
    """What a producer may read besides the rows: the batch's connection and the store."""

    conn: Conn
    store: Store


Producer = Callable[[ProduceContext, Sequence[LedgerRow]], Awaitable[list[Event]]]


def event_id(event_type: str, source: object) -> UUID:
    """The stable id of the event of ``event_type`` that stems from ``source``."""
    return uuid.uuid5(_NAMESPACE, f"{event_type}:{source}")


def make_event(
    event_type: str,
    source: object,
    products: Sequence[str],
    created_at: datetime,
    position: tuple[int, int],
    data: Any,
) -> Event:
    """An event with its delivery body ``{id, type, created_at, data}``."""
    eid = event_id(event_type, source)
    body = msgspec.json.encode(
        {"id": eid, "type": event_type, "created_at": created_at, "data": data}
    )
    return Event(eid, event_type, tuple(dict.fromkeys(products)), created_at, position, body)


async def _stock_changed(ctx: ProduceContext, rows: Sequence[LedgerRow]) -> list[Event]:
    events = []
    for row in rows:
        message = stock_from_change(row)
        events.append(
            make_event(
                "stock.changed", row.id, [row.product_id], row.created_at, row.position,
                orjson.loads(message),
            )
        )  # fmt: skip
    return events


def _reservation_producer(kind: str, status: ReservationStatus) -> Producer:
    event_type = f"reservation.{'created' if kind == 'reserved' else kind}"

    async def produce(ctx: ProduceContext, rows: Sequence[LedgerRow]) -> list[Event]:
        first: dict[UUID, LedgerRow] = {}
        for row in rows:
            if row.kind == kind and row.reservation_id is not None:
                first.setdefault(row.reservation_id, row)
        events = []
        for reservation_id, row in first.items():
            reservation, _ = await ctx.store.get_reservation(reservation_id, ctx.conn)
            body = reservation_out(replace(reservation, status=status))
            products = [line.product_id for line in reservation.lines]
            events.append(
                make_event(event_type, reservation_id, products, row.created_at, row.position, body)
            )
        return events

    return produce


PRODUCERS: dict[str, Producer] = {
    "stock.changed": _stock_changed,
    "reservation.created": _reservation_producer("reserved", ReservationStatus.ACTIVE),
    "reservation.committed": _reservation_producer("committed", ReservationStatus.COMMITTED),
    "reservation.released": _reservation_producer("released", ReservationStatus.RELEASED),
    "reservation.expired": _reservation_producer("expired", ReservationStatus.EXPIRED),
}


def register_producer(event_type: str, producer: Producer) -> None:
    """Install the producer of one of :data:`EVENT_TYPES` (e.g. ``stock.low``)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    PRODUCERS[event_type] = producer


async def produce(
    ctx: ProduceContext, rows: Sequence[LedgerRow], types: Sequence[str]
) -> list[Event]:
    """The events of ``types`` for ``rows``, in ledger order (ties: type order)."""
    order = {t: i for i, t in enumerate(EVENT_TYPES)}
    events: list[Event] = []
    for event_type in types:
        producer = PRODUCERS.get(event_type)
        if producer is not None:
            events += await producer(ctx, rows)
    events.sort(key=lambda e: (e.position, order[e.type]))
    return events
