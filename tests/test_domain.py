"""Pure unit tests of :mod:`inventory.domain.model`: stock rules, the reservation state machine
and allocation. No I/O; hypothesis drives a state machine over a stock row and its
reservations and a property test of allocation against a simple feasibility oracle."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from inventory.domain.model import (
    InsufficientStock,
    InvalidState,
    MovementKind,
    RequestedLine,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockLevel,
    ValidationFailed,
    VersionConflict,
    Warehouse,
    WarehouseStatus,
    WarehouseUnavailable,
    allocate,
    row_deltas,
)

T0 = datetime(2030, 1, 1, tzinfo=UTC)
RID = uuid.UUID(int=1)


def level(quantity: int = 0, reserved: int = 0, version: int = 1, wid: str = "w1") -> StockLevel:
    return StockLevel("p1", wid, quantity, reserved, version)


def reservation(
    status: ReservationStatus = ReservationStatus.ACTIVE, ttl: float = 60
) -> Reservation:
    return Reservation(
        RID,
        status,
        (ReservationLine("p1", "w1", 2),),
        "order-1",
        T0,
        T0 + timedelta(seconds=ttl),
    )


def wh(wid: str, status: str = "active") -> Warehouse:
    return Warehouse(wid, wid, None, WarehouseStatus(status))


def lv(pid: str, wid: str, available: int, reserved: int = 0) -> StockLevel:
    return StockLevel(pid, wid, available + reserved, reserved, 3)


def placed(lines: tuple[ReservationLine, ...]) -> list[tuple[str, str, int]]:
    return [(x.product_id, x.warehouse_id, x.quantity) for x in lines]


# --- stock levels -----------------------------------------------------------------------


def test_adjust_receives_and_removes_with_version_bump() -> None:
    new, m = StockLevel("p1", "w1").adjust(7, "delivery")
    assert (new.quantity, new.reserved, new.version, new.available) == (7, 0, 1, 7)
    assert (m.kind, m.quantity_delta, m.reserved_delta, m.quantity, m.version) == (
        MovementKind.ADJUSTED, 7, 0, 7, 1,
    )  # fmt: skip
    assert m.reason == "delivery"
    assert m.reservation_id is None
    new2, m2 = new.adjust(-2)
    assert (new2.quantity, new2.version, m2.quantity_delta, m2.quantity) == (5, 2, -2, 5)


def test_adjust_zero_is_a_validation_error() -> None:
    with pytest.raises(ValidationFailed) as info:
        level(5).adjust(0)
    assert info.value.code == "validation_error"
    assert info.value.details == {"field": "delta"}


def test_remove_more_than_available_is_refused() -> None:
    row = level(10, reserved=4)
    with pytest.raises(InsufficientStock) as info:
        row.adjust(-7)
    assert info.value.details == {
        "product_id": "p1", "warehouse_id": "w1", "requested": 7, "available": 6,
    }  # fmt: skip
    # Exactly the available part can go; reserved stock stays.
    new, _ = row.adjust(-6)
    assert (new.quantity, new.reserved, new.available) == (4, 4, 0)
    # A negative first change of a missing row: available 0.
    with pytest.raises(InsufficientStock) as info:
        StockLevel("p1", "w9").adjust(-1)
    assert info.value.details["available"] == 0


def test_set_quantity() -> None:
    row = level(10, reserved=4, version=5)
    new, m = row.set_quantity(12) or pytest.fail("a change was expected")
    assert (new.quantity, new.reserved, new.version) == (12, 4, 6)
    assert (m.kind, m.quantity_delta, m.quantity, m.version) == (MovementKind.ADJUSTED, 2, 12, 6)
    down, m = row.set_quantity(4) or pytest.fail("a change was expected")
    assert (down.quantity, down.available, m.quantity_delta) == (4, 0, -6)
    assert row.set_quantity(10) is None  # no-op: no version bump, no ledger row
    with pytest.raises(InsufficientStock) as info:
        row.set_quantity(3)
    assert info.value.details == {
        "product_id": "p1", "warehouse_id": "w1", "requested": 3, "available": 6,
    }  # fmt: skip
    # Setting a missing row (even to 0) creates it at version 1.
    created, m = StockLevel("p1", "w2").set_quantity(0) or pytest.fail("row must be created")
    assert (created.version, created.quantity, m.quantity_delta) == (1, 0, 0)


def test_check_version() -> None:
    row = level(1, version=3)
    row.check_version(None)
    row.check_version(3)
    with pytest.raises(VersionConflict) as info:
        row.check_version(2)
    assert info.value.details == {"current_version": 3}
    with pytest.raises(VersionConflict) as info:
        StockLevel("p1", "w1").check_version(1)
    assert info.value.details == {"current_version": None}


def test_reserve_and_unreserve() -> None:
    row = level(10, reserved=2, version=4)
    with pytest.raises(InsufficientStock) as info:
        row.reserve(9, RID)
    assert info.value.details["requested"] == 9
    assert info.value.details["available"] == 8
    held, m = row.reserve(8, RID)
    assert (held.quantity, held.reserved, held.available, held.version) == (10, 10, 0, 5)
    assert (m.kind, m.quantity_delta, m.reserved_delta, m.reservation_id) == (
        MovementKind.RESERVED, 0, 8, RID,
    )  # fmt: skip
    shipped, m = held.unreserve(3, RID, MovementKind.COMMITTED)
    assert (shipped.quantity, shipped.reserved, shipped.version) == (7, 7, 6)
    assert (m.quantity_delta, m.reserved_delta, m.kind) == (-3, -3, MovementKind.COMMITTED)
    for kind in (MovementKind.RELEASED, MovementKind.EXPIRED):
        back, m = held.unreserve(3, RID, kind)
        assert (back.quantity, back.reserved, back.version) == (10, 7, 6)
        assert (m.quantity_delta, m.reserved_delta, m.kind) == (0, -3, kind)
    with pytest.raises(AssertionError):
        row.unreserve(3, RID, MovementKind.RELEASED)


# --- reservations -----------------------------------------------------------------------


@pytest.mark.parametrize("target", [ReservationStatus.COMMITTED, ReservationStatus.RELEASED])
def test_finish_before_deadline(target: ReservationStatus) -> None:
    r = reservation()
    done = r.finish(target, T0 + timedelta(seconds=59))
    assert done is not None
    assert done.status is target
    assert (done.id, done.lines, done.expires_at) == (r.id, r.lines, r.expires_at)
    assert done.movement_kind() == MovementKind(target.value)
    # The same transition again changes nothing.
    assert done.finish(target, T0 + timedelta(seconds=999)) is None


@pytest.mark.parametrize("target", [ReservationStatus.COMMITTED, ReservationStatus.RELEASED])
def test_commit_or_release_past_deadline_is_expired(target: ReservationStatus) -> None:
    r = reservation(ttl=60)
    for late in (T0 + timedelta(seconds=60), T0 + timedelta(seconds=61)):
        with pytest.raises(InvalidState) as info:
            r.finish(target, late)
        assert info.value.code == "invalid_state"
        assert info.value.details == {"status": "expired"}


def test_expire_only_when_due() -> None:
    r = reservation(ttl=60)
    with pytest.raises(InvalidState) as info:
        r.finish(ReservationStatus.EXPIRED, T0 + timedelta(seconds=59))
    assert info.value.details == {"status": "active"}
    done = r.finish(ReservationStatus.EXPIRED, T0 + timedelta(seconds=60))
    assert done is not None
    assert done.status is ReservationStatus.EXPIRED
    assert done.movement_kind() is MovementKind.EXPIRED
    assert done.finish(ReservationStatus.EXPIRED, T0 + timedelta(seconds=61)) is None


FINISHED = [ReservationStatus.COMMITTED, ReservationStatus.RELEASED, ReservationStatus.EXPIRED]


@pytest.mark.parametrize("current", FINISHED)
@pytest.mark.parametrize("target", [*FINISHED, ReservationStatus.ACTIVE])
def test_no_transition_out_of_a_final_state(
    current: ReservationStatus, target: ReservationStatus
) -> None:
    r = reservation(current)
    for now in (T0, T0 + timedelta(hours=1)):
        if target is current:
            assert r.finish(target, now) is None
            continue
        with pytest.raises(InvalidState) as info:
            r.finish(target, now)
        assert info.value.details == {"status": current.value}


def test_status_at() -> None:
    r = reservation(ttl=10)
    assert r.status_at(T0 + timedelta(seconds=9, microseconds=999_999)) is ReservationStatus.ACTIVE
    assert r.status_at(T0 + timedelta(seconds=10)) is ReservationStatus.EXPIRED
    for final in FINISHED:
        assert reservation(final, ttl=10).status_at(T0 + timedelta(hours=1)) is final


def test_extend() -> None:
    r = reservation(ttl=60)
    now = T0 + timedelta(seconds=30)
    longer = r.extend(600, now)
    assert longer.expires_at == now + timedelta(seconds=600)
    assert longer.status is ReservationStatus.ACTIVE
    shorter = longer.extend(1, now)  # may shorten
    assert shorter.expires_at == now + timedelta(seconds=1)
    with pytest.raises(InvalidState) as info:
        r.extend(600, T0 + timedelta(seconds=60))
    assert info.value.details == {"status": "expired"}
    for final in FINISHED:
        with pytest.raises(InvalidState) as info:
            reservation(final).extend(600, now)
        assert info.value.details == {"status": final.value}


# --- allocation -------------------------------------------------------------------------


def test_pinned_lines_are_applied_before_unpinned() -> None:
    levels = [lv("p", "w1", 5), lv("p", "w2", 3)]
    out = allocate(
        [RequestedLine("p", 4), RequestedLine("p", 3, "w1")],
        levels,
        {"w1": wh("w1"), "w2": wh("w2")},
    )
    # The pinned line took 3 of w1 first; the unpinned 4 is split: w2 (3) then w1 (2 left).
    assert placed(out.lines) == [("p", "w2", 3), ("p", "w1", 1), ("p", "w1", 3)]
    assert out.deltas() == {("p", "w1"): 4, ("p", "w2"): 3}
    assert set(out.rows) == {("p", "w1"), ("p", "w2")}


def test_most_available_wins_and_ties_go_to_smaller_id() -> None:
    whs = {w: wh(w) for w in ("a", "b", "c")}
    out = allocate([RequestedLine("p", 3)], [lv("p", "a", 5), lv("p", "b", 8)], whs)
    assert placed(out.lines) == [("p", "b", 3)]
    out = allocate([RequestedLine("p", 3)], [lv("p", "c", 5), lv("p", "b", 5)], whs)
    assert placed(out.lines) == [("p", "b", 3)]
    # Only the touched row is in the allocation.
    assert set(out.rows) == {("p", "b")}


def test_split_takes_most_available_first() -> None:
    whs = {w: wh(w) for w in ("a", "b", "c", "d")}
    levels = [lv("p", "a", 2), lv("p", "b", 3), lv("p", "c", 1), lv("p", "d", 2)]
    out = allocate([RequestedLine("p", 7)], levels, whs)
    assert placed(out.lines) == [("p", "b", 3), ("p", "a", 2), ("p", "d", 2)]


def test_running_balance_across_lines_of_one_product() -> None:
    whs = {"w1": wh("w1"), "w2": wh("w2")}
    levels = [lv("p", "w1", 5), lv("p", "w2", 4)]
    out = allocate([RequestedLine("p", 4), RequestedLine("p", 4)], levels, whs)
    # Separate lines; the second sees what the first left (w1: 1, w2: 4).
    assert placed(out.lines) == [("p", "w1", 4), ("p", "w2", 4)]
    out = allocate([RequestedLine("p", 3), RequestedLine("p", 3)], levels, whs)
    assert placed(out.lines) == [("p", "w1", 3), ("p", "w2", 3)]
    # Two lines that together exceed what is available: short, nothing allocated.
    with pytest.raises(InsufficientStock) as info:
        allocate([RequestedLine("p", 5), RequestedLine("p", 5)], levels, whs)
    assert info.value.details == [{"product_id": "p", "requested": 10, "available": 9}]


@pytest.mark.parametrize("status", ["inactive", "maintenance"])
def test_pinned_to_unavailable_warehouse(status: str) -> None:
    whs = {"w1": wh("w1"), "w2": wh("w2", status)}
    with pytest.raises(WarehouseUnavailable) as info:
        allocate(
            [RequestedLine("p", 1), RequestedLine("p", 1, "w2")],
            [lv("p", "w1", 5), lv("p", "w2", 5)],
            whs,
        )
    assert info.value.code == "warehouse_unavailable"
    assert info.value.details == {"warehouse_id": "w2", "status": status}


def test_unpinned_lines_skip_unavailable_warehouses() -> None:
    whs = {"w1": wh("w1", "maintenance"), "w2": wh("w2"), "w3": wh("w3", "inactive")}
    levels = [lv("p", "w1", 100), lv("p", "w2", 2), lv("p", "w3", 100)]
    assert placed(allocate([RequestedLine("p", 2)], levels, whs).lines) == [("p", "w2", 2)]
    with pytest.raises(InsufficientStock) as info:
        allocate([RequestedLine("p", 3)], levels, whs)
    assert info.value.details == [{"product_id": "p", "requested": 3, "available": 2}]


def test_pinned_pair_without_row_is_short_with_available_zero() -> None:
    whs = {"w1": wh("w1", "inactive"), "w2": wh("w2")}
    with pytest.raises(InsufficientStock) as info:
        allocate([RequestedLine("p", 2, "w2")], [lv("p", "w1", 50)], whs)
    assert info.value.details == [{"product_id": "p", "requested": 2, "available": 0}]


def test_insufficient_details_list_each_short_product_once() -> None:
    whs = {"w1": wh("w1"), "w2": wh("w2", "inactive")}
    levels = [
        lv("a", "w1", 3), lv("a", "w2", 100),
        lv("b", "w1", 10),
        lv("c", "w1", 1, reserved=4),
    ]  # fmt: skip
    lines = [
        RequestedLine("c", 1),
        RequestedLine("a", 2),
        RequestedLine("b", 4),
        RequestedLine("a", 2, "w1"),
        RequestedLine("c", 1),
        RequestedLine("a", 1),
    ]
    with pytest.raises(InsufficientStock) as info:
        allocate(lines, levels, whs)
    # Request order of first appearance; b fits and is not listed; inactive w2 not counted.
    assert info.value.details == [
        {"product_id": "c", "requested": 2, "available": 1},
        {"product_id": "a", "requested": 5, "available": 3},
    ]


def test_row_deltas_sum_lines_per_row_sorted() -> None:
    lines = [
        ReservationLine("b", "w1", 2),
        ReservationLine("a", "w2", 1),
        ReservationLine("b", "w1", 3),
        ReservationLine("a", "w1", 4),
        ReservationLine("a", "w2", 5),
    ]
    deltas = row_deltas(lines)
    assert list(deltas.items()) == [
        (("a", "w1"), 4), (("a", "w2"), 6), (("b", "w1"), 5),
    ]  # fmt: skip


PRODUCTS = ["a", "b"]
WAREHOUSES = ["w1", "w2", "w3"]


@st.composite
def allocation_cases(
    draw: st.DrawFn,
) -> tuple[list[RequestedLine], list[StockLevel], dict[str, Warehouse]]:
    whs = {
        w: wh(w, draw(st.sampled_from(["active", "active", "inactive", "maintenance"])))
        for w in WAREHOUSES
    }
    levels = [
        lv(p, w, draw(st.integers(0, 8)), draw(st.integers(0, 3)))
        for p in PRODUCTS
        for w in WAREHOUSES
        if draw(st.booleans())
    ]
    lines = draw(
        st.lists(
            st.builds(
                RequestedLine,
                st.sampled_from(PRODUCTS),
                st.integers(1, 10),
                st.one_of(st.none(), st.sampled_from(WAREHOUSES)),
            ),
            min_size=1,
            max_size=6,
        )
    )
    return lines, levels, whs


@settings(max_examples=100, deadline=None, database=None)
@given(allocation_cases())
def test_allocate_property(
    case: tuple[list[RequestedLine], list[StockLevel], dict[str, Warehouse]],
) -> None:
    """Allocation respects every rule, and fails exactly when the request cannot fit."""
    lines, levels, whs = case
    avail = {(x.product_id, x.warehouse_id): x.available for x in levels}
    unavailable_pin = any(
        x.warehouse_id is not None and not whs[x.warehouse_id].can_allocate for x in lines
    )
    short = set()
    for p in PRODUCTS:
        pinned = {
            w: sum(x.quantity for x in lines if x.product_id == p and x.warehouse_id == w)
            for w in WAREHOUSES
        }
        free = sum(v for (q, w), v in avail.items() if q == p and whs[w].can_allocate)
        loose = sum(x.quantity for x in lines if x.product_id == p and x.warehouse_id is None)
        if any(n > avail.get((p, w), 0) for w, n in pinned.items()) or (
            loose > free - sum(pinned.values())
        ):
            short.add(p)
    try:
        out = allocate(lines, levels, whs)
    except WarehouseUnavailable:
        assert unavailable_pin
        return
    except InsufficientStock as exc:
        assert not unavailable_pin
        details: Any = exc.details
        assert [d["product_id"] for d in details] == [
            p for p in dict.fromkeys(x.product_id for x in lines) if p in short
        ]
        for d in details:
            p = d["product_id"]
            assert d["requested"] == sum(x.quantity for x in lines if x.product_id == p)
            assert d["available"] == sum(
                v for (q, w), v in avail.items() if q == p and whs[w].can_allocate
            )
        return
    assert not unavailable_pin
    assert not short
    for key, n in out.deltas().items():
        assert n <= avail[key]
        assert whs[key[1]].can_allocate
        assert out.rows[key].available == avail[key]
    # Each requested line maps to consecutive parts of its product summing to its quantity.
    parts = list(out.lines)
    for x in lines:
        got = 0
        while got < x.quantity:
            part = parts.pop(0)
            assert part.product_id == x.product_id
            if x.warehouse_id is not None:
                assert part.warehouse_id == x.warehouse_id
            got += part.quantity
        assert got == x.quantity
    assert parts == []


# --- state machine --------------------------------------------------------------------


class StockMachine(RuleBasedStateMachine):
    """A stock row under receive/remove/set/reserve/commit/release/expire, with a clock."""

    def __init__(self) -> None:
        super().__init__()
        self.level = StockLevel("p1", "w1")
        self.reservations: dict[uuid.UUID, Reservation] = {}
        self.changes = 0
        self.now = T0
        self.serial = 0

    def _apply(self, change: tuple[StockLevel, Any]) -> None:
        new, movement = change
        assert new.version == self.level.version + 1
        assert movement.version == new.version
        assert (movement.quantity, movement.reserved) == (new.quantity, new.reserved)
        assert movement.quantity_delta == new.quantity - self.level.quantity
        assert movement.reserved_delta == new.reserved - self.level.reserved
        self.level = new
        self.changes += 1

    def _pick(self, index: int) -> Reservation:
        ids = sorted(self.reservations)
        return self.reservations[ids[index % len(ids)]]

    @rule(n=st.integers(1, 20))
    def receive(self, n: int) -> None:
        self._apply(self.level.adjust(n))

    @rule(n=st.integers(1, 20))
    def remove(self, n: int) -> None:
        if n > self.level.available:
            with pytest.raises(InsufficientStock):
                self.level.adjust(-n)
        else:
            self._apply(self.level.adjust(-n))

    @rule(q=st.integers(0, 40))
    def set_quantity(self, q: int) -> None:
        if q < self.level.reserved:
            with pytest.raises(InsufficientStock):
                self.level.set_quantity(q)
            return
        change = self.level.set_quantity(q)
        if change is None:
            assert q == self.level.quantity
            assert self.level.exists
        else:
            self._apply(change)

    @rule(n=st.integers(1, 15), ttl=st.integers(1, 30))
    def reserve(self, n: int, ttl: int) -> None:
        self.serial += 1
        rid = uuid.UUID(int=self.serial)
        if n > self.level.available:
            with pytest.raises(InsufficientStock):
                self.level.reserve(n, rid)
            return
        self._apply(self.level.reserve(n, rid))
        self.reservations[rid] = Reservation(
            rid,
            ReservationStatus.ACTIVE,
            (ReservationLine("p1", "w1", n),),
            None,
            self.now,
            self.now + timedelta(seconds=ttl),
        )

    @rule(seconds=st.integers(1, 20))
    def tick(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    def _finish(self, index: int, target: ReservationStatus) -> None:
        r = self._pick(index)
        due = self.now >= r.expires_at
        if r.status is target:
            assert r.finish(target, self.now) is None
            return
        if r.status is not ReservationStatus.ACTIVE:
            with pytest.raises(InvalidState) as info:
                r.finish(target, self.now)
            assert info.value.details == {"status": r.status.value}
            return
        if due != (target is ReservationStatus.EXPIRED):
            with pytest.raises(InvalidState) as info:
                r.finish(target, self.now)
            assert info.value.details == {"status": "expired" if due else "active"}
            return
        done = r.finish(target, self.now)
        assert done is not None
        assert done.status is target
        [line] = r.lines
        self._apply(self.level.unreserve(line.quantity, r.id, done.movement_kind()))
        self.reservations[r.id] = done

    @precondition(lambda self: self.reservations)
    @rule(index=st.integers(0, 1000))
    def commit(self, index: int) -> None:
        self._finish(index, ReservationStatus.COMMITTED)

    @precondition(lambda self: self.reservations)
    @rule(index=st.integers(0, 1000))
    def release(self, index: int) -> None:
        self._finish(index, ReservationStatus.RELEASED)

    @precondition(lambda self: self.reservations)
    @rule(index=st.integers(0, 1000))
    def expire(self, index: int) -> None:
        self._finish(index, ReservationStatus.EXPIRED)

    @precondition(lambda self: self.reservations)
    @rule(index=st.integers(0, 1000), ttl=st.integers(1, 30))
    def extend(self, index: int, ttl: int) -> None:
        r = self._pick(index)
        status = r.status_at(self.now)
        if status is not ReservationStatus.ACTIVE:
            with pytest.raises(InvalidState) as info:
                r.extend(ttl, self.now)
            assert info.value.details == {"status": status.value}
            return
        self.reservations[r.id] = r.extend(ttl, self.now)
        assert self.reservations[r.id].expires_at == self.now + timedelta(seconds=ttl)

    @invariant()
    def stock_bounds(self) -> None:
        assert 0 <= self.level.reserved <= self.level.quantity
        assert self.level.available == self.level.quantity - self.level.reserved

    @invariant()
    def reserved_matches_active_reservations(self) -> None:
        held = sum(
            line.quantity
            for r in self.reservations.values()
            if r.status is ReservationStatus.ACTIVE
            for line in r.lines
        )
        assert self.level.reserved == held

    @invariant()
    def version_counts_changes(self) -> None:
        assert self.level.version == self.changes


StockMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None, database=None
)
TestStockMachine = StockMachine.TestCase
