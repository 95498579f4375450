"""The SQL of webhooks: registrations, the per-webhook queue, the delivery log.

Registration starts a webhook's ledger cursor at ``(pg_snapshot_xmin, 0)``: every row of
a transaction still running or not yet begun is after it, every row already final
before it, so the webhook receives exactly what commits from then on (plus, at worst,
rows of transactions newer than the oldest running one that committed just before).

Turning ledger rows into queued events and moving the cursor happen in one
transaction that first locks the webhook's row, so a crash never loses or repeats a
batch and a deleted webhook takes nothing more. Acknowledging an event deletes it from
the queue and appends the attempt to the log in one transaction.

Nothing here runs inside the reservation or stock transactions: the ledger rows are
read after they committed, so the write path carries no webhook cost at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from realtime.ports import StockChange

from ..domain.model import NotFound
from .db import Conn, _translated

__all__ = ["Delivery", "Event", "LedgerRow", "QueuedEvent", "Webhook", "WebhookStore"]

_TIMEOUT = 5.0

_TAIL = "pg_snapshot_xmin(pg_current_snapshot())"

_PUT = f"""
INSERT INTO webhooks (id, url, events, secret, active, cursor_xid, cursor_id)
VALUES ($1, $2, $3, $4, $5, {_TAIL}, 0)
ON CONFLICT (id) DO UPDATE SET
    url = EXCLUDED.url, events = EXCLUDED.events, secret = EXCLUDED.secret,
    active = EXCLUDED.active, updated_at = now(),
    cursor_xid = CASE WHEN EXCLUDED.active AND NOT webhooks.active
                      THEN EXCLUDED.cursor_xid ELSE webhooks.cursor_xid END,
    cursor_id = CASE WHEN EXCLUDED.active AND NOT webhooks.active
                     THEN 0 ELSE webhooks.cursor_id END
RETURNING id, url, events, active, created_at, updated_at, (xmax = 0) AS created
"""

_COLUMNS = "id, url, events, active, created_at, updated_at"

_FETCH_ROWS = f"""
SELECT xid AS ticket, id, product_id, warehouse_id, kind, quantity, reserved, version,
       created_at, reservation_id
FROM movements
WHERE (xid, id) > ($1::xid8, $2::bigint) AND xid < {_TAIL}
ORDER BY xid, id
LIMIT $3
"""

_ENQUEUE = """
INSERT INTO webhook_events (webhook_id, event_id, type, products, body, created_at)
SELECT $1, e.event_id, e.type, string_to_array(e.products, ' '), e.body, e.created_at
FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bytea[], $6::timestamptz[])
     WITH ORDINALITY AS e (event_id, type, products, body, created_at, n)
ORDER BY e.n
ON CONFLICT (webhook_id, event_id) DO NOTHING
RETURNING seq, event_id
"""

_PENDING = """
SELECT seq, event_id, type, products, body, created_at, attempts, first_attempt_at,
       next_attempt_at
FROM webhook_events WHERE webhook_id = $1 ORDER BY seq LIMIT $2
"""

_LOG = """
INSERT INTO webhook_deliveries
    (webhook_id, event_id, type, attempt, status_code, error, next_retry_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""


@dataclass(frozen=True, slots=True)
class LedgerRow(StockChange):
    """One committed ``movements`` row: a stock change and the reservation it belongs to.

    Here ``ticket`` is the writing transaction's id (``movements.xid``): the webhook
    cursor is ``(xid, id)``, read only below the oldest running transaction.
    """

    reservation_id: UUID | None


@dataclass(frozen=True, slots=True)
class Event:
    """An event ready to queue: ``body`` is the exact JSON every attempt sends (made by
    :func:`inventory.service.webhooks.events.make_event`)."""

    event_id: UUID
    type: str
    products: tuple[str, ...]
    created_at: datetime
    position: tuple[int, int]
    body: bytes


@dataclass(frozen=True, slots=True)
class Webhook:
    """A registration as the API shows it (never with its secret)."""

    id: str
    url: str
    events: tuple[str, ...]
    active: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    """One attempt in the delivery log."""

    id: int
    event_id: UUID
    type: str
    attempt: int
    status_code: int | None
    error: str | None
    at: datetime
    next_retry_at: datetime | None


@dataclass(slots=True)
class QueuedEvent:
    """An event in a webhook's queue, with its retry state (mutable, deliverer-owned)."""

    seq: int
    event_id: UUID
    type: str
    products: tuple[str, ...]
    body: bytes
    created_at: datetime
    attempts: int
    first_attempt_at: datetime | None
    next_attempt_at: datetime


def _webhook(row: asyncpg.Record) -> Webhook:
    return Webhook(
        row["id"], row["url"], tuple(row["events"]), row["active"], row["created_at"],
        row["updated_at"],
    )  # fmt: skip


def _queued(row: asyncpg.Record) -> QueuedEvent:
    return QueuedEvent(
        row["seq"], row["event_id"], row["type"], tuple(row["products"]), row["body"],
        row["created_at"], row["attempts"], row["first_attempt_at"], row["next_attempt_at"],
    )  # fmt: skip


class WebhookStore:
    """Webhook queries on a pool; every asyncpg error leaves as a domain error."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # --- registration (API) ----------------------------------------------------------

    async def put(
        self, webhook_id: str, url: str, events: Sequence[str], secret: str, active: bool
    ) -> tuple[Webhook, bool]:
        with _translated():
            row = await self.pool.fetchrow(
                _PUT, webhook_id, url, list(events), secret, active, timeout=_TIMEOUT
            )
        assert row is not None
        return _webhook(row), bool(row["created"])

    async def get(self, webhook_id: str) -> Webhook:
        with _translated():
            row = await self.pool.fetchrow(
                f"SELECT {_COLUMNS} FROM webhooks WHERE id = $1", webhook_id, timeout=_TIMEOUT
            )
        if row is None:
            raise NotFound(f"webhook {webhook_id} not found", {"webhook_id": webhook_id})
        return _webhook(row)

    async def list_all(self) -> list[Webhook]:
        with _translated():
            rows = await self.pool.fetch(
                f"SELECT {_COLUMNS} FROM webhooks ORDER BY id", timeout=_TIMEOUT
            )
        return [_webhook(r) for r in rows]

    async def delete(self, webhook_id: str) -> None:
        with _translated():
            done = await self.pool.fetchval(
                "DELETE FROM webhooks WHERE id = $1 RETURNING true", webhook_id, timeout=_TIMEOUT
            )
        if not done:
            raise NotFound(f"webhook {webhook_id} not found", {"webhook_id": webhook_id})

    async def deliveries(self, webhook_id: str, after: int | None, limit: int) -> list[Delivery]:
        """Newest first; ``after`` is the last id of the previous page."""
        await self.get(webhook_id)
        with _translated():
            rows = await self.pool.fetch(
                """SELECT id, event_id, type, attempt, status_code, error, at, next_retry_at
                   FROM webhook_deliveries
                   WHERE webhook_id = $1 AND ($2::bigint IS NULL OR id < $2)
                   ORDER BY id DESC LIMIT $3""",
                webhook_id, after, limit, timeout=_TIMEOUT,
            )  # fmt: skip
        return [Delivery(**dict(r)) for r in rows]

    # --- the deliverer ---------------------------------------------------------------

    async def active_ids(self) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT id FROM webhooks WHERE active ORDER BY id", timeout=_TIMEOUT
        )
        return [r["id"] for r in rows]

    async def config(self, webhook_id: str) -> dict[str, Any] | None:
        """URL, events, secret and active flag (for the deliverer only; None if gone)."""
        row = await self.pool.fetchrow(
            "SELECT url, events, secret, active, updated_at FROM webhooks WHERE id = $1",
            webhook_id,
            timeout=_TIMEOUT,
        )
        return None if row is None else dict(row)

    async def cursor(
        self, conn: Conn, webhook_id: str, *, lock: bool = False
    ) -> tuple[int, int] | None:
        """The webhook's ledger position (None when it is gone or inactive); ``lock``
        holds its row until the transaction ends (only to move it: a lock assigns a
        transaction id, which an idle poll should not cost)."""
        row = await conn.fetchrow(
            "SELECT cursor_xid, cursor_id FROM webhooks WHERE id = $1 AND active"
            + (" FOR UPDATE" if lock else ""),
            webhook_id,
            timeout=_TIMEOUT,
        )
        return None if row is None else (int(row["cursor_xid"]), row["cursor_id"])

    async def ledger_rows(self, conn: Conn, cursor: tuple[int, int], limit: int) -> list[LedgerRow]:
        """Final ledger rows after ``cursor``, whole transactions only when there are
        more (a transaction cut in two could split a reservation's rows)."""
        rows = await conn.fetch(_FETCH_ROWS, *cursor, limit, timeout=_TIMEOUT)
        found = [LedgerRow(**dict(r)) for r in rows]
        if len(found) == limit and found[0].ticket != found[-1].ticket:
            last = found[-1].ticket
            found = [r for r in found if r.ticket != last]
        return found

    async def enqueue(
        self, conn: Conn, webhook_id: str, events: Sequence[Event], cursor: tuple[int, int]
    ) -> dict[UUID, int]:
        """Queue ``events`` and move the cursor (inside the caller's transaction);
        returns the queue ``seq`` of each newly queued event id."""
        queued: dict[UUID, int] = {}
        if events:
            rows = await conn.fetch(
                _ENQUEUE,
                webhook_id,
                [e.event_id for e in events],
                [e.type for e in events],
                [" ".join(e.products) for e in events],
                [e.body for e in events],
                [e.created_at for e in events],
                timeout=_TIMEOUT,
            )
            queued = {r["event_id"]: r["seq"] for r in rows}
        await conn.execute(
            "UPDATE webhooks SET cursor_xid = $2::xid8, cursor_id = $3 WHERE id = $1",
            webhook_id,
            *cursor,
            timeout=_TIMEOUT,
        )
        return queued

    async def pending(self, webhook_id: str, limit: int) -> list[QueuedEvent]:
        rows = await self.pool.fetch(_PENDING, webhook_id, limit, timeout=_TIMEOUT)
        return [_queued(r) for r in rows]

    async def acknowledge(
        self, webhook_id: str, event: QueuedEvent, attempt: int, status_code: int
    ) -> None:
        """A 2xx: the event leaves the queue, the attempt enters the log."""
        async with self.pool.acquire(timeout=_TIMEOUT) as conn, conn.transaction():
            await conn.execute(
                "DELETE FROM webhook_events WHERE webhook_id = $1 AND seq = $2",
                webhook_id, event.seq, timeout=_TIMEOUT,
            )  # fmt: skip
            await conn.execute(
                _LOG, webhook_id, event.event_id, event.type, attempt, status_code, None, None,
                timeout=_TIMEOUT,
            )  # fmt: skip

    async def failed_attempt(
        self,
        webhook_id: str,
        event: QueuedEvent,
        status_code: int | None,
        error: str | None,
        give_up: bool,
    ) -> None:
        """A failed attempt: reschedule the event (``event`` holds the new state) or,
        past the retry window, drop it from the queue; log the attempt either way."""
        async with self.pool.acquire(timeout=_TIMEOUT) as conn, conn.transaction():
            if give_up:
                await conn.execute(
                    "DELETE FROM webhook_events WHERE webhook_id = $1 AND seq = $2",
                    webhook_id, event.seq, timeout=_TIMEOUT,
                )  # fmt: skip
            else:
                await conn.execute(
                    """UPDATE webhook_events SET attempts = $3, first_attempt_at = $4,
                           next_attempt_at = $5
                       WHERE webhook_id = $1 AND seq = $2""",
                    webhook_id, event.seq, event.attempts, event.first_attempt_at,
                    event.next_attempt_at, timeout=_TIMEOUT,
                )  # fmt: skip
            await conn.execute(
                _LOG, webhook_id, event.event_id, event.type, event.attempts, status_code,
                error, None if give_up else event.next_attempt_at, timeout=_TIMEOUT,
            )  # fmt: skip

    async def purge_log(self, older_than_days: int) -> int:
        result: str = await self.pool.execute(
            "DELETE FROM webhook_deliveries WHERE at < now() - make_interval(days => $1)",
            older_than_days,
            timeout=_TIMEOUT,
        )
        return int(result.split()[-1])
