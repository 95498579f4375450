"""The fair waitlist (SPEC "Flash-sale protections"): entries, offers and the offerer.

Policy:

- Per product, entries are served strictly in ``seq`` order: an entry's offer may only
  take what lies beyond the units of the entries still waiting before it, so nobody is
  served from stock an earlier entry needs; the entries behind a head that does not fit
  wait for it.
- An offer is a reservation made by the reservation engine like any other (so safety
  stock, the purchase limit and combining apply), flagged with the entry: the engine's
  batch locks the entry, checks it still waits, lets it take what lies beyond the entries
  before it (new reservations only take what lies beyond all waiting units) and marks
  it ``offered`` in the same transaction as the reservation.
- The offerer (:class:`Offerer`, one loop per process) looks for the entries, from each
  head on, that ``reservable`` can now hold, and offers each product's together (one
  batch) in a task of the product's own, which the loop does not wait for: an offer
  whose stock row is locked by another session waits (up to the database timeout) and
  delays only its product's queue, not the offers of other products. One task per
  product at a time; a product whose task still runs is left to it. The loop is woken by
  this process's stock changes, and polls every ``interval`` seconds for changes made
  elsewhere (another process, an expiry, a server that was down). Several processes may
  try the same entry at once: the engine's row and entry locks let exactly one succeed,
  the others get ``not_waiting`` (or a shortage) and move on, so no lease is needed for
  correctness, only the poll's cost (one indexed query) per process.
- An entry whose offer would break the customer's purchase limit is ``cancelled`` (it
  could never be served, and would block everyone behind it).
- A join tries the product's offers at once (unless the engine saw the product sold out
  in the last ``sold_out_ttl``: a flash sale's joins then cost no offer pass, and stock
  returned meanwhile by another process is the offerer's, within its poll), so an entry
  that fits when nobody waits is answered ``offered``, but waits at most
  ``JOIN_OFFER_WAIT`` (0.5 s) for stock rows another transaction holds: then it answers
  the entry as it stands (``waiting``) and leaves the offer to the offerer, which waits
  for the rows in its product's task. A join never waits for a lock up to the database
  timeout, and never answers 503 for an entry it has written.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from msgspec import Struct, structs

from realtime.tasks import cancel_and_wait

from ..domain.commerce import AlreadyWaiting, IsKit, PurchaseLimitExceeded
from ..domain.model import (
    Contention,
    IdempotencyKeyReused,
    InsufficientStock,
    InvalidState,
    InventoryError,
    NotFound,
    RequestedLine,
    Unavailable,
)
from ..store.db import Conn, _translated
from ..store.pg import Store
from ..store.webhooks import Event, LedgerRow
from .engine import ReserveRequest
from .inventory import InventoryService
from .webhooks.events import ProduceContext, make_event, register_producer

__all__ = [
    "JOIN_OFFER_WAIT",
    "Entry",
    "JoinRequest",
    "Offerer",
    "Waitlist",
    "WaitlistEntryOut",
    "entry_body",
    "install",
]

log = logging.getLogger("inventory.waitlist")

#: Seconds a join waits for rows held elsewhere when it tries the offers (module doc).
JOIN_OFFER_WAIT = 0.5

# A join: the rules read and the entry inserted only if they all hold, in one statement.
# $1 product, $2 warehouse, $3 customer, $4 id, $5 quantity, $6 hold seconds,
# $7-$9 the Idempotency-Key's scope, key and body hash (or nulls).
_JOIN = """
WITH v AS (
    SELECT EXISTS (SELECT 1 FROM stock_levels WHERE product_id = $1) AS has_rows,
           p.product_id IS NOT NULL AS has_settings,
           p.components IS NOT NULL AS is_kit, p.max_per_customer,
           $2::text IS NULL OR EXISTS (SELECT 1 FROM warehouses WHERE id = $2) AS warehouse_ok,
           CASE WHEN p.max_per_customer IS NOT NULL THEN (
               SELECT coalesce(sum(l.quantity), 0)::bigint
               FROM reservations r JOIN reservation_lines l ON l.reservation_id = r.id
               WHERE r.customer_id = $3 AND l.product_id = $1
                 AND (r.status = 'committed'
                      OR (r.status = 'active' AND r.expires_at > clock_timestamp())))
           END AS held
    FROM (SELECT 1) one LEFT JOIN products p ON p.product_id = $1
), ins AS (
    INSERT INTO waitlist (id, product_id, customer_id, quantity, hold_seconds, warehouse_id,
                          status, idem_scope, idem_key, body_hash)
    SELECT $4, $1, $3, $5, $6, $2, 'waiting', $7, $8, $9 FROM v
    WHERE (v.has_rows OR v.has_settings) AND v.warehouse_ok AND NOT v.is_kit
      AND (v.max_per_customer IS NULL OR v.held + $5 <= v.max_per_customer)
    RETURNING id, seq, created_at
)
SELECT v.*, ins.id IS NOT NULL AS inserted, ins.seq, ins.created_at,
       CASE WHEN ins.id IS NOT NULL THEN (
           SELECT count(*) + 1 FROM waitlist e WHERE e.product_id = $1 AND e.status = 'waiting')
       END AS position
FROM v LEFT JOIN ins ON true
"""

_COLS = """w.id, w.product_id, w.customer_id, w.quantity, w.status, w.reservation_id,
           w.created_at, w.seq, w.idem_scope, w.body_hash,
           CASE WHEN w.status = 'waiting' THEN (
               SELECT count(*) FROM waitlist e WHERE e.product_id = w.product_id
               AND e.status = 'waiting' AND e.seq <= w.seq) END AS position"""


class WaitlistEntryOut(Struct, frozen=True):
    """A waitlist entry as clients see it: HTTP answers and ``waitlist.offered`` events."""

    id: UUID
    product_id: str
    customer_id: str
    quantity: int
    status: str
    position: int | None
    reservation_id: UUID | None
    created_at: datetime


class Entry(WaitlistEntryOut, frozen=True):
    """A stored entry: what clients see and its place in the queue (the page cursor)."""

    seq: int

    def out(self) -> WaitlistEntryOut:
        """The client's view (without the queue sequence number)."""
        return WaitlistEntryOut(**{f: getattr(self, f) for f in WaitlistEntryOut.__struct_fields__})


def _entry(r: Any) -> Entry:
    return Entry(
        r["id"], r["product_id"], r["customer_id"], r["quantity"], r["status"], r["position"],
        r["reservation_id"], r["created_at"], r["seq"],
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class JoinRequest:
    product_id: str
    customer_id: str
    quantity: int
    hold_seconds: int = 900
    warehouse_id: str | None = None
    # (scope, key, body hash) of an Idempotency-Key, or None
    idempotency: tuple[str, str, bytes] | None = None


class Waitlist:
    """Waitlist use cases over the PostgreSQL store and the service's reservation engine."""

    def __init__(self, service: InventoryService, store: Store) -> None:
        self.service = service
        self.store = store

    async def join(self, req: JoinRequest) -> tuple[Entry, bool]:
        """Queue an entry (offered at once when its quantity is reservable and nobody
        waits, unless the product's rows are held elsewhere for longer than
        ``JOIN_OFFER_WAIT``: then it answers ``waiting`` and the offerer makes the offer);
        returns it and whether it is a replay of an earlier ``Idempotency-Key``.

        Errors: unknown product or warehouse -> 404; a kit -> 409 ``is_kit``; a second
        waiting entry -> 409 ``already_waiting``; more than ``max_per_customer`` -> 409
        ``purchase_limit_exceeded``; a key reused with another body -> 422.
        """
        entry_id = uuid.uuid4()
        with _translated():
            if req.idempotency is None:  # one statement, no transaction
                async with self.store.connection() as conn:
                    entry = await self._insert(conn, entry_id, req)
            else:
                async with self.store.transaction() as conn:
                    found = await self._by_key(conn, req.idempotency)
                    if found is not None:
                        return found, True
                    entry = await self._insert(conn, entry_id, req)
        if self.service.engine.sold_out(req.product_id):
            return entry, False
        try:
            await self.offer_heads(req.product_id, wait=JOIN_OFFER_WAIT)
        except (Contention, Unavailable):  # rows held elsewhere: the offerer goes on
            self.service.on_change()
        return await self.get(entry_id), False

    async def _by_key(self, conn: Conn, idem: tuple[str, str, bytes]) -> Entry | None:
        row = await conn.fetchrow(
            f"SELECT {_COLS} FROM waitlist w WHERE idem_scope = $1 AND idem_key = $2",
            idem[0],
            idem[1],
        )
        if row is None:
            return None
        if bytes(row["body_hash"]) != idem[2]:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with a different body", {"key": idem[1]}
            )
        return _entry(row)

    async def _insert(self, conn: Conn, entry_id: UUID, req: JoinRequest) -> Entry:
        """Validate and insert the entry in one statement; raise the first rule it breaks
        (product, warehouse, kit, purchase limit, then a second waiting entry). The entry's
        position counts the waiting entries its statement saw."""
        try:
            row = await conn.fetchrow(
                _JOIN, req.product_id, req.warehouse_id, req.customer_id, entry_id,
                req.quantity, req.hold_seconds, *(req.idempotency or (None, None, None)),
            )  # fmt: skip
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == "waitlist_one_waiting":
                raise AlreadyWaiting(
                    f"{req.customer_id} already waits for {req.product_id}",
                    {"product_id": req.product_id, "customer_id": req.customer_id},
                ) from None
            raise  # a racing request with the same key: the retry replays it
        assert row is not None
        if row["inserted"]:
            return Entry(
                entry_id, req.product_id, req.customer_id, req.quantity, "waiting",
                row["position"], None, row["created_at"], row["seq"],
            )  # fmt: skip
        if not row["has_rows"] and not row["has_settings"]:
            raise NotFound(f"product {req.product_id} not found", {"product_id": req.product_id})
        if not row["warehouse_ok"]:
            raise NotFound(
                f"warehouse {req.warehouse_id} not found", {"warehouse_id": req.warehouse_id}
            )
        if row["is_kit"]:
            raise IsKit(
                f"{req.product_id} is a kit; wait for its components",
                {"product_id": req.product_id},
            )
        limit, held = row["max_per_customer"], row["held"]
        raise PurchaseLimitExceeded(
            f"customer {req.customer_id} may hold at most {limit} of {req.product_id}",
            {"product_id": req.product_id, "limit": limit, "held": held},
        )

    async def get(self, entry_id: UUID) -> Entry:
        with _translated():
            async with self.store.connection() as conn:
                row = await conn.fetchrow(f"SELECT {_COLS} FROM waitlist w WHERE id = $1", entry_id)
        if row is None:
            raise NotFound(f"waitlist entry {entry_id} not found", {"id": str(entry_id)})
        return _entry(row)

    async def cancel(self, entry_id: UUID) -> Entry:
        """``waiting`` -> ``cancelled``; an entry already offered or cancelled -> 409."""
        with _translated():
            async with self.store.transaction() as conn:
                status = await conn.fetchval(
                    "SELECT status FROM waitlist WHERE id = $1 FOR UPDATE", entry_id
                )
                if status is None:
                    raise NotFound(f"waitlist entry {entry_id} not found", {"id": str(entry_id)})
                if status != "waiting":
                    raise InvalidState(
                        f"waitlist entry is {status}, cannot be cancelled", {"status": status}
                    )
                await conn.execute(
                    "UPDATE waitlist SET status = 'cancelled', updated_at = now() WHERE id = $1",
                    entry_id,
                )
        self.service.on_change()  # the queue's claim shrank: the next head may fit now
        return await self.get(entry_id)

    async def waiting(self, product_id: str, after: int, limit: int) -> list[Entry]:
        """The product's waiting entries in queue order, after queue ``seq`` ``after``."""
        with _translated():
            async with self.store.connection() as conn:
                rows = await conn.fetch(
                    f"""SELECT {_COLS} FROM waitlist w
                        WHERE product_id = $1 AND status = 'waiting' AND seq > $2
                        ORDER BY seq LIMIT $3""",
                    product_id,
                    after,
                    limit,
                )
        return [_entry(r) for r in rows]

    async def lengths(self, product_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """``(entries, units)`` waiting per product, for those of ``product_ids`` whose
        queue is not empty."""
        with _translated():
            async with self.store.connection() as conn:
                rows = await conn.fetch(
                    """SELECT product_id, count(*) AS entries, sum(quantity)::bigint AS units
                       FROM waitlist WHERE status = 'waiting' AND product_id = ANY($1::text[])
                       GROUP BY product_id""",
                    list(product_ids),
                )
        return {r["product_id"]: (r["entries"], r["units"]) for r in rows}

    async def offerable(self, product_id: str | None = None) -> list[dict[str, Any]]:
        """Entries ``reservable`` can serve now, from the head of each queue on (all
        products, or one), in queue order."""
        with _translated():
            async with self.store.connection() as conn:
                rows = await conn.fetch(_OFFERABLE, product_id)
        return [dict(r) for r in rows]

    async def offer_heads(self, product_id: str, *, wait: float | None = None) -> int:
        """Offer every entry of the product's queue that fits, from the head on,
        repeating while offers are made; returns how many entries moved (offered or
        cancelled). ``wait``: how long each offer waits for rows held elsewhere (the
        engine's bound by default) before 503 ``contention``.

        The offers of one pass are submitted together in queue order, so the engine
        combines them into one batch; each may only take what lies beyond the entries
        still waiting before it, so the queue order holds whatever the batching does.
        """
        moved = 0
        while entries := await self.offerable(product_id):
            done = await asyncio.gather(*(self._offer(e, wait) for e in entries))
            moved += sum(done)
            if not any(done):
                break
        return moved

    async def _offer(self, entry: dict[str, Any], wait: float | None) -> int:
        """Try one entry's offer; 1 when the queue moved (offered, or cancelled because
        its customer's limit can never let it be served), else 0."""
        request = ReserveRequest(
            (RequestedLine(entry["product_id"], entry["quantity"], entry["warehouse_id"]),),
            entry["hold_seconds"],
            f"waitlist:{entry['id']}",
            customer_id=entry["customer_id"],
            offer=entry["id"],
        )
        try:
            await self.service.engine.reserve(request, wait=wait)
        except PurchaseLimitExceeded:
            await self._cancel_if_waiting(entry["id"])
            return 1
        except (InsufficientStock, InvalidState, NotFound):
            return 0  # taken meanwhile, behind one that did not fit, or offered elsewhere
        return 1

    async def _cancel_if_waiting(self, entry_id: UUID) -> None:
        with _translated():
            async with self.store.transaction() as conn:
                await conn.execute(
                    """UPDATE waitlist SET status = 'cancelled', updated_at = now()
                       WHERE id = $1 AND status = 'waiting'""",
                    entry_id,
                )


# Per product, the waiting entries (queue order, at most 500) whose quantities, added up
# from the head, fit in reservable; a pinned head also needs its warehouse to hold it.
_OFFERABLE = """
WITH q AS (
    SELECT id, product_id, customer_id, quantity, hold_seconds, warehouse_id, seq,
           sum(quantity) OVER (PARTITION BY product_id ORDER BY seq) AS upto,
           row_number() OVER (PARTITION BY product_id ORDER BY seq) AS n
    FROM waitlist WHERE status = 'waiting' AND ($1::text IS NULL OR product_id = $1))
SELECT q.id, q.product_id, q.customer_id, q.quantity, q.hold_seconds, q.warehouse_id
FROM q
LEFT JOIN products p ON p.product_id = q.product_id,
LATERAL (SELECT coalesce(sum(s.quantity - s.reserved), 0) AS available,
                coalesce(sum(s.quantity - s.reserved)
                         FILTER (WHERE s.warehouse_id = q.warehouse_id), 0) AS pinned
         FROM stock_levels s JOIN warehouses x ON x.id = s.warehouse_id
         WHERE s.product_id = q.product_id AND x.status = 'active') a
WHERE q.n <= 500 AND a.available - coalesce(p.safety_stock, 0) >= q.upto
  AND (q.warehouse_id IS NULL OR a.pinned >= q.quantity)
ORDER BY q.product_id, q.seq
"""


class Offerer:
    """This process's offer loop: woken by local stock changes, polling for the rest;
    each product's offers run in a task of their own (see the module docstring)."""

    def __init__(self, waitlist: Waitlist, interval: float = 0.2) -> None:
        self.waitlist = waitlist
        self.interval = interval
        self._wake = asyncio.Event()
        self._offering: dict[str, asyncio.Task[None]] = {}  # product -> its offers

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                try:
                    self._start_offers(await self.waitlist.offerable())
                except (Unavailable, InventoryError):
                    pass  # the database is away or busy: the next pass tries again
                except Exception:  # never let one bad pass end the offers in this process
                    log.exception("waitlist offer pass failed; retrying")
                try:
                    async with asyncio.timeout(self.interval):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            await cancel_and_wait(*self._offering.values())

    def _start_offers(self, entries: Sequence[dict[str, Any]]) -> None:
        """Start offering the queue of each product with entries that fit, unless its
        previous offers still run; returns at once."""
        for product_id in dict.fromkeys(e["product_id"] for e in entries):
            if product_id not in self._offering:
                self._offering[product_id] = asyncio.create_task(
                    self._offer_product(product_id), name="waitlist-offers"
                )

    async def _offer_product(self, product_id: str) -> None:
        try:
            await self.waitlist.offer_heads(product_id)
        except (Unavailable, InventoryError):
            pass  # busy (a row locked past the bound) or away: a later pass tries again
        except Exception:
            log.exception("waitlist offers for %s failed; retrying", product_id)
        finally:
            del self._offering[product_id]


async def _offered_events(ctx: ProduceContext, rows: Sequence[LedgerRow]) -> list[Event]:
    """``waitlist.offered``: one event per entry whose offer reservation a row records."""
    first: dict[UUID, LedgerRow] = {}
    for row in rows:
        if row.kind == "reserved" and row.reservation_id is not None:
            first.setdefault(row.reservation_id, row)
    if not first:
        return []
    found = await ctx.conn.fetch(
        f"SELECT {_COLS} FROM waitlist w WHERE reservation_id = ANY($1::uuid[])", list(first)
    )
    events = []
    for r in found:
        entry, row = _entry(r), first[r["reservation_id"]]
        events.append(
            make_event(
                "waitlist.offered", entry.id, [entry.product_id], row.created_at, row.position,
                entry_body(entry),
            )
        )  # fmt: skip
    return events


def entry_body(entry: Entry) -> dict[str, Any]:
    """The entry as the API shows it."""
    return structs.asdict(entry.out())


def install() -> None:
    """Register the ``waitlist.offered`` webhook producer."""
    register_producer("waitlist.offered", _offered_events)
