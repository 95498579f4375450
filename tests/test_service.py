"""The service layer's rules on the store interface: reserve, commit, release, expire,
idempotency, stock changes, purchase limits and kits.

Most tests run twice: on :class:`~inventory.store.memory.MemoryStore` (no database, a
few milliseconds) and on the PostgreSQL store, so the memory store is held to what the
real one does. Those that move the clock (expiry, the purge) or set product rules
directly run on the memory store only; the PostgreSQL side of those is in
tests/test_expiry.py and tests/test_commerce.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from inventory.domain.commerce import (
    CustomerRequired,
    IsKit,
    KitComponent,
    ProductRules,
    PurchaseLimitExceeded,
)
from inventory.domain.model import (
    IdempotencyKeyReused,
    InsufficientStock,
    InvalidState,
    InventoryError,
    MovementKind,
    NotFound,
    RequestedLine,
    Reservation,
    ReservationStatus,
    VersionConflict,
    Warehouse,
    WarehouseStatus,
)
from inventory.service.expiry import Expiry
from inventory.service.idempotency import Idempotency, Replay, body_hash
from inventory.service.inventory import InventoryService
from inventory.store.memory import MemoryStore
from inventory.store.pg import Store, connect
from inventory.store.port import InventoryStore

pytestmark = pytest.mark.asyncio

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture
def memory() -> MemoryStore:
    return MemoryStore(T0)


@pytest.fixture
async def postgres(database_url: str) -> AsyncIterator[Store]:
    pg = await connect(database_url, min_size=1, max_size=4, timeout=10)
    try:
        yield pg
    finally:
        await pg.close()


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest, memory: MemoryStore) -> InventoryStore:
    """Each store in turn; PostgreSQL (and its server) only when asked for."""
    if request.param == "memory":
        return memory
    pg: Store = request.getfixturevalue("postgres")
    return pg


async def _service(store: InventoryStore) -> AsyncIterator[InventoryService]:
    service = InventoryService(store, lanes=2)
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
async def service(store: InventoryStore) -> AsyncIterator[InventoryService]:
    async for s in _service(store):
        yield s


@pytest.fixture
async def on_memory(memory: MemoryStore) -> AsyncIterator[InventoryService]:
    async for s in _service(memory):
        yield s


@pytest.fixture
def ids() -> Callable[[str], str]:
    """Unique ids: the PostgreSQL runs share one database."""
    suffix = uuid.uuid4().hex[:10]
    return lambda name: f"{name}-{suffix}"


async def stock(service: InventoryService, product: str, warehouse: str, quantity: int) -> None:
    await service.put_warehouse(Warehouse(warehouse, warehouse, None, WarehouseStatus.ACTIVE))
    await service.change_stock(product, warehouse, quantity=quantity)


async def reserve(service: InventoryService, *lines: RequestedLine, **kw: Any) -> Reservation:
    result = await service.reserve(lines, kw.pop("ttl", 600), None, **kw)
    assert isinstance(result, Reservation)
    return result


async def ledger(service: InventoryService, product: str) -> list[dict[str, Any]]:
    return await service.movements(product, 0, 1000)


def assert_replays(rows: list[dict[str, Any]]) -> None:
    """Versions are contiguous per row and each ledger row records the running state."""
    running: dict[str, tuple[int, int, int]] = {}
    for m in rows:
        q, r, v = running.get(m["warehouse_id"], (0, 0, 0))
        q, r, v = q + m["quantity_delta"], r + m["reserved_delta"], v + 1
        assert (m["quantity"], m["reserved"], m["version"]) == (q, r, v), m
        running[m["warehouse_id"]] = (q, r, v)


async def test_reserve_commit_release_follow_the_state_machine(
    service: InventoryService, ids: Callable[[str], str]
) -> None:
    p, w = ids("p"), ids("w")
    await stock(service, p, w, 10)
    r = await reserve(service, RequestedLine(p, 3))
    assert r.status is ReservationStatus.ACTIVE
    assert [(x.warehouse_id, x.quantity) for x in r.lines] == [(w, 3)]
    [level], _ = await service.stock([p])
    assert (level.quantity, level.reserved, level.available) == (10, 3, 7)

    committed = await service.finish(r.id, ReservationStatus.COMMITTED)
    assert committed.status is ReservationStatus.COMMITTED
    again = await service.finish(r.id, ReservationStatus.COMMITTED)  # a repeat changes nothing
    assert again == committed
    with pytest.raises(InvalidState):
        await service.finish(r.id, ReservationStatus.RELEASED)
    assert (await service.get_reservation(r.id)).status is ReservationStatus.COMMITTED

    r2 = await reserve(service, RequestedLine(p, 2, w))
    await service.finish(r2.id, ReservationStatus.RELEASED)
    [level], _ = await service.stock([p])
    assert (level.quantity, level.reserved, level.version) == (7, 0, 5)
    rows = await ledger(service, p)
    kinds = ["adjusted", "reserved", "committed", "reserved", "released"]
    assert [m["kind"] for m in rows] == kinds
    assert_replays(rows)
    with pytest.raises(NotFound):
        await service.get_reservation(uuid.uuid4())


async def test_a_reservation_takes_every_line_or_none(
    service: InventoryService, ids: Callable[[str], str]
) -> None:
    a, b, w = ids("a"), ids("b"), ids("w")
    await stock(service, a, w, 5)
    await stock(service, b, w, 1)
    with pytest.raises(InsufficientStock) as refused:
        await reserve(service, RequestedLine(a, 2), RequestedLine(b, 2))
    assert refused.value.details == [{"product_id": b, "requested": 2, "available": 1}]
    levels, _ = await service.stock([a, b])
    assert [lv.reserved for lv in levels] == [0, 0]
    assert [m["kind"] for m in await ledger(service, a)] == ["adjusted"]
    with pytest.raises(NotFound):
        await reserve(service, RequestedLine(ids("none"), 1))


async def test_concurrent_reservations_never_oversell(
    service: InventoryService, ids: Callable[[str], str]
) -> None:
    p, w = ids("p"), ids("w")
    await stock(service, p, w, 15)
    outcomes = await asyncio.gather(
        *(service.reserve([RequestedLine(p, 1)], 600, None) for _ in range(40)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, Reservation) for o in outcomes) == 15
    assert all(isinstance(o, Reservation | InsufficientStock) for o in outcomes)
    [level], _ = await service.stock([p])
    assert (level.reserved, level.version) == (15, 16)
    assert_replays(await ledger(service, p))


def _idempotency(key: str, body: Any) -> Idempotency:
    def render(outcome: Reservation | InventoryError) -> tuple[int, bytes]:
        if isinstance(outcome, InventoryError):
            return outcome.status, outcome.code.encode()
        return 201, str(outcome.id).encode()

    return Idempotency("test", key, body_hash(body), render)


async def test_an_idempotency_key_replays_its_answer_and_refuses_another_body(
    service: InventoryService, ids: Callable[[str], str]
) -> None:
    p, w, key = ids("p"), ids("w"), ids("key")
    await stock(service, p, w, 10)
    body = {"lines": [{"product_id": p, "quantity": 2}]}
    lines = [RequestedLine(p, 2)]
    first = await service.reserve(lines, 600, None, _idempotency(key, body))
    assert isinstance(first, Reservation)
    # Repeats, also several at once (one batch): the stored answer, nothing reserved again.
    repeats = await asyncio.gather(
        *(service.reserve(lines, 600, None, _idempotency(key, body)) for _ in range(5))
    )
    assert set(repeats) == {Replay(201, str(first.id).encode())}
    with pytest.raises(IdempotencyKeyReused):
        await service.reserve([RequestedLine(p, 3)], 600, None, _idempotency(key, {"other": 1}))
    # A refusal is an answer too: stored, then replayed.
    short = ids("short")
    with pytest.raises(InsufficientStock):
        await service.reserve([RequestedLine(p, 99)], 600, None, _idempotency(short, 99))
    refused = await service.reserve([RequestedLine(p, 99)], 600, None, _idempotency(short, 99))
    assert refused == Replay(409, b"insufficient_stock")
    [level], _ = await service.stock([p])
    assert level.reserved == 2


async def test_a_keyed_request_for_a_sold_out_product_is_refused_without_a_batch(
    service: InventoryService, ids: Callable[[str], str]
) -> None:
    """Refused from memory, its 409 stored by one statement: a retry replays it (also
    after a restock), another body is 422, and a key answered before the sell-out keeps
    its first answer."""
    p, w = ids("p"), ids("w")
    await stock(service, p, w, 1)
    lines = [RequestedLine(p, 1)]
    early = await service.reserve(lines, 600, None, _idempotency(ids("early"), 1))
    assert isinstance(early, Reservation)
    with pytest.raises(InsufficientStock):  # this batch leaves p sold out
        await service.reserve(lines, 600, None)
    lanes = service.engine.lanes
    batches = lanes.batches
    late = ids("late")
    with pytest.raises(InsufficientStock):
        await service.reserve(lines, 600, None, _idempotency(late, 1))
    replay = await service.reserve(lines, 600, None, _idempotency(ids("early"), 1))
    assert replay == Replay(201, str(early.id).encode())
    with pytest.raises(IdempotencyKeyReused):
        await service.reserve([RequestedLine(p, 2)], 600, None, _idempotency(late, 2))
    # the same new key several times at once (one refusal batch): one stored answer
    twice = ids("twice")
    outcomes = await asyncio.gather(
        *(service.reserve(lines, 600, None, _idempotency(twice, 1)) for _ in range(3)),
        service.reserve([RequestedLine(p, 2)], 600, None, _idempotency(twice, 2)),
        return_exceptions=True,
    )
    assert [type(o).__name__ for o in outcomes] == [
        "InsufficientStock", "Replay", "Replay", "IdempotencyKeyReused",
    ]  # fmt: skip
    assert lanes.batches == batches  # none of these took a place in a batch
    await service.change_stock(p, w, delta=5)
    again = await service.reserve(lines, 600, None, _idempotency(late, 1))
    assert again == Replay(409, b"insufficient_stock")
    [level], _ = await service.stock([p])
    assert level.reserved == 1


async def test_first_use_of_a_key_by_several_requests_at_once_reserves_once(
    service: InventoryService, ids: Callable[[str], str]
) -> None:
    p, w, key = ids("p"), ids("w"), ids("key")
    await stock(service, p, w, 10)
    outcomes = await asyncio.gather(
        *(service.reserve([RequestedLine(p, 1)], 600, None, _idempotency(key, 1)) for _ in range(6))
    )
    [reservation] = [o for o in outcomes if isinstance(o, Reservation)]
    replay = Replay(201, str(reservation.id).encode())
    assert all(o == replay for o in outcomes if o is not reservation)
    [level], _ = await service.stock([p])
    assert level.reserved == 1


async def test_stock_changes_check_warehouse_version_and_stock_in_order(
    service: InventoryService, ids: Callable[[str], str]
) -> None:
    p, w = ids("p"), ids("w")
    with pytest.raises(NotFound):
        await service.change_stock(p, w, delta=1)
    await stock(service, p, w, 5)
    with pytest.raises(VersionConflict):
        await service.change_stock(p, w, delta=1, expected_version=7)
    unchanged = await service.change_stock(p, w, quantity=5)  # a set that changes nothing
    assert unchanged.version == 1
    await reserve(service, RequestedLine(p, 4))
    with pytest.raises(InsufficientStock):
        await service.change_stock(p, w, delta=-2)  # only 1 available
    with pytest.raises(InsufficientStock):
        await service.change_stock(p, w, quantity=3)  # below the 4 reserved
    level = await service.change_stock(p, w, delta=-1, reason="damaged", expected_version=2)
    assert (level.quantity, level.reserved, level.version) == (4, 4, 3)
    assert (await ledger(service, p))[-1]["reason"] == "damaged"


async def test_expiry_releases_what_fell_due(
    on_memory: InventoryService, memory: MemoryStore
) -> None:
    service = on_memory
    await stock(service, "p", "w", 10)
    short = await reserve(service, RequestedLine("p", 3), ttl=60)
    long = await reserve(service, RequestedLine("p", 2), ttl=600)
    memory.now += timedelta(seconds=61)
    assert (await service.get_reservation(short.id)).status is ReservationStatus.EXPIRED
    with pytest.raises(InvalidState):  # due: too late to commit, before the sweeper ran
        await service.finish(short.id, ReservationStatus.COMMITTED)
    released: list[str] = []
    expiry = Expiry(memory, batch=1, on_released=released.extend)
    assert await expiry.expire_due() == 1
    assert released == ["p"]
    [level], _ = await service.stock(["p"])
    assert level.reserved == 2
    assert (await ledger(service, "p"))[-1]["kind"] == MovementKind.EXPIRED.value
    assert (await service.get_reservation(long.id)).status is ReservationStatus.ACTIVE
    extended = await service.extend(long.id, 30)
    assert extended.expires_at == memory.now + timedelta(seconds=30)
    memory.now += timedelta(seconds=31)
    assert await expiry.expire_due() == 1
    assert await expiry.expire_due() == 0
    assert_replays(await ledger(service, "p"))


async def test_old_idempotency_keys_are_purged_in_chunks(
    on_memory: InventoryService, memory: MemoryStore
) -> None:
    await stock(on_memory, "p", "w", 10)
    for i in range(5):
        await on_memory.reserve([RequestedLine("p", 1)], 600, None, _idempotency(f"k{i}", i))
    memory.now += timedelta(hours=2)
    await on_memory.reserve([RequestedLine("p", 1)], 600, None, _idempotency("fresh", 0))
    assert await Expiry(memory).purge(1, chunk=2) == 5


async def test_purchase_limits_count_what_the_customer_holds(
    on_memory: InventoryService, memory: MemoryStore
) -> None:
    memory.rules["p"] = ProductRules(max_per_customer=3)
    await stock(on_memory, "p", "w", 10)
    with pytest.raises(CustomerRequired):
        await reserve(on_memory, RequestedLine("p", 1))
    held = await reserve(on_memory, RequestedLine("p", 2), customer_id="ann")
    with pytest.raises(PurchaseLimitExceeded):
        await reserve(on_memory, RequestedLine("p", 2), customer_id="ann")
    await reserve(on_memory, RequestedLine("p", 2), customer_id="bob")
    await on_memory.finish(held.id, ReservationStatus.RELEASED)
    await reserve(on_memory, RequestedLine("p", 3), customer_id="ann")


async def test_safety_stock_and_kits(on_memory: InventoryService, memory: MemoryStore) -> None:
    memory.rules["a"] = ProductRules(safety_stock=2)
    memory.rules["kit"] = ProductRules(components=(KitComponent("a", 2), KitComponent("b", 1)))
    await stock(on_memory, "a", "w", 10)
    await stock(on_memory, "b", "w", 10)
    with pytest.raises(IsKit):
        await on_memory.change_stock("kit", "w", quantity=1)
    r = await reserve(on_memory, RequestedLine("kit", 2))
    assert sorted((x.product_id, x.quantity, x.kit_id) for x in r.lines) == [
        ("a", 4, "kit"),
        ("b", 2, "kit"),
    ]
    with pytest.raises(InsufficientStock):  # 6 left, 2 of them safety stock
        await reserve(on_memory, RequestedLine("a", 5))
    await reserve(on_memory, RequestedLine("a", 4))


async def test_a_transaction_that_fails_leaves_nothing(memory: MemoryStore) -> None:
    await memory.put_warehouse(Warehouse("w", "w", None, WarehouseStatus.ACTIVE))

    async def create_then_fail() -> None:
        async with memory.transaction() as tx:
            level = await memory.lock_level(tx, "p", "w")
            [_, movement] = level.adjust(5)
            await memory.insert_level(tx, movement)
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        await create_then_fail()
    assert await memory.levels(["p"]) == ([], {})
    assert await memory.movements("p", 0, 10) is None
