"""Property-based (stateful) test of the flash-sale rules in the engine's batch state.

Random restocks, safety stock changes, combined batches of reservations (kit lines,
customers with a purchase limit), releases, waitlist entries and offer passes run
against :class:`~inventory.service.engine.BatchState` exactly as the batch transaction
feeds it (rows, product rules with waiting units, each customer's held units). After
every step the invariants ``inventory check`` verifies must hold.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from uuid import UUID

from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from inventory.domain.commerce import (
    CustomerRequired,
    KitComponent,
    ProductRules,
    PurchaseLimitExceeded,
    active_available,
    expand_kits,
)
from inventory.domain.model import (
    InsufficientStock,
    MovementKind,
    RequestedLine,
    ReservationLine,
    StockLevel,
    Warehouse,
    WarehouseStatus,
)
from inventory.service.engine import BatchState, ReserveRequest

WAREHOUSES = {w: Warehouse(w, w, None, WarehouseStatus.ACTIVE) for w in ("w1", "w2")}
KIT = (KitComponent("a", 1), KitComponent("b", 2))
LIMIT = {"a": 3}  # max_per_customer
CUSTOMERS = ("c1", "c2", "c3")

line_spec = st.tuples(st.sampled_from(["a", "b", "k"]), st.integers(1, 3))
request_spec = st.tuples(
    st.lists(line_spec, min_size=1, max_size=3), st.sampled_from([None, *CUSTOMERS])
)


@dataclass
class Held:
    id: UUID
    customer: str | None
    lines: tuple[ReservationLine, ...]
    active: bool = True


@dataclass
class Entry:
    id: UUID
    seq: int
    product: str
    customer: str
    quantity: int
    status: str = "waiting"
    reservation: UUID | None = None


class FlashSale(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rows = {
            (p, w): StockLevel(p, w, 0, 0, 1) for p in ("a", "b") for w in WAREHOUSES
        }  # fmt: skip
        self.safety = {"a": 0, "b": 0}
        self.reservations: list[Held] = []
        self.entries: list[Entry] = []
        self.seq = itertools.count(1)
        self.settled = True  # an offer pass ran since the last change

    # --- what the batch transaction reads --------------------------------------------

    def _state(self, offers: dict[UUID, tuple[int, int]] | None = None) -> BatchState:
        waiting = {p: sum(e.quantity for e in self._queue(p)) for p in self.safety}
        rules = {
            p: ProductRules(self.safety[p], LIMIT.get(p), None, waiting[p]) for p in self.safety
        }
        return BatchState(self.rows.values(), WAREHOUSES, rules, self._held(), offers)

    def _held(self) -> dict[tuple[str, str], int]:
        held: dict[tuple[str, str], int] = {}
        for r in self.reservations:
            if r.active and r.customer is not None:
                for x in r.lines:
                    key = (r.customer, x.product_id)
                    held[key] = held.get(key, 0) + x.quantity
        return held

    def _queue(self, product: str) -> list[Entry]:
        return sorted(
            (e for e in self.entries if e.product == product and e.status == "waiting"),
            key=lambda e: e.seq,
        )

    def _commit_state(self, state: BatchState, made: list[tuple[Held, Entry | None]]) -> None:
        for before, after in state.changed_rows():
            assert after.version == before.version + sum(
                1 for m in state.movements
                if (m.product_id, m.warehouse_id) == (before.product_id, before.warehouse_id)
            )  # fmt: skip
            self.rows[(after.product_id, after.warehouse_id)] = after
        for held, entry in made:
            self.reservations.append(held)
            if entry is not None:
                entry.status, entry.reservation = "offered", held.id

    # --- operations ------------------------------------------------------------------

    @rule(product=st.sampled_from(["a", "b"]), wh=st.sampled_from(["w1", "w2"]),
          delta=st.integers(1, 6))  # fmt: skip
    def restock(self, product: str, wh: str, delta: int) -> None:
        self.rows[(product, wh)], _ = self.rows[(product, wh)].adjust(delta)
        self.settled = False

    @rule(product=st.sampled_from(["a", "b"]), n=st.integers(0, 4))
    def set_safety_stock(self, product: str, n: int) -> None:
        self.safety[product] = n
        self.settled = False

    @rule(batch=st.lists(request_spec, min_size=1, max_size=4))
    def reserve_batch(self, batch: list[tuple[list[tuple[str, int]], str | None]]) -> None:
        """One combined batch: each member sees what the earlier ones took."""
        state = self._state()
        made: list[tuple[Held, Entry | None]] = []
        for index, (spec, customer) in enumerate(batch):
            lines = expand_kits(
                tuple(RequestedLine(p, n) for p, n in spec), {"k": KIT}
            )  # fmt: skip
            claim = {p: state.claimable(p) for p in ("a", "b")}
            try:
                planned = state.reserve(
                    index, ReserveRequest(lines, 60, None, customer_id=customer)
                )
            except (CustomerRequired, PurchaseLimitExceeded, InsufficientStock):
                continue  # refused, nothing taken (any other error fails the test)
            for p in ("a", "b"):  # nobody takes safety stock or what the queue waits for
                assert sum(x.quantity for x in planned.lines if x.product_id == p) <= claim[p]
                if any(x.product_id == p for x in planned.lines):
                    left = active_available(state.rows[p].values(), WAREHOUSES) - self.safety[p]
                    assert left >= sum(e.quantity for e in self._queue(p))
            made.append((Held(planned.id, customer, planned.lines), None))
        self._commit_state(state, made)

    @precondition(lambda self: any(r.active for r in self.reservations))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = data.draw(st.sampled_from([r for r in self.reservations if r.active]))
        for x in held.lines:
            key = (x.product_id, x.warehouse_id)
            self.rows[key], _ = self.rows[key].unreserve(x.quantity, held.id, MovementKind.RELEASED)
        held.active = False
        self.settled = False

    @rule(product=st.sampled_from(["a", "b"]), customer=st.sampled_from(CUSTOMERS),
          quantity=st.integers(1, 4))  # fmt: skip
    def join_waitlist(self, product: str, customer: str, quantity: int) -> None:
        if any(e.customer == customer for e in self._queue(product)):
            return  # already_waiting
        self.entries.append(Entry(uuid.uuid4(), next(self.seq), product, customer, quantity))
        self.settled = False

    @rule()
    def offer_pass(self) -> None:
        """What the offerer does: offer every waiting entry of a product in one batch, in
        queue order, each beyond the units still waiting before it; repeat while the
        queues move."""
        progress = True
        while progress:
            progress = False
            for product in ("a", "b"):
                queue = self._queue(product)
                offers, ahead = {}, 0
                for e in queue:
                    offers[e.id] = (e.seq, ahead)
                    ahead += e.quantity
                state = self._state(offers)
                made: list[tuple[Held, Entry | None]] = []
                for index, e in enumerate(queue):
                    request = ReserveRequest(
                        (RequestedLine(product, e.quantity),), 60, f"waitlist:{e.id}",
                        customer_id=e.customer, offer=e.id,
                    )  # fmt: skip
                    try:
                        planned = state.reserve(index, request)
                    except PurchaseLimitExceeded:
                        e.status = "cancelled"
                        progress = True
                        continue
                    except InsufficientStock:
                        continue
                    made.append((Held(planned.id, e.customer, planned.lines), e))
                    progress = True
                self._commit_state(state, made)
                served = [x.seq for _, x in made if x is not None]
                waiting = [e.seq for e in self._queue(product)]
                # strictly in order: nobody still waiting was ahead of someone served
                assert not served or not waiting or max(served) < min(waiting)
        self.settled = True

    # --- the invariants inventory check verifies ---------------------------------------

    @invariant()
    def rows_hold(self) -> None:
        for lv in self.rows.values():
            assert 0 <= lv.reserved <= lv.quantity
        for (p, w), lv in self.rows.items():
            held = sum(
                x.quantity for r in self.reservations if r.active for x in r.lines
                if (x.product_id, x.warehouse_id) == (p, w)
            )  # fmt: skip
            assert lv.reserved == held

    @invariant()
    def limits_hold(self) -> None:
        for (_, product), held in self._held().items():
            if product in LIMIT:
                assert held <= LIMIT[product]

    @invariant()
    def offered_entries_have_reservations(self) -> None:
        ids = {r.id: r for r in self.reservations}
        for e in self.entries:
            if e.status == "offered":
                r = ids[e.reservation]  # type: ignore[index]
                assert r.customer == e.customer
                assert sum(x.quantity for x in r.lines) == e.quantity

    @invariant()
    def kit_lines_are_whole_kits(self) -> None:
        for r in self.reservations:
            kit = [x for x in r.lines if x.kit_id == "k"]
            if kit:
                a = sum(x.quantity for x in kit if x.product_id == "a")
                b = sum(x.quantity for x in kit if x.product_id == "b")
                assert a >= 1
                assert b == 2 * a

    @invariant()
    def no_waiting_head_could_be_offered(self) -> None:
        if not self.settled:
            return
        for product in ("a", "b"):
            queue = self._queue(product)
            if queue:
                rows = [lv for (p, _), lv in self.rows.items() if p == product]
                free = active_available(rows, WAREHOUSES) - self.safety[product]
                assert free < queue[0].quantity or (
                    LIMIT.get(product) is not None
                    and self._held().get((queue[0].customer, product), 0) + queue[0].quantity
                    > LIMIT[product]
                )


FlashSale.TestCase.settings = hsettings(max_examples=150, stateful_step_count=40, deadline=None)
TestFlashSale = FlashSale.TestCase
