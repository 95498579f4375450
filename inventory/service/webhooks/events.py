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

from realtime.protocol import stock_from_change

from ...domain.model import Reservation, ReservationStatus
from ...store.db import Conn
from ...store.pg import Store
from ...store.webhooks import Event, LedgerRow

__all__ = [
    "EVENT_TYPES",
    "PRODUCERS",
    "ProduceContext",
    "Producer",
    "event_id",
    "install",
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


def _reservation_producer(
    event_type: str, kind: str, status: ReservationStatus, body_of: Callable[[Reservation], Any]
) -> Producer:
    async def produce(ctx: ProduceContext, rows: Sequence[LedgerRow]) -> list[Event]:
        first: dict[UUID, LedgerRow] = {}
        for row in rows:
            if row.kind == kind and row.reservation_id is not None:
                first.setdefault(row.reservation_id, row)
        events = []
        for reservation_id, row in first.items():
            reservation, _ = await ctx.store.get_reservation(reservation_id, ctx.conn)
            body = body_of(replace(reservation, status=status))
            products = [line.product_id for line in reservation.lines]
            events.append(
                make_event(event_type, reservation_id, products, row.created_at, row.position, body)
            )
        return events

    return produce


PRODUCERS: dict[str, Producer] = {"stock.changed": _stock_changed}

# Event type -> the ledger rows' kind and the status the event's body shows.
_RESERVATION_EVENTS = {
    "reservation.created": ("reserved", ReservationStatus.ACTIVE),
    "reservation.committed": ("committed", ReservationStatus.COMMITTED),
    "reservation.released": ("released", ReservationStatus.RELEASED),
    "reservation.expired": ("expired", ReservationStatus.EXPIRED),
}


def install(reservation_body: Callable[[Reservation], Any]) -> None:
    """Install the ``reservation.*`` producers; ``reservation_body`` renders a reservation
    as the HTTP API does (given by the composition root: this layer never imports HTTP)."""
    for event_type, (kind, status) in _RESERVATION_EVENTS.items():
        register_producer(
            event_type, _reservation_producer(event_type, kind, status, reservation_body)
        )


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
