"""Reservation endpoints over the ASGI app, against real PostgreSQL and Redis.

Covers the reservation rules of SPEC.md ("HTTP API" and "Decisions on the edge cases"):
body shape, commit/release/extend and their repeats, expiry (read-time and by the
sweeper), all-or-nothing allocation, validation, idempotency and inactive warehouses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from msgspec.structs import replace

from inventory.config import Settings
from inventory.ops.app import create_app

from .conftest import new_database
from .conftest import wait_until as wait_for

pytestmark = pytest.mark.asyncio

MakeStock = Callable[..., Awaitable[tuple[str, list[str]]]]
MakeWarehouse = Callable[..., Awaitable[str]]
NewId = Callable[[str], str]

RESERVATION_KEYS = {"id", "status", "lines", "reference", "created_at", "expires_at"}


# --- helpers ----------------------------------------------------------------------------


async def reserve(
    client: httpx.AsyncClient,
    lines: list[dict[str, Any]],
    *,
    key: str | None = None,
    **extra: Any,
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await client.post("/v1/reservations", json={"lines": lines, **extra}, headers=headers)


async def reserved_ok(client: httpx.AsyncClient, lines: list[dict[str, Any]], **extra: Any) -> Any:
    r = await reserve(client, lines, **extra)
    assert r.status_code == 201, r.text
    return r.json()


async def levels(client: httpx.AsyncClient, pid: str) -> dict[str, dict[str, Any]]:
    r = await client.get(f"/v1/products/{pid}/stock")
    assert r.status_code == 200, r.text
    return {lv["warehouse_id"]: lv for lv in r.json()["levels"]}


async def movements(client: httpx.AsyncClient, pid: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/products/{pid}/movements?limit=1000")
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["movements"]
    return items


def error(r: httpx.Response) -> tuple[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]["code"], body["error"]["details"]


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value)


def line(pid: str, quantity: int, wid: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"product_id": pid, "quantity": quantity}
    if wid is not None:
        out["warehouse_id"] = wid
    return out


async def set_status(client: httpx.AsyncClient, wid: str, status: str) -> None:
    r = await client.put(f"/v1/warehouses/{wid}", json={"name": wid, "status": status})
    assert r.status_code == 200, r.text


async def db_now(db_pool: asyncpg.Pool) -> datetime:
    value: datetime = await db_pool.fetchval("SELECT clock_timestamp()")
    return value


# --- both strategies: every test asking for ``client`` runs against each --------------


@pytest.fixture(scope="module", params=["optimistic", "lock"])
async def client(request: Any, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An app of the strategy (on the session database), for this module's tests and
    the conftest factories they use."""
    application = create_app(replace(settings, reserve_strategy=request.param))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c


# --- a second app on its own database, with the expiry sweeper parked -------------------


@pytest.fixture(scope="module")
async def parked(
    server_urls: tuple[str, str], redis_prefix: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Any, str]]:
    """(client, app, database url) of an app whose sweeper runs once an hour, on a
    scratch database no other sweeper touches: expired-but-not-yet-swept is stable."""
    async with new_database(server_urls[0], "inventory_parked") as url:
        settings = Settings(
            database_url=url,
            redis_url=server_urls[1],
            redis_prefix=f"{redis_prefix}-parked",
            sweep_interval=3600,
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                yield c, app, url


# --- create, read, commit, release, extend ----------------------------------------------


async def test_reserve_answers_201_with_the_reservation(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, [w1, w2] = await make_stock(10, 5)
    r = await reserve(client, [line(pid, 3)], reference="order-1", ttl_seconds=600)
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == RESERVATION_KEYS
    assert uuid.UUID(body["id"])
    assert body["status"] == "active"
    assert body["lines"] == [{"product_id": pid, "warehouse_id": w1, "quantity": 3}]
    assert body["reference"] == "order-1"
    assert ts(body["expires_at"]) - ts(body["created_at"]) == timedelta(seconds=600)
    got = await client.get(f"/v1/reservations/{body['id']}")
    assert got.status_code == 200
    assert got.json() == body
    stock = await levels(client, pid)
    assert (stock[w1]["reserved"], stock[w1]["available"], stock[w1]["version"]) == (3, 7, 2)
    assert (stock[w2]["reserved"], stock[w2]["version"]) == (0, 1)
    [*_, last] = await movements(client, pid)
    assert last["kind"] == "reserved"
    assert (last["warehouse_id"], last["quantity_delta"], last["reserved_delta"]) == (w1, 0, 3)
    assert (last["quantity"], last["reserved"], last["version"]) == (10, 3, 2)
    assert last["reservation_id"] == body["id"]
    # Defaults: 15 minutes, no reference.
    body = await reserved_ok(client, [line(pid, 1)])
    assert body["reference"] is None
    assert ts(body["expires_at"]) - ts(body["created_at"]) == timedelta(seconds=900)


async def test_commit_ships_stock_and_repeats(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, [wid] = await make_stock(10)
    res = await reserved_ok(client, [line(pid, 3)])
    r = await client.post(f"/v1/reservations/{res['id']}/commit")
    assert r.status_code == 200, r.text
    assert r.json() == {**res, "status": "committed"}
    stock = await levels(client, pid)
    assert (stock[wid]["quantity"], stock[wid]["reserved"], stock[wid]["version"]) == (7, 0, 3)
    again = await client.post(f"/v1/reservations/{res['id']}/commit")
    assert again.status_code == 200
    assert again.content == r.content
    assert (await client.get(f"/v1/reservations/{res['id']}")).json()["status"] == "committed"
    kinds = [(m["kind"], m["quantity_delta"], m["reserved_delta"]) for m in await movements(
        client, pid
    )]  # fmt: skip
    assert kinds == [("adjusted", 10, 0), ("reserved", 0, 3), ("committed", -3, -3)]
    # A committed reservation can be neither released nor extended.
    for action, payload in (("release", None), ("extend", {"ttl_seconds": 60})):
        r = await client.post(f"/v1/reservations/{res['id']}/{action}", json=payload)
        assert r.status_code == 409, r.text
        assert error(r) == ("invalid_state", {"status": "committed"})
    assert (await levels(client, pid))[wid]["version"] == 3


async def test_release_returns_stock_and_repeats(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, [wid] = await make_stock(10)
    res = await reserved_ok(client, [line(pid, 4)])
    r = await client.post(f"/v1/reservations/{res['id']}/release")
    assert r.status_code == 200, r.text
    assert r.json() == {**res, "status": "released"}
    stock = await levels(client, pid)
    assert (stock[wid]["quantity"], stock[wid]["reserved"], stock[wid]["version"]) == (10, 0, 3)
    again = await client.post(f"/v1/reservations/{res['id']}/release")
    assert again.status_code == 200
    assert again.content == r.content
    for action, payload in (("commit", None), ("extend", {"ttl_seconds": 60})):
        r = await client.post(f"/v1/reservations/{res['id']}/{action}", json=payload)
        assert r.status_code == 409, r.text
        assert error(r) == ("invalid_state", {"status": "released"})
    assert [m["kind"] for m in await movements(client, pid)] == [
        "adjusted", "reserved", "released",
    ]  # fmt: skip


async def test_extend_sets_lifetime_from_now(
    client: httpx.AsyncClient, make_stock: MakeStock, db_pool: asyncpg.Pool
) -> None:
    pid, [wid] = await make_stock(5)
    res = await reserved_ok(client, [line(pid, 2)], ttl_seconds=600)
    url = f"/v1/reservations/{res['id']}/extend"
    before = await db_now(db_pool)
    r = await client.post(url, json={"ttl_seconds": 3600})
    after = await db_now(db_pool)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {**res, "expires_at": body["expires_at"]}
    hour = timedelta(seconds=3600)
    assert before + hour <= ts(body["expires_at"]) <= after + hour
    # Extending may shorten.
    before = await db_now(db_pool)
    r = await client.post(url, json={"ttl_seconds": 30})
    after = await db_now(db_pool)
    short = ts(r.json()["expires_at"])
    assert before + timedelta(seconds=30) <= short <= after + timedelta(seconds=30)
    assert short < ts(res["expires_at"])
    assert (await client.get(f"/v1/reservations/{res['id']}")).json()["expires_at"] == r.json()[
        "expires_at"
    ]
    # Extending writes no stock change.
    assert (await levels(client, pid))[wid]["version"] == 2
    for payload, status in (
        ({"ttl_seconds": 0}, 422),
        ({"ttl_seconds": 86401}, 422),
        ({"ttl_seconds": 1.5}, 422),
        ({}, 422),
        ({"ttl_seconds": 60, "status": "active"}, 422),
    ):
        r = await client.post(url, json=payload)
        assert r.status_code == status, payload
        assert error(r)[0] == "validation_error"
    r = await client.post(url, content=b"{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert error(r)[0] == "invalid_json"
    assert (await client.post(f"/v1/reservations/{res['id']}/commit")).status_code == 200


async def test_past_deadline_reads_expired_before_the_sweep(
    parked: tuple[httpx.AsyncClient, Any, str], new_id: NewId
) -> None:
    c, app, url = parked
    wid, pid = new_id("wh"), new_id("sku")
    assert (await c.put(f"/v1/warehouses/{wid}", json={"name": "x", "status": "active"})).is_success
    assert (await c.put(f"/v1/products/{pid}/stock/{wid}", json={"quantity": 5})).is_success
    res = await reserved_ok(c, [line(pid, 2)], ttl_seconds=1)
    deadline = ts(res["expires_at"]).timestamp()

    async def past() -> bool:
        return time.time() > deadline + 0.05

    await wait_for(past, 5, "the deadline to pass")
    got = await c.get(f"/v1/reservations/{res['id']}")
    assert got.json()["status"] == "expired"
    # The sweeper is parked: the row still holds the stock and the database says active.
    assert (await levels(c, pid))[wid]["reserved"] == 2
    conn = await asyncpg.connect(url)
    try:
        stored = await conn.fetchval(
            "SELECT status FROM reservations WHERE id = $1", uuid.UUID(res["id"])
        )
    finally:
        await conn.close()
    assert stored == "active"
    for action, payload in (
        ("commit", None),
        ("release", None),
        ("extend", {"ttl_seconds": 600}),
    ):
        r = await c.post(f"/v1/reservations/{res['id']}/{action}", json=payload)
        assert r.status_code == 409, (action, r.text)
        assert error(r) == ("invalid_state", {"status": "expired"})
    assert (await levels(c, pid))[wid]["reserved"] == 2
    # The sweep returns the stock with ledger kind "expired".
    assert await app.state.runtime.expiry.expire_due() >= 1
    stock = (await levels(c, pid))[wid]
    assert (stock["quantity"], stock["reserved"], stock["version"]) == (5, 0, 3)
    last = (await movements(c, pid))[-1]
    assert (last["kind"], last["reserved_delta"], last["reservation_id"]) == (
        "expired", -2, res["id"],
    )  # fmt: skip
    for action in ("commit", "release"):
        r = await c.post(f"/v1/reservations/{res['id']}/{action}")
        assert error(r) == ("invalid_state", {"status": "expired"})


async def test_released_stock_is_reservable_at_once(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    """Selling out and releasing, then reserving again at once (no key, unpinned)."""
    pid, [wid] = await make_stock(2)
    res = await reserved_ok(client, [line(pid, 2)])
    r = await reserve(client, [line(pid, 1)])
    assert error(r) == ("insufficient_stock", [{"product_id": pid, "requested": 1, "available": 0}])
    assert (await client.post(f"/v1/reservations/{res['id']}/release")).status_code == 200
    again = await reserve(client, [line(pid, 1)])
    assert again.status_code == 201, again.text
    assert (await levels(client, pid))[wid]["reserved"] == 1


async def test_sweeper_returns_expired_stock_within_2s(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, [wid] = await make_stock(6)
    res = await reserved_ok(client, [line(pid, 4)], ttl_seconds=1)
    expires = ts(res["expires_at"]).timestamp()

    async def returned() -> bool:
        return bool((await levels(client, pid))[wid]["reserved"] == 0)

    await wait_for(returned, expires + 2.0 - time.time(), "the sweeper to return the stock")
    assert time.time() <= expires + 2.0
    assert (await levels(client, pid))[wid]["quantity"] == 6
    last = (await movements(client, pid))[-1]
    assert (last["kind"], last["quantity_delta"], last["reserved_delta"]) == ("expired", 0, -4)
    assert last["reservation_id"] == res["id"]
    assert (await client.get(f"/v1/reservations/{res['id']}")).json()["status"] == "expired"
    r = await client.post(f"/v1/reservations/{res['id']}/commit")
    assert r.status_code == 409
    assert error(r) == ("invalid_state", {"status": "expired"})


# --- allocation -------------------------------------------------------------------------


async def test_all_or_nothing(client: httpx.AsyncClient, make_stock: MakeStock) -> None:
    a, _ = await make_stock(5)
    b, _ = await make_stock(1, 1)
    c, _ = await make_stock(9)
    before = {p: (await levels(client, p), await movements(client, p)) for p in (a, b, c)}
    r = await reserve(client, [line(a, 3), line(b, 5)])
    assert r.status_code == 409, r.text
    assert error(r) == ("insufficient_stock", [{"product_id": b, "requested": 5, "available": 2}])
    r = await reserve(client, [line(a, 6), line(c, 1), line(b, 1), line(b, 2)])
    assert r.status_code == 409
    assert error(r) == (
        "insufficient_stock",
        [
            {"product_id": a, "requested": 6, "available": 5},
            {"product_id": b, "requested": 3, "available": 2},
        ],
    )
    after = {p: (await levels(client, p), await movements(client, p)) for p in (a, b, c)}
    assert after == before


async def test_unpinned_allocation_and_split(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, [w1, w2, w3] = await make_stock(4, 7, 6)
    res = await reserved_ok(client, [line(pid, 5)])
    assert [(x["warehouse_id"], x["quantity"]) for x in res["lines"]] == [(w2, 5)]
    # Left: w1 4, w2 2, w3 6 -> most available first.
    res = await reserved_ok(client, [line(pid, 11)])
    assert [(x["warehouse_id"], x["quantity"]) for x in res["lines"]] == [(w3, 6), (w1, 4), (w2, 1)]
    stock = await levels(client, pid)
    assert [stock[w]["available"] for w in (w1, w2, w3)] == [0, 1, 0]
    # Ties go to the smaller warehouse id.
    tie, whs = await make_stock(5, 5)
    res = await reserved_ok(client, [line(tie, 2)])
    assert res["lines"][0]["warehouse_id"] == min(whs)


async def test_pinned_lines_go_first(client: httpx.AsyncClient, make_stock: MakeStock) -> None:
    pid, [w1, w2] = await make_stock(5, 3)
    res = await reserved_ok(client, [line(pid, 4), line(pid, 3, w1)])
    assert [(x["warehouse_id"], x["quantity"]) for x in res["lines"]] == [
        (w2, 3), (w1, 1), (w1, 3),
    ]  # fmt: skip


async def test_lines_of_one_product_share_a_running_balance(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, [wid] = await make_stock(5)
    r = await reserve(client, [line(pid, 3), line(pid, 3)])
    assert r.status_code == 409
    assert error(r)[1] == [{"product_id": pid, "requested": 6, "available": 5}]
    res = await reserved_ok(client, [line(pid, 2), line(pid, 3, wid)])
    assert res["lines"] == [
        {"product_id": pid, "warehouse_id": wid, "quantity": 2},
        {"product_id": pid, "warehouse_id": wid, "quantity": 3},
    ]
    # Both lines landed on one row: one version bump, one ledger row with the sum.
    stock = (await levels(client, pid))[wid]
    assert (stock["reserved"], stock["version"]) == (5, 2)
    booked = [m for m in await movements(client, pid) if m["kind"] == "reserved"]
    assert [(m["reserved_delta"], m["version"]) for m in booked] == [(5, 2)]
    # Finishing it also writes one row per stock row.
    await client.post(f"/v1/reservations/{res['id']}/release")
    released = [m for m in await movements(client, pid) if m["kind"] == "released"]
    assert [(m["reserved_delta"], m["version"]) for m in released] == [(-5, 3)]


async def test_hundred_lines_on_one_row(client: httpx.AsyncClient, make_stock: MakeStock) -> None:
    pid, [wid] = await make_stock(100)
    res = await reserved_ok(client, [line(pid, 1)] * 100)
    assert len(res["lines"]) == 100
    stock = (await levels(client, pid))[wid]
    assert (stock["reserved"], stock["available"], stock["version"]) == (100, 0, 2)
    assert [m["reserved_delta"] for m in await movements(client, pid)] == [0, 100]


async def test_every_touched_row_gets_a_ledger_row_with_the_reservation(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    a, [a1, a2] = await make_stock(3, 2)
    b, [b1] = await make_stock(4)
    res = await reserved_ok(client, [line(a, 4), line(b, 1), line(b, 2, b1)])
    await client.post(f"/v1/reservations/{res['id']}/commit")
    for pid, expected in ((a, {a1: 3, a2: 1}), (b, {b1: 3})):
        moves = [m for m in await movements(client, pid) if m["reservation_id"] == res["id"]]
        assert sorted((m["kind"], m["warehouse_id"], m["reserved_delta"]) for m in moves) == sorted(
            [("reserved", w, n) for w, n in expected.items()]
            + [("committed", w, -n) for w, n in expected.items()]
        )
        for m in moves:
            assert m["quantity_delta"] == (m["reserved_delta"] if m["kind"] == "committed" else 0)


@pytest.mark.parametrize("status", ["inactive", "maintenance"])
async def test_pinned_to_unavailable_warehouse(
    client: httpx.AsyncClient, make_stock: MakeStock, status: str
) -> None:
    pid, [w1, w2] = await make_stock(5, 5)
    await set_status(client, w2, status)
    r = await reserve(client, [line(pid, 1), line(pid, 1, w2)])
    assert r.status_code == 409, r.text
    assert error(r) == ("warehouse_unavailable", {"warehouse_id": w2, "status": status})
    # Unpinned lines skip it.
    r = await reserve(client, [line(pid, 6)])
    assert error(r) == ("insufficient_stock", [{"product_id": pid, "requested": 6, "available": 5}])
    res = await reserved_ok(client, [line(pid, 5)])
    assert res["lines"][0]["warehouse_id"] == w1
    assert (await levels(client, pid))[w2]["version"] == 1


async def test_pinned_pair_without_stock_row(
    client: httpx.AsyncClient, make_stock: MakeStock, make_warehouse: MakeWarehouse
) -> None:
    pid, [w1] = await make_stock(5)
    await set_status(client, w1, "inactive")
    empty = await make_warehouse()
    r = await reserve(client, [line(pid, 1, empty)])
    assert r.status_code == 409
    assert error(r) == ("insufficient_stock", [{"product_id": pid, "requested": 1, "available": 0}])
    assert set(await levels(client, pid)) == {w1}


async def test_unknown_product_or_warehouse_is_404(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    pid, [wid] = await make_stock(2)
    ghost = new_id("sku")
    r = await reserve(client, [line(pid, 5), line(ghost, 1)])
    assert r.status_code == 404, r.text
    assert error(r)[0] == "not_found"
    r = await reserve(client, [line(pid, 5), line(pid, 1, new_id("wh"))])
    assert r.status_code == 404, r.text
    assert error(r)[0] == "not_found"
    assert (await levels(client, pid))[wid]["version"] == 1


# --- validation ---------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, Callable[[str], Any], int, str | None]] = [
    ("no-lines", lambda p: {"lines": []}, 422, "lines"),
    ("missing-lines", lambda p: {"ttl_seconds": 60}, 422, "lines"),
    ("qty-0", lambda p: {"lines": [line(p, 0)]}, 422, "lines[0].quantity"),
    ("qty-neg", lambda p: {"lines": [line(p, -1)]}, 422, "lines[0].quantity"),
    ("qty-big", lambda p: {"lines": [line(p, 1_000_001)]}, 422, "lines[0].quantity"),
    ("qty-float", lambda p: {"lines": [{"product_id": p, "quantity": 1.5}]}, 422, None),
    ("qty-str", lambda p: {"lines": [{"product_id": p, "quantity": "2"}]}, 422, None),
    ("qty-bool", lambda p: {"lines": [{"product_id": p, "quantity": True}]}, 422, None),
    ("101-lines", lambda p: {"lines": [line(p, 1)] * 101}, 422, "lines"),
    ("ttl-0", lambda p: {"lines": [line(p, 1)], "ttl_seconds": 0}, 422, "ttl_seconds"),
    ("ttl-big", lambda p: {"lines": [line(p, 1)], "ttl_seconds": 86401}, 422, "ttl_seconds"),
    ("unknown-top", lambda p: {"lines": [line(p, 1)], "status": "x"}, 422, "status"),
    (
        "unknown-line",
        lambda p: {"lines": [{"product_id": p, "quantity": 1, "reserved": 1}]},
        422,
        "lines[0].reserved",
    ),
    ("bad-product", lambda p: {"lines": [line("bad id", 1)]}, 422, "lines[0].product_id"),
    ("long-product", lambda p: {"lines": [line("x" * 129, 1)]}, 422, "lines[0].product_id"),
    # A final newline: Python's ``$`` matches before one, the schema must not.
    ("product-newline", lambda p: {"lines": [line(p + "\n", 1)]}, 422, "lines[0].product_id"),
    ("warehouse-newline", lambda p: {"lines": [line(p, 1, "w\n")]}, 422, "lines[0].warehouse_id"),
    ("bad-warehouse", lambda p: {"lines": [line(p, 1, "bad!")]}, 422, "lines[0].warehouse_id"),
    ("long-ref", lambda p: {"lines": [line(p, 1)], "reference": "r" * 256}, 422, "reference"),
    ("not-object", lambda p: [line(p, 1)], 422, None),
]


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [pytest.param(b, s, f, id=name) for name, b, s, f in BAD_BODIES],
)
async def test_bad_bodies_reserve_nothing(
    client: httpx.AsyncClient,
    make_stock: MakeStock,
    body: Callable[[str], Any],
    status: int,
    field: str | None,
) -> None:
    pid, [wid] = await make_stock(5)
    r = await client.post("/v1/reservations", json=body(pid))
    assert r.status_code == status, r.text
    code, details = error(r)
    assert code == "validation_error"
    if field is not None:
        assert details["field"] == field
    assert (await levels(client, pid))[wid]["version"] == 1


@pytest.mark.parametrize("raw", [b'{"lines": [', b"lines", b""], ids=["cut", "text", "empty"])
async def test_malformed_json_is_400(
    client: httpx.AsyncClient, make_stock: MakeStock, raw: bytes
) -> None:
    pid, [wid] = await make_stock(5)
    r = await client.post(
        "/v1/reservations", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert error(r)[0] == "invalid_json"
    assert (await levels(client, pid))[wid]["version"] == 1


@pytest.mark.parametrize(
    "key",
    [b"k" * 256, b"", b"tab\there", b"caf\xc3\xa9", b"del\x7f"],
    ids=["256-chars", "empty", "tab", "non-ascii", "del"],
)
async def test_bad_idempotency_key_is_422(
    client: httpx.AsyncClient, make_stock: MakeStock, key: bytes
) -> None:
    pid, [wid] = await make_stock(5)
    r = await client.post(
        "/v1/reservations", json={"lines": [line(pid, 1)]}, headers=[(b"Idempotency-Key", key)]
    )
    assert r.status_code == 422, r.text
    assert error(r) == ("validation_error", {"field": "Idempotency-Key"})
    assert (await levels(client, pid))[wid]["version"] == 1


async def test_longest_idempotency_key_is_accepted(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, _ = await make_stock(5)
    key = ("~ !" + uuid.uuid4().hex + "k" * 252)[:255]  # unique: both strategies run it
    assert len(key) == 255
    first = await reserve(client, [line(pid, 1)], key=key)
    assert first.status_code == 201, first.text
    again = await reserve(client, [line(pid, 1)], key=key)
    assert again.content == first.content


@pytest.mark.parametrize(
    "bad", ["not-a-uuid", "1234", "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz", "0" * 33]
)
async def test_malformed_reservation_id_is_422(client: httpx.AsyncClient, bad: str) -> None:
    for r in (
        await client.get(f"/v1/reservations/{bad}"),
        await client.post(f"/v1/reservations/{bad}/commit"),
        await client.post(f"/v1/reservations/{bad}/release"),
        await client.post(f"/v1/reservations/{bad}/extend", json={"ttl_seconds": 60}),
    ):
        assert r.status_code == 422, (r.request.url, r.text)
        assert error(r) == ("validation_error", {"field": "id"})


async def test_unknown_reservation_is_404(client: httpx.AsyncClient) -> None:
    rid = uuid.uuid4()
    for r in (
        await client.get(f"/v1/reservations/{rid}"),
        await client.post(f"/v1/reservations/{rid}/commit"),
        await client.post(f"/v1/reservations/{rid}/release"),
        await client.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 60}),
    ):
        assert r.status_code == 404, r.text
        assert error(r)[0] == "not_found"


# --- idempotency --------------------------------------------------------------------------


async def count_reservations(db_pool: asyncpg.Pool, reference: str) -> int:
    n: int = await db_pool.fetchval(
        "SELECT count(*) FROM reservations WHERE reference = $1", reference
    )
    return n


async def test_idempotent_replay(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId, db_pool: asyncpg.Pool
) -> None:
    pid, [wid] = await make_stock(10)
    key, ref = new_id("key"), new_id("ref")
    first = await reserve(client, [line(pid, 2)], key=key, reference=ref)
    assert first.status_code == 201
    ledger = await movements(client, pid)
    again = await reserve(client, [line(pid, 2)], key=key, reference=ref)
    assert again.status_code == 201
    assert again.content == first.content
    # Key order and white space do not matter.
    raw = f'{{ "reference" : "{ref}",\n "lines": [ {{"quantity": 2, "product_id": "{pid}"}} ] }}'
    r = await client.post(
        "/v1/reservations",
        content=raw.encode(),
        headers={"Idempotency-Key": key, "content-type": "application/json"},
    )
    assert (r.status_code, r.content) == (201, first.content)
    assert await movements(client, pid) == ledger
    assert (await levels(client, pid))[wid]["reserved"] == 2
    assert await count_reservations(db_pool, ref) == 1
    # A different body - including one that writes out a default - is refused.
    for lines, extra in (
        ([line(pid, 3)], {"reference": ref}),
        ([line(pid, 2)], {"reference": ref, "ttl_seconds": 900}),
        ([line(pid, 2, wid)], {"reference": ref}),
    ):
        r = await reserve(client, lines, key=key, **extra)
        assert r.status_code == 422, r.text
        assert error(r)[0] == "idempotency_key_reused"
    # ... and the original is still replayed.
    again = await reserve(client, [line(pid, 2)], key=key, reference=ref)
    assert (again.status_code, again.content) == (201, first.content)
    assert (await levels(client, pid))[wid]["reserved"] == 2
    assert await count_reservations(db_pool, ref) == 1
    # The same body without the key is a new reservation.
    assert (await reserve(client, [line(pid, 2)], reference=ref)).status_code == 201
    assert await count_reservations(db_pool, ref) == 2


async def test_concurrent_repeats_in_one_process(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId, db_pool: asyncpg.Pool
) -> None:
    """Repeats racing inside one process (they may share one combined batch)."""
    pid, [wid] = await make_stock(10)
    key, ref = new_id("key"), new_id("ref")
    answers = await asyncio.gather(
        *(reserve(client, [line(pid, 2)], key=key, reference=ref) for _ in range(10))
    )
    assert {(r.status_code, r.content) for r in answers} == {(201, answers[0].content)}
    assert await count_reservations(db_pool, ref) == 1
    assert (await levels(client, pid))[wid]["reserved"] == 2
    # Same key, different bodies, racing: one body wins, the others are refused.
    key = new_id("key")
    answers = await asyncio.gather(
        *(reserve(client, [line(pid, n)], key=key, reference=ref) for n in (1, 1, 3, 1, 3))
    )
    ok = [r for r in answers if r.status_code == 201]
    refused = [r for r in answers if r.status_code == 422]
    assert len(ok) + len(refused) == 5
    assert {r.content for r in ok} == {ok[0].content}
    assert {error(r)[0] for r in refused} == {"idempotency_key_reused"}
    won = ok[0].json()["lines"][0]["quantity"]
    assert len(ok) == (3 if won == 1 else 2)
    assert await count_reservations(db_pool, ref) == 2
    assert (await levels(client, pid))[wid]["reserved"] == 2 + won


async def test_correct_repeat_racing_a_wrong_body_still_replays(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    pid, [wid] = await make_stock(10)
    key = new_id("key")
    first = await reserve(client, [line(pid, 1)], key=key)
    assert first.status_code == 201
    wrong, right = await asyncio.gather(
        reserve(client, [line(pid, 2)], key=key), reserve(client, [line(pid, 1)], key=key)
    )
    assert error(wrong)[0] == "idempotency_key_reused"
    assert (await levels(client, pid))[wid]["reserved"] == 1
    assert (right.status_code, right.content) == (201, first.content)


async def test_replay_after_the_reservation_changed(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    pid, [wid] = await make_stock(10)
    key = new_id("key")
    first = await reserve(client, [line(pid, 2)], key=key)
    await client.post(f"/v1/reservations/{first.json()['id']}/commit")
    again = await reserve(client, [line(pid, 2)], key=key)
    assert (again.status_code, again.content) == (201, first.content)
    stock = (await levels(client, pid))[wid]
    assert (stock["quantity"], stock["reserved"]) == (8, 0)


async def test_409_is_stored_and_replayed(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    pid, [wid] = await make_stock(2)
    key = new_id("key")
    first = await reserve(client, [line(pid, 5)], key=key)
    assert first.status_code == 409
    assert error(first)[0] == "insufficient_stock"
    r = await client.post(f"/v1/products/{pid}/stock/{wid}/adjustments", json={"delta": 10})
    assert r.status_code == 200
    again = await reserve(client, [line(pid, 5)], key=key)
    assert (again.status_code, again.content) == (409, first.content)
    assert (await levels(client, pid))[wid]["reserved"] == 0
    # Without the key the same request now succeeds.
    assert (await reserve(client, [line(pid, 5)])).status_code == 201


async def test_404_is_stored_and_replayed(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    ghost, key = new_id("sku"), new_id("key")
    first = await reserve(client, [line(ghost, 1)], key=key)
    assert first.status_code == 404
    await make_stock(5, product_id=ghost)
    again = await reserve(client, [line(ghost, 1)], key=key)
    assert (again.status_code, again.content) == (404, first.content)
    assert sum(lv["reserved"] for lv in (await levels(client, ghost)).values()) == 0


async def test_rejected_requests_are_not_stored(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    pid, [wid] = await make_stock(5)
    key = new_id("key")
    r = await reserve(client, [line(pid, 0)], key=key)
    assert r.status_code == 422
    r = await client.post(
        "/v1/reservations",
        content=b"{",
        headers={"Idempotency-Key": key, "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    # A corrected retry with the same key runs.
    r = await reserve(client, [line(pid, 1)], key=key)
    assert r.status_code == 201, r.text
    assert (await levels(client, pid))[wid]["reserved"] == 1
    # A 422 for reusing the key is not stored either: the original stays.
    r = await reserve(client, [line(pid, 2)], key=key)
    assert error(r)[0] == "idempotency_key_reused"
    r2 = await reserve(client, [line(pid, 1)], key=key)
    assert r2.status_code == 201
    assert (await levels(client, pid))[wid]["reserved"] == 1


# --- warehouse status does not block finishing ----------------------------------------------


async def test_existing_reservations_work_after_warehouse_goes_inactive(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, [wid] = await make_stock(10)
    to_commit = await reserved_ok(client, [line(pid, 1)])
    to_release = await reserved_ok(client, [line(pid, 2)])
    to_extend = await reserved_ok(client, [line(pid, 3)])
    to_expire = await reserved_ok(client, [line(pid, 4)], ttl_seconds=1)
    await set_status(client, wid, "inactive")
    r = await reserve(client, [line(pid, 1, wid)])
    assert error(r)[0] == "warehouse_unavailable"
    r = await client.post(f"/v1/reservations/{to_commit['id']}/commit")
    assert (r.status_code, r.json()["status"]) == (200, "committed")
    r = await client.post(f"/v1/reservations/{to_release['id']}/release")
    assert (r.status_code, r.json()["status"]) == (200, "released")
    r = await client.post(f"/v1/reservations/{to_extend['id']}/extend", json={"ttl_seconds": 60})
    assert (r.status_code, r.json()["status"]) == (200, "active")

    async def expired() -> bool:
        r = await client.get(f"/v1/reservations/{to_expire['id']}")
        return bool(r.json()["status"] == "expired") and (
            (await levels(client, pid))[wid]["reserved"] == 3
        )

    await wait_for(expired, 4, "the reservation in the inactive warehouse to expire")
    stock = (await levels(client, pid))[wid]
    assert (stock["quantity"], stock["reserved"]) == (9, 3)
    kinds = {
        m["reservation_id"]: m["kind"]
        for m in await movements(client, pid)
        if m["kind"] != "reserved" and m["reservation_id"]
    }
    assert kinds == {
        to_commit["id"]: "committed",
        to_release["id"]: "released",
        to_expire["id"]: "expired",
    }


# --- a client that goes away --------------------------------------------------------------


async def test_client_disconnect_mid_body_is_not_a_server_error(app: Any) -> None:
    """A client that disconnects while sending its body gets no 500 and raises nothing
    out of the app (uvicorn would log that as an internal error)."""
    incoming = [
        {"type": "http.request", "body": b'{"lines": [{"product_id": "x", ', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/reservations",
        "raw_path": b"/v1/reservations", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    assert start["status"] == 400
