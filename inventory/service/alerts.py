"""Low-stock alerts (``stock.low`` / ``stock.out`` / ``stock.back``), derived from the ledger.

Policy: an alert is a function of the ledger, not of a detector's memory. For a ledger row
of a product with a ``low_stock_threshold``, ``reservable`` just before and just after that
row is recomputed from the ledger itself (each active warehouse's latest row at or before
it, less ``safety_stock``); a crossing between the two is an alert whose id is derived
from the ledger row (:func:`~inventory.service.webhooks.events.event_id`). So every consumer, in
any process, after any crash or restart, finds the same crossings exactly once per row:
the webhook deliverers read the ledger with their own durable cursor and lease, and a
redelivered batch yields the same event ids. Warehouse status and settings are read as
they are now (they are not in the ledger).

Crossings (SPEC "Products"): falling from above the threshold to at or below it is
``stock.low``; reaching 0 is ``stock.out``; rising from 0 is ``stock.back`` (a fall from
above the threshold straight to 0 crosses both and emits both). Products without a
threshold emit no alerts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..store.db import Conn
from ..store.webhooks import Event, LedgerRow
from .webhooks.events import ProduceContext, Producer, make_event, register_producer

__all__ = ["ALERT_TYPES", "Crossing", "crossings", "install", "judge"]

ALERT_TYPES = ("stock.low", "stock.out", "stock.back")


@dataclass(frozen=True, slots=True)
class Crossing:
    ledger_id: int
    product_id: str
    event: str
    reservable: int  # after the ledger row


def judge(before: int, after: int, threshold: int) -> list[str]:
    """The alerts a change of ``reservable`` from ``before`` to ``after`` emits."""
    found = []
    if before > threshold >= after:
        found.append("stock.low")
    if before > 0 == after:
        found.append("stock.out")
    if before == 0 < after:
        found.append("stock.back")
    return found


_REPLAY = """
SELECT m.id, m.product_id, p.safety_stock, p.low_stock_threshold,
       (SELECT coalesce(sum(a.available), 0) FROM stock_levels s
        JOIN warehouses w ON w.id = s.warehouse_id AND w.status = 'active',
        LATERAL (SELECT o.quantity - o.reserved AS available FROM movements o
                 WHERE o.product_id = s.product_id AND o.warehouse_id = s.warehouse_id
                   AND o.id <= m.id ORDER BY o.id DESC LIMIT 1) a
        WHERE s.product_id = m.product_id)::bigint AS after,
       (SELECT coalesce(sum(a.available), 0) FROM stock_levels s
        JOIN warehouses w ON w.id = s.warehouse_id AND w.status = 'active',
        LATERAL (SELECT o.quantity - o.reserved AS available FROM movements o
                 WHERE o.product_id = s.product_id AND o.warehouse_id = s.warehouse_id
                   AND o.id < m.id ORDER BY o.id DESC LIMIT 1) a
        WHERE s.product_id = m.product_id)::bigint AS before
FROM movements m JOIN products p ON p.product_id = m.product_id
WHERE m.id = ANY($1::bigint[]) AND p.low_stock_threshold IS NOT NULL
ORDER BY m.id
"""


async def crossings(conn: Conn, ledger_ids: Sequence[int]) -> list[Crossing]:
    """The alerts of these ledger rows, in ledger id order."""
    if not ledger_ids:
        return []
    found = []
    for r in await conn.fetch(_REPLAY, list(ledger_ids)):
        safety = r["safety_stock"]
        before, after = max(0, r["before"] - safety), max(0, r["after"] - safety)
        for event in judge(before, after, r["low_stock_threshold"]):
            found.append(Crossing(r["id"], r["product_id"], event, after))
    return found


def _producer(event_type: str) -> Producer:
    async def produce(ctx: ProduceContext, rows: Sequence[LedgerRow]) -> list[Event]:
        by_id = {row.id: row for row in rows}
        events = []
        for c in await crossings(ctx.conn, list(by_id)):
            if c.event != event_type:
                continue
            row = by_id[c.ledger_id]
            data = {"product_id": c.product_id, "event": c.event, "reservable": c.reservable,
                    "ts": row.created_at}  # fmt: skip
            events.append(
                make_event(event_type, row.id, [c.product_id], row.created_at, row.position, data)
            )
        return events

    return produce


def install() -> None:
    """Register the alert producers with the webhook event table."""
    for event_type in ALERT_TYPES:
        register_producer(event_type, _producer(event_type))
