"""The reservation engine: every reservation, one line or many, goes through here.

One path claims idempotency keys, validates, allocates (:func:`~inventory.domain.model.allocate`),
builds the reservations and writes their lines and ledger rows. Requests are combined: a
request joins the :class:`~inventory.service.combining.Combiner` *lane* of its first product (a
product always maps to the same one of ``lanes`` lanes), and a batch is whatever arrived
while the lane's previous batch was in flight. A batch is one transaction:

1. lock the stock rows of every product in the batch, in (product, warehouse) order,
   ``FOR UPDATE SKIP LOCKED``: the batch never waits for a row;
2. members needing a row that was busy (held by another transaction: an operator's
   session, another process's batch) leave the batch (see *Isolation*);
3. claim the remaining members' idempotency keys (one statement, key order), answer
   replays and repeats within the batch;
4. allocate the members one after another, in arrival order, against the batch's running
   state (:class:`BatchState`): several lines of one product draw on one running balance,
   and each reservation adds one ledger row per stock row it touches. The state also
   holds the flash-sale rules read under the row locks (:mod:`inventory.domain.commerce`):
   safety stock, the waiting units of each product's waitlist, each customer's held units
   of limited products (running, so a combined batch counts its own earlier members) and
   the waitlist entries being offered (locked; marked ``offered`` in the same write);
5. write every reservation, line and ledger row with one statement that updates each
   touched row once (version-checked against the locked state, a row's version moving by
   the number of reservations that touched it), then store the keyed answers.

``expires_at`` and ``created_at`` are taken from ``clock_timestamp()`` in the write
statement, when the row locks are held, so an ``active`` answer has its full TTL ahead
even when the transaction started long before (``now()`` is the transaction's start).

Isolation: a member whose rows were busy is retried on its own, in a *waiting* batch
keyed by the member's product set (so requests for one busy product still combine with
each other). A waiting batch first locks the rows of the products found busy, waiting
(``lock_timeout`` set to what is left of the members' bound, ``wait_bound``, i.e.
``INVENTORY_DB_TIMEOUT``) while holding nothing else, then the rest like a lane batch
(members that find another row busy go round again). When the bound runs out the answer
is 503 ``contention`` with ``Retry-After``. While a product has requests on the waiting
path in this process, or was found busy in the last ``CONTENDED_TTL`` seconds (a hot
product that the batches of several processes take turns on), new requests for it go
straight there instead of costing a lane batch a try. Waiting batches are capped
(``wait_slots``) so that they cannot take every pooled connection from the lanes.

Deadlock freedom: lane batches never wait for a row; waiting batches wait for rows only
in (product, warehouse) order, holding no other row and no key; keys are claimed in key
order and after the rows. So no cycle of waits can form (the lock strategy's Redis locks are
taken in sorted order too). With the ``lock`` strategy a waiting batch holds the Redis
locks only for slices of ``WAIT_SLICE`` seconds, so a lane batch that needs one of those
locks waits at most that long.

Sold-out refusal: after a batch leaves a product with nothing reservable, unpinned
single-line requests are refused from memory for ``sold_out_ttl`` seconds (default
0.2 s) instead of queueing behind the database. A request with an ``Idempotency-Key``
has its 409 stored under the key (or the key's first answer found) by a batch of such
refusals (one autocommit statement, no row lock) instead of taking a place in the
product's batches, where a flash sale's retrying clients would queue behind each other
at several round trips per batch. A restock or release through this process clears the
memory at once; one through another process is seen after at most ``sold_out_ttl``. A
refusal is never an oversell.

:class:`BatchState` is the batch's running state (rows as allocated so far, the planned
reservations and their ledger rows): per-batch rules (safety stock, per-customer totals,
waitlist claims, kit expansion) extend it, not the transaction code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Final
from uuid import UUID

from .. import metrics
from ..domain.commerce import (
    CustomerRequired,
    KitComponent,
    ProductRules,
    PurchaseLimitExceeded,
    active_available,
    expand_kits,
)
from ..domain.model import (
    Contention,
    IdempotencyKeyReused,
    InsufficientStock,
    InvalidState,
    InventoryError,
    Movement,
    NotFound,
    RequestedLine,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockLevel,
    Warehouse,
    allocate,
)
from ..store.port import IdempotencyRecord, InventoryStore, RowsBusy, Tx, VersionMiss
from .combining import Combiner
from .idempotency import Idempotency, Replay, replay_stored

__all__ = [
    "CONTENDED_TTL",
    "WAIT_SLICE",
    "BatchState",
    "LockFactory",
    "PlannedReservation",
    "ReservationEngine",
    "ReserveRequest",
    "lane_of",
]

#: With Redis product locks, the longest a waiting batch holds them per attempt (seconds).
WAIT_SLICE: Final = 0.1
#: How long a product found busy by a lane batch sends its requests to the waiting path.
CONTENDED_TTL: Final = 0.5
#: How long the engine trusts its memory of a product's kit components and purchase limit
#: (used before a batch: expanding kit lines, refusing lines without a customer early).
SETTINGS_TTL: Final = 1.0
#: Batches of keyed sold-out refusals stored at once (by key hash), each on one connection.
REFUSAL_SHARDS: Final = 4

LockFactory = Callable[[Sequence[str]], contextlib.AbstractAsyncContextManager[Any]]


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """One reservation request (any number of lines) waiting for its batch."""

    lines: tuple[RequestedLine, ...]
    ttl_seconds: int
    reference: str | None
    idempotency: Idempotency | None = None
    customer_id: str | None = None
    offer: UUID | None = None  # the waitlist entry this reservation is the offer for
    products: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "products", tuple(sorted({x.product_id for x in self.lines})))


@dataclass(frozen=True, slots=True)
class _Member:
    request: ReserveRequest
    deadline: float  # time.monotonic() after which a busy row means 503
    busy: frozenset[str] = frozenset()  # products found busy last time: wait for these


@dataclass(frozen=True, slots=True)
class _Busy:
    """A member's rows were held by another transaction: retry it on its own."""

    products: frozenset[str]


Outcome = Reservation | Replay | InventoryError
#: A refusal to store under its key: scope, key, body hash, status, rendered body.
_Refusal = tuple[str, str, bytes, int, bytes]
MemberOutcome = Outcome | _Busy


@dataclass(frozen=True, slots=True)
class PlannedReservation:
    """A reservation allocated in a batch, written when the batch commits."""

    index: int  # the member it answers
    id: UUID
    lines: tuple[ReservationLine, ...]


class BatchState:
    """The running state of one batch: the locked rows as allocated so far, the planned
    reservations and their ledger rows.

    Members are applied one after another (:meth:`reserve`); each sees what the earlier
    ones took. Nothing here does I/O: the transaction code locks, calls :meth:`reserve`
    per member and writes :meth:`changed_rows`, :attr:`movements` and :attr:`planned`.
    """

    def __init__(
        self,
        levels: Iterable[StockLevel],
        warehouses: dict[str, Warehouse],
        rules: dict[str, ProductRules] | None = None,
        held: dict[tuple[str, str], int] | None = None,
        offers: dict[UUID, tuple[int, int]] | None = None,
    ) -> None:
        self.locked: list[StockLevel] = sorted(
            levels, key=lambda lv: (lv.product_id, lv.warehouse_id)
        )
        self.rows: dict[str, dict[str, StockLevel]] = {}  # product -> warehouse -> now
        for lv in self.locked:
            self.rows.setdefault(lv.product_id, {})[lv.warehouse_id] = lv
        self.warehouses = warehouses
        self.movements: list[Movement] = []
        self.planned: list[PlannedReservation] = []
        # Product rules (safety stock, limit, waiting units) and each (customer, product)'s
        # held units, both running: an offer takes its entry out of ``waiting``, a planned
        # reservation adds to ``held``.
        self.rules = dict(rules or {})
        self.held = dict(held or {})
        # Waitlist entries offered in this batch: entry -> (queue seq, units waiting before
        # it when locked); and the offers planned so far: (product, seq, units).
        self.offers = offers or {}
        self._offered: list[tuple[str, int, int]] = []

    def reserve(self, index: int, request: ReserveRequest) -> PlannedReservation:
        """Allocate ``request`` from what is left; raises the member's
        :class:`~inventory.domain.model.InventoryError` (404, 409) and changes nothing then."""
        lines = request.lines
        wanted: dict[str, int] = {}
        for x in lines:
            wanted[x.product_id] = wanted.get(x.product_id, 0) + x.quantity
        limited = {p: r.max_per_customer for p, r in self._rules_of(wanted) if r.max_per_customer}
        if limited and request.customer_id is None:
            raise _customer_required(next(iter(limited)))
        missing = [p for p in wanted if p not in self.rows]
        if missing:
            raise NotFound(f"product {missing[0]} has no stock", {"product_ids": missing})
        pinned = {x.warehouse_id for x in lines if x.warehouse_id is not None}
        unknown = sorted(pinned - self.warehouses.keys())
        if unknown:
            raise NotFound(f"warehouse {unknown[0]} not found", {"warehouse_id": unknown[0]})
        for product_id, limit in limited.items():
            assert request.customer_id is not None
            held = self.held.get((request.customer_id, product_id), 0)
            if held + wanted[product_id] > limit:
                raise PurchaseLimitExceeded(
                    f"customer {request.customer_id} may hold at most {limit} of {product_id}",
                    {"product_id": product_id, "limit": limit, "held": held},
                )
        levels = [lv for p in request.products for lv in self.rows[p].values()]
        try:
            allocation = allocate(lines, levels, self.warehouses)
        except InsufficientStock:
            self._check_claims(wanted, request.offer)
            raise
        self._check_claims(wanted, request.offer)
        reservation_id = uuid.uuid4()
        for (product_id, warehouse_id), n in allocation.deltas().items():
            rows = self.rows[product_id]
            rows[warehouse_id], movement = rows[warehouse_id].reserve(n, reservation_id)
            self.movements.append(movement)
        planned = PlannedReservation(index, reservation_id, allocation.lines)
        self.planned.append(planned)
        if request.customer_id is not None:
            for product_id in limited:
                key = (request.customer_id, product_id)
                self.held[key] = self.held.get(key, 0) + wanted[product_id]
        if request.offer is not None:  # the entry leaves the queue it was waiting in
            seq = self.offers[request.offer][0]
            for product_id, n in wanted.items():
                rules = self.rules.get(product_id, _NO_RULES)
                self.rules[product_id] = replace(rules, waiting=max(0, rules.waiting - n))
                self._offered.append((product_id, seq, n))
        return planned

    def _check_claims(self, wanted: dict[str, int], offer: UUID | None) -> None:
        """Raise :class:`InsufficientStock` (``available``: what the request may take)
        when a product's units exceed what is reservable beyond safety stock and queue."""
        short = []
        for product_id, n in wanted.items():
            claimable = self.claimable(product_id, offer=offer)
            if n > claimable:
                short.append({"product_id": product_id, "requested": n, "available": claimable})
        if short:
            raise InsufficientStock("not enough stock for every line", short)

    def _rules_of(self, wanted: Iterable[str]) -> list[tuple[str, ProductRules]]:
        return [(p, self.rules.get(p, _NO_RULES)) for p in wanted]

    def claimable(self, product_id: str, offer: UUID | None = None) -> int:
        """What a new reservation may take of the product now: ``reservable`` after
        safety stock, less the waiting units; for the offer of waitlist entry ``offer``,
        less only the units still waiting before that entry."""
        rows = self.rows.get(product_id, {})
        rules = self.rules.get(product_id, _NO_RULES)
        available = active_available(rows.values(), self.warehouses)
        if offer is None:
            return rules.claimable(available)
        seq, ahead = self.offers[offer]
        served = sum(n for p, s, n in self._offered if p == product_id and s < seq)
        return rules.claimable(available, ahead=max(0, ahead - served))

    def changed_rows(self) -> list[tuple[StockLevel, StockLevel]]:
        """(locked state, state now) of every row the batch changed, in lock order."""
        now = ((lv, self.rows[lv.product_id][lv.warehouse_id]) for lv in self.locked)
        return [(before, after) for before, after in now if after is not before]

    def reservable(self, product_id: str) -> int | None:
        """Units a new reservation could still take of the product; None: no rows."""
        if not self.rows.get(product_id):
            return None
        return self.claimable(product_id)


class ReservationEngine:
    """The only writer of reservations, their lines and their ``reserved`` ledger rows."""

    def __init__(
        self,
        store: InventoryStore,
        *,
        lock_products: LockFactory | None = None,
        on_change: Callable[[], None] = lambda: None,
        sold_out_ttl: float = 0.2,
        max_batch: int = 256,
        lanes: int = 4,
        wait_bound: float = 5.0,
        wait_slots: int = 4,
    ) -> None:
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        self.store = store
        self._lanes = lanes
        self._lock_products = lock_products
        self._on_change = on_change
        self._sold_out_ttl = sold_out_ttl
        self._sold_out: dict[str, float] = {}
        self._wait_bound = wait_bound
        self._wait_slots = asyncio.Semaphore(wait_slots)
        self._waiting: dict[str, int] = {}  # product -> members on the waiting path
        # product -> (kit components, max_per_customer, trusted until (monotonic))
        self._settings: dict[str, tuple[tuple[KitComponent, ...] | None, int | None, float]] = {}
        self._round: asyncio.Future[None] | None = None  # the next read of misses
        self._queued: set[str] = set()  # the products it reads
        self._loader: asyncio.Task[None] | None = None
        self._contended: dict[str, float] = {}  # product -> found busy, until (monotonic)
        self.lanes: Combiner[int, _Member, MemberOutcome] = Combiner(
            self._run_lane, max_batch=max_batch
        )
        self.waiters: Combiner[tuple[str, ...], _Member, MemberOutcome] = Combiner(
            self._run_waiting, max_batch=max_batch
        )
        self.refusals: Combiner[int, _Refusal, IdempotencyRecord | None] = Combiner(
            self._store_refusals, max_batch=max_batch
        )

    async def close(self) -> None:
        """Stop the combining workers (at shutdown)."""
        await self.lanes.close()
        await self.waiters.close()
        await self.refusals.close()

    async def reserve(
        self, request: ReserveRequest, *, wait: float | None = None
    ) -> Reservation | Replay:
        """Reserve every line of ``request`` or none; raises the request's
        :class:`~inventory.domain.model.InventoryError`. ``wait``: how long rows held by
        other transactions are waited for before 503 ``contention`` (``wait_bound`` at
        most, and by default)."""
        request = await self._prepare(request)
        if (refusal := self._sold_out_refusal(request)) is not None:
            if request.idempotency is None:
                raise refusal
            return await self._refuse_keyed(request.idempotency, refusal)
        bound = self._wait_bound if wait is None else min(wait, self._wait_bound)
        deadline = time.monotonic() + bound
        waiting = frozenset(p for p in request.products if self._is_contended(p))
        if not waiting:
            lane = lane_of(request.products[0], self._lanes)
            outcome = await self.lanes.submit(lane, _Member(request, deadline))
            if not isinstance(outcome, _Busy):
                return _answer(outcome)
            waiting = outcome.products
        return await self._wait(_Member(request, deadline, waiting))

    def sold_out(self, product_id: str) -> bool:
        """Whether a batch of this process left the product with nothing reservable in
        the last ``sold_out_ttl`` seconds (and no change here since)."""
        until = self._sold_out.get(product_id)
        return until is not None and until > time.monotonic()

    def forget(self, product_id: str) -> None:
        """Stock of the product changed here: stop refusing it from memory."""
        self._sold_out.pop(product_id, None)

    def forget_settings(self, product_ids: Iterable[str]) -> None:
        """Settings of the products changed here: read them again on next use."""
        for product_id in product_ids:
            self._settings.pop(product_id, None)
            self._sold_out.pop(product_id, None)

    async def _settings_of(
        self, product_ids: Iterable[str]
    ) -> dict[str, tuple[tuple[KitComponent, ...] | None, int | None]]:
        """Kit components and purchase limit per product, remembered for ``SETTINGS_TTL``
        (the batch re-reads the limit under its row locks; a kit change is seen here at
        most that late, and a product can only become a kit while it has no stock rows).

        Misses of requests arriving together are read with one query, so the requests
        also reach their lane together and still share a batch.
        """
        now = time.monotonic()
        ids = list(dict.fromkeys(product_ids))
        stale = [p for p in ids if (got := self._settings.get(p)) is None or got[2] < now]
        if stale:
            if self._round is None:
                self._round = asyncio.get_running_loop().create_future()
                self._queued = set()
                if self._loader is None:
                    self._loader = asyncio.create_task(self._load_settings())
            self._queued.update(stale)
            # One future per round: its waiters resume in arrival order.
            await asyncio.shield(self._round)
        return {p: self._settings[p][:2] for p in ids}

    async def _load_settings(self) -> None:
        """Read the settings of every product queued since the last read, once."""
        try:
            while self._round is not None:
                done, ids = self._round, self._queued
                self._round, self._queued = None, set()
                try:
                    found = await self.store.kit_components(sorted(ids))
                except Exception as exc:
                    done.set_exception(exc)
                    done.exception()  # retrieved here; each waiter raises it
                    continue
                until = time.monotonic() + SETTINGS_TTL
                if len(self._settings) > 100_000:
                    self._settings.clear()
                for p in ids:
                    components, limit = found.get(p, (None, None))
                    self._settings[p] = (components, limit, until)
                done.set_result(None)
        finally:
            self._loader = None

    async def _prepare(self, request: ReserveRequest) -> ReserveRequest:
        """Expand kit lines into component lines; refuse a line for a limited product
        without a customer (422, before anything is claimed or written)."""
        settings = await self._settings_of(request.products)
        kits = {p: c for p, (c, _) in settings.items() if c is not None}
        if kits:
            lines = expand_kits(request.lines, kits)
            request = replace(request, lines=lines)  # products follow the new lines
            settings = await self._settings_of(request.products)
        if request.customer_id is None:
            for product_id in dict.fromkeys(x.product_id for x in request.lines):
                if settings[product_id][1] is not None:
                    raise _customer_required(product_id)
        return request

    def _is_contended(self, product_id: str) -> bool:
        if product_id in self._waiting:
            return True
        until = self._contended.get(product_id)
        if until is None:
            return False
        if until > time.monotonic():
            return True
        del self._contended[product_id]
        return False

    def _note_contended(self, products: Iterable[str]) -> None:
        now = time.monotonic()
        if len(self._contended) > 10_000:  # forget the stale ones now and then
            self._contended = {p: t for p, t in self._contended.items() if t > now}
        for product_id in products:
            self._contended[product_id] = now + CONTENDED_TTL

    def _sold_out_refusal(self, request: ReserveRequest) -> InsufficientStock | None:
        if request.offer is not None or len(request.lines) != 1:
            return None
        [line] = request.lines
        if line.warehouse_id is not None:
            return None
        if not self.sold_out(line.product_id):
            return None
        return InsufficientStock(
            "not enough stock for every line",
            [{"product_id": line.product_id, "requested": line.quantity, "available": 0}],
        )

    async def _refuse_keyed(
        self, idem: Idempotency, refusal: InsufficientStock
    ) -> Reservation | Replay:
        """Refuse a keyed request from memory: its 409 is stored under the key with the
        other refusals that arrived meanwhile, outside the product's batches (no row
        lock, no transaction), so a retry replays it like any stored answer and a flash
        sale's retry storm never queues in the sold-out product's lane; a key already
        stored replays its first answer instead."""
        shard = zlib.crc32(idem.key.encode()) % REFUSAL_SHARDS
        stored = await self.refusals.submit(shard, (idem.scope, idem.key, idem.digest,
                                                    *idem.render(refusal)))  # fmt: skip
        if stored is None:
            raise refusal
        return _answer(_from_record(stored, idem))

    async def _store_refusals(
        self, _: int, batch: Sequence[_Refusal]
    ) -> list[IdempotencyRecord | None]:
        """Store a batch of refusals; a key used again in the batch is answered like a
        repeat that arrived just after its first use."""
        first: dict[tuple[str, str], _Refusal] = {}
        for refusal in batch:
            first.setdefault(refusal[:2], refusal)
        taken = await self.store.store_refusals(list(first.values()))
        out: list[IdempotencyRecord | None] = []
        for refusal in batch:
            earlier = first[refusal[:2]]
            if refusal[:2] in taken:
                out.append(taken[refusal[:2]])
            elif earlier is refusal:
                out.append(None)
            else:
                out.append(IdempotencyRecord(earlier[2], earlier[3], earlier[4]))
        return out

    async def _wait(self, member: _Member) -> Reservation | Replay:
        """The waiting path of a member whose rows were busy, until its deadline."""
        products = member.request.products
        for p in products:
            self._waiting[p] = self._waiting.get(p, 0) + 1
        try:
            while True:
                metrics.RETRIES.inc()
                try:
                    # Queued behind a batch of later deadlines, it must not outwait its own.
                    outcome = await self.waiters.submit(
                        products,
                        member,
                        pending_timeout=max(0.0, member.deadline - time.monotonic()),
                    )
                except TimeoutError:
                    outcome = _Busy(member.busy)
                if not isinstance(outcome, _Busy):
                    return _answer(outcome)
                member = replace(member, busy=member.busy | outcome.products)
                if time.monotonic() >= member.deadline:
                    raise Contention(
                        "a stock row of this reservation is held by another transaction; retry",
                        1.0,
                    )
        finally:
            for p in products:
                if self._waiting[p] == 1:
                    del self._waiting[p]
                else:
                    self._waiting[p] -= 1

    async def _run_lane(self, lane: int, batch: Sequence[_Member]) -> list[MemberOutcome]:
        return await self._run_batch(batch, 0.0)

    async def _run_waiting(
        self, products: tuple[str, ...], batch: Sequence[_Member]
    ) -> list[MemberOutcome]:
        busy: list[MemberOutcome] = [_Busy(m.busy) for m in batch]
        remaining = min(m.deadline for m in batch) - time.monotonic()
        if remaining <= 0:
            return busy
        try:
            async with asyncio.timeout(remaining):
                await self._wait_slots.acquire()
        except TimeoutError:
            return busy
        try:
            remaining = min(m.deadline for m in batch) - time.monotonic()
            if remaining <= 0:
                return busy
            if self._lock_products is not None:
                remaining = min(remaining, WAIT_SLICE)
            return await self._run_batch(batch, remaining)
        finally:
            self._wait_slots.release()

    async def _run_batch(self, batch: Sequence[_Member], wait: float) -> list[MemberOutcome]:
        """One transaction for ``batch``: wait at most ``wait`` seconds for the rows of
        the products its members found busy before, skip the others' busy rows."""
        products = sorted({p for m in batch for p in m.request.products})
        metrics.BATCHES.inc()
        metrics.BATCH_MEMBERS.inc(len(batch))
        try:
            if self._lock_products is None:
                results = await self._apply(products, batch, wait)
            else:
                async with self._lock_products(products):
                    results = await self._apply(products, batch, wait)
        except RowsBusy:  # a waiting batch whose lock_timeout ran out
            return [_Busy(m.busy) for m in batch]
        except VersionMiss:  # the rows are locked: only a bug or manual SQL gets here
            metrics.VERSION_CONFLICTS.inc()
            raise Contention("the stock row changed under the batch; retry") from None
        if any(isinstance(r, Reservation) for r in results):
            self._on_change()
        return results

    async def _apply(
        self, products: Sequence[str], batch: Sequence[_Member], wait: float
    ) -> list[MemberOutcome]:
        results: list[MemberOutcome | None] = [None] * len(batch)
        requests = [m.request for m in batch]
        wait_for = frozenset[str]().union(*(m.busy for m in batch))
        async with self.store.transaction(wait if wait_for else None) as conn:
            keyed = any(r.idempotency is not None for r in requests)
            locked = await self.store.lock_rows(conn, products, wait_for, wait, then_claims=keyed)
            warehouses, busy = locked.warehouses, locked.busy
            self._note_contended(busy)
            for i, request in enumerate(requests):
                if found := busy.intersection(request.products):
                    results[i] = _Busy(frozenset(found))
            keys = _Keys(requests, results)
            await keys.claim(self.store, conn)
            live = [i for i, r in enumerate(results) if r is None and i not in keys.repeats]
            pinned = {
                x.warehouse_id
                for i in live
                for x in requests[i].lines
                if x.warehouse_id is not None and x.warehouse_id not in warehouses
            }
            if pinned:
                warehouses = {**warehouses, **await self.store.warehouses(conn, pinned)}
            rules = locked.rules
            if rules is None:
                rules = await self.store.load_rules(conn, products)
            customers = {c for i in live if (c := requests[i].customer_id) is not None}
            limited = [p for p, r in rules.items() if r.max_per_customer is not None]
            held = (
                await self.store.held_units(conn, customers, limited)
                if customers and limited
                else {}
            )
            offers = {e: i for i in live if (e := requests[i].offer) is not None}
            waiting = await self.store.lock_offers(conn, list(offers)) if offers else {}
            for entry, i in offers.items():
                if entry not in waiting:
                    results[i] = InvalidState(
                        "the waitlist entry is no longer waiting", {"status": "not_waiting"}
                    )
            state = BatchState(locked.levels, warehouses, rules, held, waiting)
            for i in live:
                if results[i] is not None:
                    continue
                try:
                    state.reserve(i, requests[i])
                except InventoryError as exc:
                    results[i] = exc
            if state.planned:
                at = await self.store.insert_batch(
                    conn,
                    state.changed_rows(),
                    state.movements,
                    [(p.id, requests[p.index].reference, requests[p.index].ttl_seconds,
                      requests[p.index].customer_id) for p in state.planned],
                    [(p.id, n, line) for p in state.planned
                     for n, line in enumerate(p.lines, start=1)],
                )  # fmt: skip
                for p in state.planned:
                    request = requests[p.index]
                    results[p.index] = _reservation(p, request, at)
                offered = {e: p.id for p in state.planned if (e := requests[p.index].offer)}
                if offered:
                    await self.store.mark_offered(conn, offered)
            await keys.remember(self.store, conn)
        keys.mirror_repeats()
        for product_id in products:
            if product_id not in busy:
                self._note_sold_out(product_id, state.reservable(product_id))
        done = [r for r in results if r is not None]
        assert len(done) == len(batch), "every member gets exactly one answer"
        return done

    def _note_sold_out(self, product_id: str, reservable: int | None) -> None:
        if reservable == 0:
            self._sold_out[product_id] = time.monotonic() + self._sold_out_ttl
        else:
            self._sold_out.pop(product_id, None)


class _Keys:
    """The idempotency keys of one batch's members: claim, replay, store, mirror.

    ``results`` is the batch's answer list, filled in place. Members already answered
    (busy) take no part. A key used by several members of the batch is claimed once, by
    the first (in key order, then arrival); the others are answered like a repeat that
    arrived just after it (:meth:`mirror_repeats`).
    """

    def __init__(
        self, requests: Sequence[ReserveRequest], results: list[MemberOutcome | None]
    ) -> None:
        self.requests = requests
        self.results = results
        self.fresh: list[int] = []  # members whose key this batch claimed
        self.repeats: dict[int, int] = {}  # member -> earlier member with the same key
        self.stored: dict[tuple[str, str], IdempotencyRecord] = {}  # answered before

    async def claim(self, store: InventoryStore, conn: Tx) -> None:
        first: dict[tuple[str, str], int] = {}
        keyed = sorted(
            (idem.scope, idem.key, i)
            for i, r in enumerate(self.requests)
            if (idem := r.idempotency) is not None and self.results[i] is None
        )
        for scope, key, i in keyed:
            if (scope, key) in first:
                self.repeats[i] = first[(scope, key)]
            else:
                first[(scope, key)] = i
        if not first:
            return
        claims = []
        for i in first.values():
            idem = self.requests[i].idempotency
            assert idem is not None
            claims.append((idem.scope, idem.key, idem.digest))
        self.stored = await store.claim_idempotency_keys(conn, claims)
        for (scope, key), i in first.items():
            record = self.stored.get((scope, key))
            if record is None:
                self.fresh.append(i)
                continue
            idem = self.requests[i].idempotency
            assert idem is not None
            self.results[i] = _from_record(record, idem)

    async def remember(self, store: InventoryStore, conn: Tx) -> None:
        """Store the answers of newly claimed keys (201, 404 and 409: nothing else
        reaches this point)."""
        answers: list[tuple[str, str, int, bytes]] = []
        unstored: list[tuple[str, str]] = []
        for i in self.fresh:
            idem, outcome = self.requests[i].idempotency, self.results[i]
            assert idem is not None
            assert isinstance(outcome, Reservation | InventoryError)
            if isinstance(outcome, CustomerRequired):  # found in the batch: not stored
                unstored.append((idem.scope, idem.key))
            else:
                answers.append((idem.scope, idem.key, *idem.render(outcome)))
        if answers:
            await store.store_idempotent_responses(conn, answers)
        if unstored:
            await store.drop_idempotency_keys(conn, unstored)

    def mirror_repeats(self) -> None:
        """Answer each repeat of a key used earlier in the same batch."""
        for i, first in self.repeats.items():
            idem, first_idem = self.requests[i].idempotency, self.requests[first].idempotency
            outcome = self.results[first]
            assert idem is not None
            assert first_idem is not None
            record = self.stored.get((idem.scope, idem.key))
            if record is not None:  # answered before this batch: judge the repeat on its own
                self.results[i] = _from_record(record, idem)
            elif idem.digest != first_idem.digest:
                self.results[i] = IdempotencyKeyReused(
                    "this Idempotency-Key was used with a different body", {"key": idem.key}
                )
            else:
                assert isinstance(outcome, Reservation | InventoryError)
                self.results[i] = first_idem.replay(outcome)


def lane_of(product_id: str, lanes: int) -> int:
    """The lane of a request whose first product is ``product_id`` (stable across
    processes)."""
    return zlib.crc32(product_id.encode()) % lanes


_NO_RULES: Final = ProductRules()


def _customer_required(product_id: str) -> CustomerRequired:
    return CustomerRequired(
        f"{product_id} has a purchase limit: the reservation needs a customer_id",
        {"field": "customer_id", "product_id": product_id},
    )


def _answer(outcome: Outcome) -> Reservation | Replay:
    if isinstance(outcome, InventoryError):
        raise outcome
    return outcome


def _reservation(planned: PlannedReservation, request: ReserveRequest, at: datetime) -> Reservation:
    return Reservation(
        planned.id,
        ReservationStatus.ACTIVE,
        planned.lines,
        request.reference,
        at,
        at + timedelta(seconds=request.ttl_seconds),
    )


def _from_record(record: IdempotencyRecord, idem: Idempotency) -> Outcome:
    try:
        return replay_stored(record, idem)
    except InventoryError as exc:
        return exc
