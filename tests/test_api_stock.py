"""Warehouse and stock endpoints over the ASGI app, against real PostgreSQL and Redis."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.asyncio


async def movements(client: httpx.AsyncClient, pid: str) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/products/{pid}/movements")
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["movements"]
    return items


JSON = {"Content-Type": "application/json"}


def error_code(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    code: str = body["error"]["code"]
    return code


async def test_warehouse_create_update_read(client: httpx.AsyncClient, new_id: Any) -> None:
    wid = new_id("wh")
    r = await client.put(f"/v1/warehouses/{wid}", json={"name": "A", "status": "active"})
    assert r.status_code == 201
    assert r.json() == {"id": wid, "name": "A", "location": None, "status": "active"}
    r = await client.put(
        f"/v1/warehouses/{wid}", json={"name": "B", "location": "Berlin", "status": "maintenance"}
    )
    assert r.status_code == 200
    r = await client.get(f"/v1/warehouses/{wid}")
    assert r.json() == {"id": wid, "name": "B", "location": "Berlin", "status": "maintenance"}
    r = await client.get("/v1/warehouses")
    assert wid in [w["id"] for w in r.json()["warehouses"]]
    assert (await client.get(f"/v1/warehouses/{new_id('wh')}")).status_code == 404


async def test_adjust_creates_row_and_ledger(
    client: httpx.AsyncClient, new_id: Any, make_warehouse: Callable[..., Awaitable[str]]
) -> None:
    wid, pid = await make_warehouse(), new_id("sku")
    r = await client.post(f"/v1/products/{pid}/stock/{wid}/adjustments", json={"delta": 7})
    assert r.status_code == 200
    assert r.json()["version"] == 1
    assert r.json()["quantity"] == 7
    r = await client.post(
        f"/v1/products/{pid}/stock/{wid}/adjustments",
        json={"delta": -2, "reason": "damaged", "expected_version": 1},
    )
    assert r.json()["version"] == 2
    assert r.json()["available"] == 5
    stock = (await client.get(f"/v1/products/{pid}/stock")).json()
    assert stock["quantity"] == 5
    assert stock["reservable"] == 5
    assert [m["quantity_delta"] for m in await movements(client, pid)] == [7, -2]
    assert [m["version"] for m in await movements(client, pid)] == [1, 2]


async def test_set_quantity_noop_writes_nothing(
    client: httpx.AsyncClient, make_stock: Callable[..., Awaitable[tuple[str, list[str]]]]
) -> None:
    pid, [wid] = await make_stock(4)
    r = await client.put(f"/v1/products/{pid}/stock/{wid}", json={"quantity": 4})
    assert r.status_code == 200
    assert r.json()["version"] == 1
    assert len(await movements(client, pid)) == 1
    r = await client.put(f"/v1/products/{pid}/stock/{wid}", json={"quantity": 9})
    assert r.json()["version"] == 2
    assert (await movements(client, pid))[-1]["quantity_delta"] == 5


async def test_stock_conflicts(
    client: httpx.AsyncClient,
    new_id: Any,
    make_warehouse: Callable[..., Awaitable[str]],
    make_stock: Callable[..., Awaitable[tuple[str, list[str]]]],
) -> None:
    pid, [wid] = await make_stock(3)
    url = f"/v1/products/{pid}/stock/{wid}"
    r = await client.post(f"{url}/adjustments", json={"delta": -4})
    assert r.status_code == 409
    assert error_code(r) == "insufficient_stock"
    assert r.json()["error"]["details"] == {
        "product_id": pid, "warehouse_id": wid, "requested": 4, "available": 3,
    }  # fmt: skip
    r = await client.post(f"{url}/adjustments", json={"delta": 1, "expected_version": 5})
    assert r.status_code == 409
    assert r.json()["error"]["details"] == {"current_version": 1}
    # A negative first delta on a missing row: 409 with available 0, no row created.
    other = await make_warehouse()
    r = await client.post(f"/v1/products/{pid}/stock/{other}/adjustments", json={"delta": -1})
    assert r.status_code == 409
    assert r.json()["error"]["details"]["available"] == 0
    r = await client.post(
        f"/v1/products/{pid}/stock/{other}/adjustments", json={"delta": 1, "expected_version": 3}
    )
    assert r.json()["error"]["details"] == {"current_version": None}
    assert len((await client.get(f"/v1/products/{pid}/stock")).json()["levels"]) == 1
    # Unknown warehouse -> 404, before any 409.
    r = await client.post(
        f"/v1/products/{pid}/stock/{new_id('wh')}/adjustments", json={"delta": -100}
    )
    assert r.status_code == 404
    # Setting on-hand below reserved is refused (reserve first).
    r = await client.post("/v1/reservations", json={"lines": [{"product_id": pid, "quantity": 2}]})
    assert r.status_code == 201
    r = await client.put(url, json={"quantity": 1})
    assert r.status_code == 409
    assert error_code(r) == "insufficient_stock"


async def test_product_404_and_bulk_stock(
    client: httpx.AsyncClient,
    new_id: Any,
    make_stock: Callable[..., Awaitable[tuple[str, list[str]]]],
) -> None:
    assert (await client.get(f"/v1/products/{new_id('sku')}/stock")).status_code == 404
    assert (await client.get(f"/v1/products/{new_id('sku')}/movements")).status_code == 404
    a, _ = await make_stock(1, 2)
    b, _ = await make_stock(3)
    missing = new_id("sku")
    r = await client.get(f"/v1/stock?product_ids={a},{b},{missing}")
    assert r.status_code == 200
    body = r.json()
    assert [(p["product_id"], p["quantity"]) for p in body["products"]] == [(a, 3), (b, 3)]
    assert body["missing"] == [missing]


async def test_reservable_counts_active_warehouses_only(
    client: httpx.AsyncClient, make_stock: Callable[..., Awaitable[tuple[str, list[str]]]]
) -> None:
    pid, [_, w2] = await make_stock(5, 7)
    await client.put(f"/v1/warehouses/{w2}", json={"name": w2, "status": "inactive"})
    body = (await client.get(f"/v1/products/{pid}/stock")).json()
    assert body["available"] == 12
    assert body["reservable"] == 5


async def test_movements_paging(
    client: httpx.AsyncClient, make_stock: Callable[..., Awaitable[tuple[str, list[str]]]]
) -> None:
    pid, [wid] = await make_stock(1)
    for _ in range(4):
        await client.post(f"/v1/products/{pid}/stock/{wid}/adjustments", json={"delta": 1})
    r = await client.get(f"/v1/products/{pid}/movements?limit=2")
    page = r.json()
    assert [m["version"] for m in page["movements"]] == [1, 2]
    r = await client.get(f"/v1/products/{pid}/movements?limit=2&after={page['next_after']}")
    assert [m["version"] for m in r.json()["movements"]] == [3, 4]


BAD_BODIES = [
    (b'{"delta": ', 400, "invalid_json"),
    (b"not json", 400, "invalid_json"),
    (b'{"delta": 0}', 422, "validation_error"),
    (b'{"delta": 1.5}', 422, "validation_error"),
    (b'{"delta": "5"}', 422, "validation_error"),
    (b'{"delta": true}', 422, "validation_error"),
    (b'{"delta": 99999999999999999999999999}', 422, "validation_error"),
    (b'{"delta": 1e400}', 422, "validation_error"),
    (b'{"delta": 1, "reserved": 5}', 422, "validation_error"),
    (b'{"delta": 1, "expected_version": -1}', 422, "validation_error"),
    (b"[1, 2]", 422, "validation_error"),
    (b"{}", 422, "validation_error"),
    (b"", 400, "invalid_json"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_BODIES)
async def test_bad_adjustment_bodies(
    client: httpx.AsyncClient,
    make_stock: Callable[..., Awaitable[tuple[str, list[str]]]],
    body: bytes,
    status: int,
    code: str,
) -> None:
    pid, [wid] = await make_stock(5)
    r = await client.post(f"/v1/products/{pid}/stock/{wid}/adjustments", content=body, headers=JSON)
    assert r.status_code == status, r.text
    assert error_code(r) == code
    assert len(await movements(client, pid)) == 1


async def test_validation_error_names_the_field(
    client: httpx.AsyncClient, make_stock: Callable[..., Awaitable[tuple[str, list[str]]]]
) -> None:
    pid, [wid] = await make_stock(5)
    r = await client.post(
        f"/v1/products/{pid}/stock/{wid}/adjustments", json={"delta": 1, "reserved": 3}
    )
    assert r.json()["error"]["details"]["field"] == "reserved"
    r = await client.put(f"/v1/products/{pid}/stock/{wid}", json={"quantity": -1})
    assert r.json()["error"]["details"]["field"] == "quantity"


async def test_body_too_large(
    client: httpx.AsyncClient, make_stock: Callable[..., Awaitable[tuple[str, list[str]]]]
) -> None:
    pid, [wid] = await make_stock(5)
    body = b'{"delta": 1, "reason": "' + b"x" * 70_000 + b'"}'
    r = await client.post(f"/v1/products/{pid}/stock/{wid}/adjustments", content=body, headers=JSON)
    assert r.status_code == 413
    assert error_code(r) == "payload_too_large"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/products/bad%20id/stock",
        "/v1/products/" + "x" * 129 + "/stock",
        "/v1/warehouses/bad!id",
        "/v1/products/ok/movements?limit=0",
        "/v1/products/ok/movements?limit=100000",
        "/v1/products/ok/movements?after=-1",
        "/v1/products/ok/movements?limit=abc",
        "/v1/stock?product_ids=",
        "/v1/stock?product_ids=a,b%20c",
    ],
)
async def test_bad_ids_and_params_are_422(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 422, r.text
    assert error_code(r) == "validation_error"


async def test_too_many_products_in_bulk_query(client: httpx.AsyncClient) -> None:
    ids = ",".join(f"p{i}" for i in range(501))
    r = await client.get(f"/v1/stock?product_ids={ids}")
    assert r.status_code == 422


async def test_bad_warehouse_bodies(client: httpx.AsyncClient, new_id: Any) -> None:
    wid = new_id("wh")
    for body in (
        {"name": "x", "status": "closed"},
        {"name": "", "status": "active"},
        {"status": "active"},
        {"name": "x", "status": "active", "extra": 1},
    ):
        r = await client.put(f"/v1/warehouses/{wid}", json=body)
        assert r.status_code == 422, body
    assert (await client.get(f"/v1/warehouses/{wid}")).status_code == 404


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/nothing")
    assert r.status_code == 404
    assert error_code(r) == "not_found"
    r = await client.delete("/v1/warehouses")
    assert r.status_code == 405
    assert error_code(r) == "method_not_allowed"


async def test_operations_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    r = await client.get("/ready")
    assert r.status_code == 200
    assert r.json()["checks"] == {"postgres": True, "redis": True, "relay": True}
    r = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len((await client.get("/health")).headers["x-request-id"]) == 32
    # A request id the logs could be confused by (control characters, too long) is
    # replaced or cut, never echoed as given.
    r = await client.get("/health", headers={"X-Request-ID": "a\tb"})
    assert r.status_code == 200
    assert len(r.headers["x-request-id"]) == 32
    r = await client.get("/health", headers={"X-Request-ID": "x" * 500})
    assert r.headers["x-request-id"] == "x" * 128


async def test_openapi_document(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert "/v1/reservations" in doc["paths"]
    schema = doc["components"]["schemas"]["AdjustmentIn"]
    assert schema["additionalProperties"] is False
    assert "delta" in schema["required"]


async def test_unexpected_error_is_json_500_with_request_id() -> None:
    from starlette.types import Receive, Scope, Send

    from inventory.http.middleware import RequestMiddleware

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    transport = httpx.ASGITransport(app=RequestMiddleware(broken))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/x", headers={"X-Request-ID": "req-500"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "req-500"
    assert error_code(r) == "internal_error"


async def test_metrics_count_requests_by_route_template(
    client: httpx.AsyncClient, make_stock: Callable[..., Awaitable[tuple[str, list[str]]]]
) -> None:
    def series(text: str, name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in text.splitlines():
            head = line.split(" ", 1)[0]
            if head.split("{")[0] == name and all(p in head for p in want.split(",")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    pid, _ = await make_stock(5)
    stock = {"method": "GET", "route": "/v1/products/{product_id}/stock", "status": "200"}
    missing = {"method": "GET", "route": "unmatched", "status": "404"}
    odd = {"method": "OTHER", "route": "unmatched", "status": "404"}
    before = (await client.get("/metrics")).text
    for _ in range(3):
        assert (await client.get(f"/v1/products/{pid}/stock")).status_code == 200
    assert (await client.get(f"/no/such/{pid}")).status_code == 404
    assert (await client.request("BREW", f"/no/such/{pid}")).status_code == 404
    body = {"lines": [{"product_id": pid, "quantity": 1}]}
    assert (await client.post("/v1/reservations", json=body)).status_code == 201
    after = (await client.get("/metrics")).text
    name = "inventory_http_requests_total"
    assert series(after, name, **stock) - series(before, name, **stock) == 3
    assert series(after, name, **missing) - series(before, name, **missing) == 1
    assert series(after, name, **odd) - series(before, name, **odd) == 1
    assert pid not in after  # ids never become labels
    members = "inventory_reservation_batch_members_total"
    assert series(after, members) - series(before, members) == 1
