"""Product settings, product and reservation listings, bulk stock changes (SPEC: Products;
Bulk, listing and export)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from inventory.store.invariants import invariant_violations

MakeStock = Callable[..., Awaitable[tuple[str, list[str]]]]
NewId = Callable[[str], str]


def err(r: httpx.Response) -> str:
    code: str = r.json()["error"]["code"]
    return code


async def test_put_and_get_settings(client: httpx.AsyncClient, new_id: NewId) -> None:
    pid = new_id("prod")
    assert (await client.get(f"/v1/products/{pid}")).status_code == 404
    body = {"name": "Tee", "safety_stock": 2, "low_stock_threshold": 5, "max_per_customer": 3}
    r = await client.put(f"/v1/products/{pid}", json=body)
    assert r.status_code == 201, r.text
    assert r.json() == {
        "product_id": pid, **body, "components": None, "stock": None,
    }  # fmt: skip
    r = await client.put(f"/v1/products/{pid}", json={"name": "Tee 2"})
    assert r.status_code == 200
    got = (await client.get(f"/v1/products/{pid}")).json()
    assert got["name"] == "Tee 2"
    assert (got["safety_stock"], got["low_stock_threshold"], got["max_per_customer"]) == (
        0, None, None,
    )  # fmt: skip


async def test_product_body_has_stock(client: httpx.AsyncClient, make_stock: MakeStock) -> None:
    pid, [w] = await make_stock(7)
    got = (await client.get(f"/v1/products/{pid}")).json()
    assert got["name"] is None
    assert got["stock"]["quantity"] == 7
    assert got["stock"]["levels"][0]["warehouse_id"] == w
    assert got["stock"]["levels"][0]["updated_at"].endswith("Z")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"safety_stock": -1}, "safety_stock"),
        ({"max_per_customer": 0}, "max_per_customer"),
        ({"name": ""}, "name"),
        ({"components": []}, "components"),
        ({"components": [{"product_id": "x", "quantity": 1}] * 21}, "components"),
        ({"components": [{"product_id": "x", "quantity": 0}]}, "components[0].quantity"),
        ({"components": [{"product_id": "bad id", "quantity": 1}]}, "components[0].product_id"),
        ({"stock": 1}, "stock"),
    ],
)
async def test_settings_validation(
    client: httpx.AsyncClient, new_id: NewId, body: dict[str, Any], field: str
) -> None:
    pid = new_id("prod")
    r = await client.put(f"/v1/products/{pid}", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == field
    assert (await client.get(f"/v1/products/{pid}")).status_code == 404


async def test_kit_rules(client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId) -> None:
    a, [w] = await make_stock(10)
    b, _ = await make_stock(10)
    kit = new_id("kit")
    comps = [{"product_id": a, "quantity": 2}, {"product_id": b, "quantity": 1}]
    r = await client.put(f"/v1/products/{kit}", json={"components": comps})
    assert r.status_code == 201, r.text
    assert r.json()["components"] == comps
    # No stock rows for a kit, by either route; nothing written.
    r = await client.post(f"/v1/products/{kit}/stock/{w}/adjustments", json={"delta": 1})
    assert (r.status_code, err(r)) == (409, "is_kit")
    r = await client.put(f"/v1/products/{kit}/stock/{w}", json={"quantity": 1})
    assert (r.status_code, err(r)) == (409, "is_kit")
    kit_stock = (await client.get(f"/v1/products/{kit}/stock")).json()  # derived, no rows
    assert (kit_stock["kit"], "levels" in kit_stock) == (True, False)
    assert kit_stock["reservable"] == 5
    # The product body's ``stock`` is that same stock body, read alone or in a listing.
    assert (await client.get(f"/v1/products/{kit}")).json()["stock"] == kit_stock
    page = (await client.get("/v1/products", params={"after": kit[:-1], "limit": 1})).json()
    assert [(p["product_id"], p["stock"]) for p in page["products"]] == [(kit, kit_stock)]
    # Kits of kits, either way round, and a product with stock rows cannot be a kit.
    r = await client.put(
        f"/v1/products/{new_id('kit')}", json={"components": [{"product_id": kit, "quantity": 1}]}
    )
    assert (r.status_code, err(r)) == (409, "is_kit")
    r = await client.put(
        f"/v1/products/{a}", json={"components": [{"product_id": b, "quantity": 1}]}
    )
    assert (r.status_code, err(r)) == (409, "has_stock")
    c = new_id("plain")
    r = await client.put(f"/v1/products/{c}", json={"name": "c"})
    assert r.status_code == 201
    r = await client.put(
        f"/v1/products/{new_id('kit')}", json={"components": [{"product_id": c, "quantity": 1}]}
    )
    assert r.status_code == 201
    r = await client.put(
        f"/v1/products/{c}", json={"components": [{"product_id": a, "quantity": 1}]}
    )
    assert (r.status_code, err(r)) == (409, "is_component")
    for bad in (
        [{"product_id": kit, "quantity": 1}],
        [{"product_id": a, "quantity": 1}, {"product_id": a, "quantity": 2}],
    ):
        r = await client.put(f"/v1/products/{new_id('kit')}", json={"components": bad})
        assert r.status_code in (409, 422)
    r = await client.put(
        f"/v1/products/{kit}", json={"components": [{"product_id": kit, "quantity": 1}]}
    )
    assert (r.status_code, err(r)) == (409, "is_kit")  # a component that is a kit: itself


async def test_kit_and_first_row_race(
    client: httpx.AsyncClient, make_warehouse: Callable[..., Awaitable[str]], new_id: NewId
) -> None:
    """Making a product a kit while its first stock row is being created: one wins, and
    the database never ends with a kit that has rows."""
    w = await make_warehouse()
    comp = new_id("comp")
    for _ in range(10):
        pid = new_id("race")
        kit_put, row_put = await asyncio.gather(
            client.put(
                f"/v1/products/{pid}", json={"components": [{"product_id": comp, "quantity": 1}]}
            ),
            client.put(f"/v1/products/{pid}/stock/{w}", json={"quantity": 3}),
        )
        outcome = (kit_put.status_code, row_put.status_code)
        assert outcome in ((201, 409), (409, 200)), (kit_put.text, row_put.text)
        loser = row_put if outcome == (201, 409) else kit_put
        assert err(loser) == ("is_kit" if loser is row_put else "has_stock")
        body = (await client.get(f"/v1/products/{pid}")).json()
        assert (body["components"] is None) == ("levels" in body["stock"])  # kit: no rows


async def test_list_products_pages_in_byte_order(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    base = new_id("lst")
    ids = [f"{base}-B", f"{base}-a", f"{base}-C", f"{base}-b"]  # byte order: B < C < a < b
    await make_stock(1, product_id=ids[0])
    await make_stock(2, 3, product_id=ids[1])
    for pid in ids[2:]:
        r = await client.put(f"/v1/products/{pid}", json={"name": pid})
        assert r.status_code == 201
    seen: list[dict[str, Any]] = []
    after = f"{base}-"
    while True:
        r = await client.get("/v1/products", params={"after": after, "limit": 3})
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [p for p in page["products"] if p["product_id"].startswith(base)]
        if page["next_after"] is None or not page["next_after"].startswith(base):
            break
        after = page["next_after"]
    assert [p["product_id"] for p in seen] == sorted(ids, key=str.encode)
    assert seen[2]["stock"]["quantity"] == 5
    assert seen[0]["stock"]["quantity"] == 1
    assert seen[1]["stock"] is None
    r = await client.get("/v1/products", params={"limit": 0})
    assert r.status_code == 422
    r = await client.get("/v1/products", params={"after": "bad id"})
    assert r.status_code == 422


async def test_list_reservations(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    pid, _ = await make_stock(100)
    ref = new_id("order")
    made = []
    for _ in range(5):
        r = await client.post(
            "/v1/reservations",
            json={"lines": [{"product_id": pid, "quantity": 1}], "reference": ref},
        )
        assert r.status_code == 201
        made.append(r.json()["id"])
    await client.post(f"/v1/reservations/{made[1]}/commit")
    got: list[str] = []
    after = None
    while True:
        params = {"reference": ref, "limit": "2", **({"after": after} if after else {})}
        r = await client.get("/v1/reservations", params=params)
        assert r.status_code == 200, r.text
        got += [x["id"] for x in r.json()["reservations"]]
        after = r.json()["next_after"]
        if after is None:
            break
    assert got == made
    r = await client.get("/v1/reservations", params={"reference": ref, "status": "committed"})
    assert [x["id"] for x in r.json()["reservations"]] == [made[1]]
    assert r.json()["reservations"][0]["lines"] == [
        {"product_id": pid, "warehouse_id": r.json()["reservations"][0]["lines"][0][
            "warehouse_id"], "quantity": 1}
    ]  # fmt: skip
    for bad in ({"status": "done"}, {"after": "nope"}, {"limit": "1001"}, {"reference": ""}):
        r = await client.get("/v1/reservations", params=bad)
        assert (r.status_code, err(r)) == (422, "validation_error"), bad


async def test_list_reservations_by_customer(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    """``customer_id`` selects that customer's reservations only (oldest first, paged,
    with the other filters); one never named is an empty list, not an error."""
    pid, _ = await make_stock(100)
    alice, bob = new_id("alice"), new_id("bob")
    made: dict[str, list[str]] = {alice: [], bob: []}
    for customer in (alice, bob, alice, alice, bob):
        r = await client.post(
            "/v1/reservations",
            json={"lines": [{"product_id": pid, "quantity": 1}], "customer_id": customer},
        )
        assert r.status_code == 201, r.text
        made[customer].append(r.json()["id"])
    await client.post(f"/v1/reservations/{made[alice][1]}/release")

    async def listed(**params: str) -> list[str]:
        got: list[str] = []
        after: str | None = None
        while True:
            page = {"limit": "2", **params, **({"after": after} if after else {})}
            r = await client.get("/v1/reservations", params=page)
            assert r.status_code == 200, r.text
            got += [x["id"] for x in r.json()["reservations"]]
            after = r.json()["next_after"]
            if after is None:
                return got

    assert await listed(customer_id=alice) == made[alice]
    assert await listed(customer_id=bob) == made[bob]
    assert await listed(customer_id=alice, status="released") == [made[alice][1]]
    assert await listed(customer_id=alice, status="active") == [made[alice][0], made[alice][2]]
    assert await listed(customer_id=new_id("nobody")) == []
    for bad in ("", "x" * 129):
        r = await client.get("/v1/reservations", params={"customer_id": bad})
        assert (r.status_code, err(r)) == (422, "validation_error"), bad
        assert r.json()["error"]["details"] == {"field": "customer_id"}


async def test_bulk_per_item_results(
    client: httpx.AsyncClient,
    make_stock: MakeStock,
    make_warehouse: Callable[..., Awaitable[str]],
    new_id: NewId,
    db_pool: asyncpg.Pool,
) -> None:
    pid, [w] = await make_stock(5)
    fresh = new_id("fresh")
    items = [
        {"product_id": pid, "warehouse_id": w, "delta": 3},
        {"product_id": pid, "warehouse_id": w, "delta": -100},
        {"product_id": pid, "warehouse_id": w, "quantity": 2, "expected_version": 2},
        {"product_id": pid, "warehouse_id": "no-such-wh", "delta": 1},
        {"product_id": fresh, "warehouse_id": w, "quantity": 4, "reason": "count"},
        {"product_id": pid, "warehouse_id": w, "quantity": 2},
        {"product_id": pid, "warehouse_id": w, "delta": 1, "expected_version": 1},
    ]
    r = await client.post("/v1/stock/bulk", json={"items": items})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == list(range(len(items)))
    assert [x["status"] for x in results] == [200, 409, 200, 404, 200, 200, 409]
    assert results[0]["level"]["quantity"] == 8
    assert results[0]["level"]["version"] == 2
    assert results[1]["error"]["code"] == "insufficient_stock"
    assert results[2]["level"]["version"] == 3
    assert results[3]["error"]["code"] == "not_found"
    assert results[4]["level"] == {**results[4]["level"], "quantity": 4, "version": 1}
    assert results[5]["level"]["version"] == 3  # no change, no new version
    assert results[6]["error"] == {
        "code": "version_conflict",
        "message": results[6]["error"]["message"],
        "details": {"current_version": 3},
    }
    stock = (await client.get(f"/v1/products/{pid}/stock")).json()
    assert stock["levels"][0]["quantity"] == 2
    moves = (await client.get(f"/v1/products/{pid}/movements")).json()["movements"]
    assert [m["version"] for m in moves] == [1, 2, 3]
    async with db_pool.acquire() as conn:
        violations = await invariant_violations(conn)
    assert not any(violations.values()), violations


async def test_bulk_atomic_all_or_none(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    pid, [w] = await make_stock(5)
    fresh = new_id("fresh")
    items = [
        {"product_id": fresh, "warehouse_id": w, "quantity": 9},
        {"product_id": pid, "warehouse_id": w, "delta": 1},
        {"product_id": pid, "warehouse_id": w, "delta": -10},
    ]
    r = await client.post("/v1/stock/bulk", json={"items": items, "atomic": True})
    assert (r.status_code, err(r)) == (409, "bulk_failed")
    results = r.json()["error"]["details"]["results"]
    assert [x["status"] for x in results] == [200, 200, 409]
    assert (await client.get(f"/v1/products/{fresh}/stock")).status_code == 404
    stock = (await client.get(f"/v1/products/{pid}/stock")).json()
    assert (stock["quantity"], stock["levels"][0]["version"]) == (5, 1)
    r = await client.post("/v1/stock/bulk", json={"items": items[:2], "atomic": True})
    assert r.status_code == 200
    assert [x["status"] for x in r.json()["results"]] == [200, 200]


@pytest.mark.parametrize(
    "body",
    [
        {"items": []},
        {"items": [{"product_id": "p", "warehouse_id": "w"}]},
        {"items": [{"product_id": "p", "warehouse_id": "w", "delta": 1, "quantity": 1}]},
        {"items": [{"product_id": "p", "warehouse_id": "w", "delta": 0}]},
        {"items": [{"product_id": "p", "warehouse_id": "w", "delta": 1, "reserved": 1}]},
        {"items": [{"product_id": "p", "warehouse_id": "w", "delta": 1}] * 1001},
    ],
)
async def test_bulk_validation(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    r = await client.post("/v1/stock/bulk", json=body)
    assert (r.status_code, err(r)) == (422, "validation_error"), r.text


async def test_bulk_body_limit_is_one_mib(client: httpx.AsyncClient) -> None:
    item = {"product_id": "p", "warehouse_id": "w", "delta": 1, "reason": "x" * 400}
    big = {"items": [item] * 1000}  # ~460 KiB: over the usual 64 KiB, under 1 MiB
    r = await client.post("/v1/stock/bulk", json=big)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["results"][0]["status"] == 404
    r = await client.post(
        "/v1/stock/bulk", content=b" " * (1024 * 1024 + 1),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert r.status_code == 413


async def test_bulk_on_a_kit_is_refused(
    client: httpx.AsyncClient, make_warehouse: Callable[..., Awaitable[str]], new_id: NewId
) -> None:
    w = await make_warehouse()
    kit = new_id("kit")
    r = await client.put(
        f"/v1/products/{kit}",
        json={"components": [{"product_id": new_id("c"), "quantity": 1}]},
    )
    assert r.status_code == 201
    r = await client.post(
        "/v1/stock/bulk", json={"items": [{"product_id": kit, "warehouse_id": w, "delta": 1}]}
    )
    assert r.json()["results"][0]["error"]["code"] == "is_kit"
    assert r.json()["results"][0]["status"] == 409
