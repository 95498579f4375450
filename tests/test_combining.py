"""Request combining: the pure Combiner, and the reservation engine's batches (hot SKU,
many products, multi-line requests) against the real database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import pytest

from inventory.config import Settings
from inventory.domain.model import InsufficientStock, NotFound, RequestedLine, Reservation
from inventory.ops.check import check_database
from inventory.service.combining import Combiner
from inventory.service.engine import ReservationEngine, ReserveRequest
from tests.conftest import wait_until

StockFactory = Callable[..., Awaitable[tuple[str, list[str]]]]


async def test_batches_gather_what_arrives_while_one_is_in_flight() -> None:
    gate, started = asyncio.Event(), asyncio.Event()
    seen: list[list[int]] = []

    async def run(key: str, items: Sequence[int]) -> list[int]:
        seen.append(list(items))
        if len(seen) == 1:
            started.set()
            await gate.wait()
        return [x * 10 for x in items]

    combiner: Combiner[str, int, int] = Combiner(run)
    first = asyncio.create_task(combiner.submit("k", 1))
    await started.wait()
    rest = [asyncio.create_task(combiner.submit("k", i)) for i in range(2, 6)]
    await asyncio.sleep(0)
    gate.set()
    assert await first == 10
    assert [await t for t in rest] == [20, 30, 40, 50]
    assert seen == [[1], [2, 3, 4, 5]]


async def test_cancelled_waiting_member_is_not_applied() -> None:
    gate, started = asyncio.Event(), asyncio.Event()
    applied: list[int] = []

    async def run(key: str, items: Sequence[int]) -> list[int]:
        first_batch = not applied
        applied.extend(items)
        if first_batch:
            started.set()
            await gate.wait()
        return list(items)

    combiner: Combiner[str, int, int] = Combiner(run)
    leader = asyncio.create_task(combiner.submit("k", 1))
    await started.wait()
    waiting = asyncio.create_task(combiner.submit("k", 2))
    kept = asyncio.create_task(combiner.submit("k", 3))
    await asyncio.sleep(0)
    waiting.cancel()
    gate.set()
    assert await leader == 1
    assert await kept == 3
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert applied == [1, 3]


async def test_batch_failure_fails_every_member() -> None:
    async def run(key: str, items: Sequence[int]) -> list[int]:
        raise RuntimeError("database went away")

    combiner: Combiner[str, int, int] = Combiner(run)
    results = await asyncio.gather(
        *(combiner.submit("k", i) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_per_item_errors_go_to_their_item() -> None:
    async def run(key: str, items: Sequence[int]) -> list[int | BaseException]:
        return [ValueError(x) if x % 2 else x for x in items]

    combiner: Combiner[str, int, int] = Combiner(run)
    results = await asyncio.gather(
        *(combiner.submit("k", i) for i in range(4)), return_exceptions=True
    )
    assert results[0] == 0
    assert results[2] == 2
    assert isinstance(results[1], ValueError)
    assert isinstance(results[3], ValueError)


async def test_hot_sku_never_oversells(
    app: Any, client: httpx.AsyncClient, make_stock: StockFactory, database_url: str
) -> None:
    combiner = app.state.runtime.service.engine.lanes
    batches_before, items_before = combiner.batches, combiner.items
    pid, _ = await make_stock(60, 40)
    body = {"lines": [{"product_id": pid, "quantity": 1}]}
    answers = await asyncio.gather(
        *(client.post("/v1/reservations", json=body) for _ in range(300))
    )
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(201) == 100
    assert statuses.count(409) == 200
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 409} == {
        "insufficient_stock"
    }
    stock = (await client.get(f"/v1/products/{pid}/stock")).json()
    assert stock["reserved"] == 100
    assert stock["available"] == 0
    ids = {r.json()["id"] for r in answers if r.status_code == 201}
    assert len(ids) == 100
    moves = (await client.get(f"/v1/products/{pid}/movements?limit=1000")).json()["movements"]
    reserved = [m for m in moves if m["kind"] == "reserved"]
    assert {m["reservation_id"] for m in reserved} == ids
    for wid in {m["warehouse_id"] for m in moves}:
        versions = [m["version"] for m in moves if m["warehouse_id"] == wid]
        assert versions == list(range(1, len(versions) + 1))
    assert not any((await check_database(database_url)).values())
    # Requests were really combined: fewer batches than requests.
    assert combiner.batches - batches_before < (combiner.items - items_before) / 2


async def test_idempotent_replays_inside_a_batch(
    client: httpx.AsyncClient, make_stock: StockFactory, new_id: Callable[[str], str]
) -> None:
    pid, _ = await make_stock(50)
    body: dict[str, Any] = {"lines": [{"product_id": pid, "quantity": 2}]}
    key = new_id("key")
    same = [client.post("/v1/reservations", json=body, headers={"Idempotency-Key": key})]
    others = [client.post("/v1/reservations", json=body) for _ in range(5)]
    repeats = [
        client.post("/v1/reservations", json=body, headers={"Idempotency-Key": key})
        for _ in range(10)
    ]
    other_body = {"lines": [{"product_id": pid, "quantity": 3}]}
    mismatch = [client.post("/v1/reservations", json=other_body, headers={"Idempotency-Key": key})]
    answers = await asyncio.gather(*same, *others, *repeats, *mismatch)
    keyed = [answers[0], *answers[6:16]]
    assert {(r.status_code, r.content) for r in keyed} == {(201, answers[0].content)}
    assert answers[-1].status_code == 422
    assert answers[-1].json()["error"]["code"] == "idempotency_key_reused"
    stock = (await client.get(f"/v1/products/{pid}/stock")).json()
    assert stock["reserved"] == 2 * 6


async def test_sold_out_is_refused_and_restock_reopens(
    client: httpx.AsyncClient, make_stock: StockFactory
) -> None:
    pid, [wid] = await make_stock(1)
    body = {"lines": [{"product_id": pid, "quantity": 1}]}
    assert (await client.post("/v1/reservations", json=body)).status_code == 201
    refused = await client.post("/v1/reservations", json=body)
    assert refused.status_code == 409
    assert refused.json()["error"]["details"] == [
        {"product_id": pid, "requested": 1, "available": 0}
    ]
    r = await client.post(f"/v1/products/{pid}/stock/{wid}/adjustments", json={"delta": 1})
    assert r.status_code == 200
    assert (await client.post("/v1/reservations", json=body)).status_code == 201


async def test_one_batch_serves_many_products(
    app: Any,
    client: httpx.AsyncClient,
    make_stock: StockFactory,
    make_warehouse: Callable[..., Awaitable[str]],
    new_id: Callable[[str], str],
    database_url: str,
) -> None:
    """Requests for different products that arrive together share one transaction
    (one lane), and each still gets the answer it would get alone."""
    engine = ReservationEngine(app.state.runtime.store, lanes=1)
    plenty, [wa, wb] = await make_stock(5, 3)
    scarce, _ = await make_stock(2)
    empty, _ = await make_stock(0)
    closed = await make_warehouse(status="inactive")
    requests = [
        RequestedLine(plenty, 4),  # fits in wa (most available)
        RequestedLine(scarce, 1),
        RequestedLine(new_id("missing"), 1),  # no such product
        RequestedLine(scarce, 1),
        RequestedLine(plenty, 3, wb),  # pinned
        RequestedLine(scarce, 1),  # nothing left by now
        RequestedLine(empty, 1),
        RequestedLine(plenty, 1, new_id("nowhere")),  # no such warehouse
        RequestedLine(plenty, 1, closed),  # pinned to a warehouse without this product's row
        RequestedLine(plenty, 2),  # 1 left in wa, 0 in wb: split is not enough
    ]
    outcomes = await asyncio.gather(
        *(engine.reserve(ReserveRequest((line,), 60, None)) for line in requests),
        return_exceptions=True,
    )
    assert (engine.lanes.batches, engine.lanes.items) == (1, len(requests))
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == [
        "Reservation", "Reservation", "NotFound", "Reservation", "Reservation",
        "InsufficientStock", "InsufficientStock", "NotFound", "WarehouseUnavailable",
        "InsufficientStock",
    ], outcomes  # fmt: skip
    first = outcomes[0]
    assert isinstance(first, Reservation)
    assert [(x.warehouse_id, x.quantity) for x in first.lines] == [(wa, 4)]
    assert isinstance(outcomes[2], NotFound)
    assert isinstance(outcomes[9], InsufficientStock)
    levels = {
        (p, r["warehouse_id"]): (r["quantity"], r["reserved"])
        for p in (plenty, scarce)
        for r in (await client.get(f"/v1/products/{p}/stock")).json()["levels"]
    }
    assert levels[(plenty, wa)] == (5, 4)
    assert levels[(plenty, wb)] == (3, 3)
    assert sum(reserved for (p, _), (_, reserved) in levels.items() if p == scarce) == 2
    assert not any((await check_database(database_url)).values())


async def test_multi_line_requests_share_a_batch(
    app: Any,
    client: httpx.AsyncClient,
    make_stock: StockFactory,
    new_id: Callable[[str], str],
    database_url: str,
) -> None:
    """Multi-line requests over overlapping products, their lines in opposite orders,
    are combined into one transaction: each is allocated against what the earlier
    members left (running balance across requests and within one), all or nothing."""
    engine = ReservationEngine(app.state.runtime.store, lanes=1)
    p1, [w1] = await make_stock(5)
    p2, [w2] = await make_stock(5)
    p3, [w3] = await make_stock(3)
    requests = [
        (RequestedLine(p1, 2), RequestedLine(p2, 2)),
        (RequestedLine(p2, 2), RequestedLine(p1, 2)),  # opposite order
        (RequestedLine(p3, 2), RequestedLine(p1, 1), RequestedLine(p3, 1)),  # p3 twice
        (RequestedLine(p1, 1), RequestedLine(p2, 1)),  # p1 is gone by now: nothing taken
        (RequestedLine(p2, 1),),
        (RequestedLine(new_id("missing"), 1), RequestedLine(p2, 1)),
    ]
    outcomes = await asyncio.gather(
        *(engine.reserve(ReserveRequest(lines, 60, None)) for lines in requests),
        return_exceptions=True,
    )
    assert (engine.lanes.batches, engine.lanes.items) == (1, len(requests))
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == [
        "Reservation", "Reservation", "Reservation", "InsufficientStock", "Reservation",
        "NotFound",
    ], outcomes  # fmt: skip
    short = outcomes[3]
    assert isinstance(short, InsufficientStock)
    assert short.details == [{"product_id": p1, "requested": 1, "available": 0}]
    third = outcomes[2]
    assert isinstance(third, Reservation)
    assert [(x.product_id, x.quantity) for x in third.lines] == [(p3, 2), (p1, 1), (p3, 1)]
    for pid, wid, reserved in ((p1, w1, 5), (p2, w2, 5), (p3, w3, 3)):
        [level] = (await client.get(f"/v1/products/{pid}/stock")).json()["levels"]
        assert (level["warehouse_id"], level["reserved"]) == (wid, reserved)
    moves = (await client.get(f"/v1/products/{p3}/movements")).json()["movements"]
    booked = [(m["reserved_delta"], m["reservation_id"]) for m in moves if m["kind"] == "reserved"]
    assert booked == [(3, str(third.id))]  # two lines on one row: one ledger row
    assert not any((await check_database(database_url)).values())


async def test_opposite_multi_line_orders_under_load_never_deadlock(
    client: httpx.AsyncClient, make_stock: StockFactory, database_url: str
) -> None:
    """Many concurrent multi-line requests over a few products, half of them listing
    the products backwards: all answered (201 or 409), nothing oversold."""
    products = [(await make_stock(40, 40))[0] for _ in range(4)]
    bodies = []
    for i in range(160):
        chosen = [*products[i % 3 : i % 3 + 2], products[3]]
        if i % 2:
            chosen.reverse()
        bodies.append({"lines": [{"product_id": p, "quantity": 1 + i % 2} for p in chosen]})
    answers = await asyncio.gather(*(client.post("/v1/reservations", json=b) for b in bodies))
    assert {r.status_code for r in answers} <= {201, 409}, {r.text for r in answers}
    granted = [b for b, r in zip(bodies, answers, strict=True) if r.status_code == 201]
    assert granted
    for pid in products:
        stock = (await client.get(f"/v1/products/{pid}/stock")).json()
        wanted = sum(x["quantity"] for b in granted for x in b["lines"] if x["product_id"] == pid)
        assert stock["reserved"] == wanted <= 80
    assert not any((await check_database(database_url)).values())


@pytest.mark.parametrize(
    ("workers", "lanes", "per_process"), [(1, 4, 4), (2, 4, 2), (3, 4, 2), (4, 4, 1), (8, 4, 1)]
)
def test_lanes_are_split_over_the_workers(workers: int, lanes: int, per_process: int) -> None:
    """More workers must not mean more, smaller batches at the same load: the lanes
    are the server's, and every worker process learns how many workers there are."""
    settings = Settings(workers=workers, reserve_lanes=lanes)
    assert settings.process_lanes == per_process
    assert Settings.from_env(settings.to_env()).workers == workers


async def test_a_pending_item_past_its_timeout_is_withdrawn_not_applied() -> None:
    """An item queued behind a running batch gives up at its own ``pending_timeout`` and
    is never handed to a batch; an item whose batch already started is awaited to the
    end (the caller is never told "failed" about a write that then happens)."""
    release = asyncio.Event()
    seen: list[str] = []

    async def run(key: str, items: Sequence[str]) -> list[str]:
        seen.extend(items)
        await release.wait()
        return [f"done {x}" for x in items]

    combiner: Combiner[str, str, str] = Combiner(run)
    first = asyncio.create_task(combiner.submit("k", "a", pending_timeout=0.05))
    await wait_until(lambda: seen == ["a"], 2.0, "the first batch to start")
    with pytest.raises(TimeoutError):
        await combiner.submit("k", "b", pending_timeout=0.05)
    assert not first.done()  # in flight: not withdrawn although its timeout passed
    release.set()
    assert await first == "done a"
    assert await combiner.submit("k", "c") == "done c"
    assert seen == ["a", "c"]
    await combiner.close()
