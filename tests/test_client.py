"""``inventory.client`` against real server processes: every route, retries, the stream."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid

import pytest

from inventory.client import (
    ApiError,
    AsyncClient,
    BulkItem,
    Client,
    Line,
    SignatureError,
    StreamMessage,
    verify_signature,
)

from .conftest import ServerFactory, wait_until


def _ids() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"cl-{tag}", f"clw-{tag}"


async def test_every_route(server_factory: ServerFactory) -> None:
    server = await server_factory()
    product, wh = _ids()

    def sync_part() -> None:
        with Client(server.base_url) as c:
            assert c.health()
            assert c.put_warehouse(wh, "Main", location="Here").location == "Here"
            assert c.get_warehouse(wh).name == "Main"
            assert wh in [w.id for w in c.list_warehouses()]
            level = c.adjust(product, wh, 10, reason="receive")
            assert (level.quantity, level.version) == (10, 1)
            assert c.set_quantity(product, wh, 12, expected_version=1).version == 2
            with pytest.raises(ApiError) as info:
                c.set_quantity(product, wh, 1, expected_version=1)
            assert (info.value.status, info.value.code) == (409, "version_conflict")
            assert info.value.details == {"current_version": 2}
            assert c.get_stock(product).available == 12
            assert [s.product_id for s in c.get_stocks([product])] == [product]
            page = c.movements(product)
            assert [m.version for m in page.items] == [1, 2]
            r = c.reserve([Line(product, 2)], ttl_seconds=60, reference="order-1")
            assert (r.status, r.lines[0].warehouse_id, r.replayed) == ("active", wh, False)
            assert c.get_reservation(r.id).reference == "order-1"
            assert c.extend(r.id, 120).status == "active"
            assert c.commit(r.id).status == "committed"
            assert c.commit(r.id).status == "committed"  # repeating answers 200
            r2 = c.reserve([{"product_id": product, "quantity": 1}], idempotency_key="k-" + wh)
            again = c.reserve([{"product_id": product, "quantity": 1}], idempotency_key="k-" + wh)
            assert (again.id, again.replayed) == (r2.id, True)
            assert c.release(r2.id).status == "released"
            listed = c.list_reservations(reference="order-1")
            assert [x.id for x in listed.items] == [r.id]
            kit = c.put_product(product + "-kit", components=[{"product_id": product,
                                                               "quantity": 2}])  # fmt: skip
            assert kit.components is not None
            assert kit.components[0].quantity == 2
            assert c.put_product(product, name="Tee", safety_stock=1).stock is not None
            assert c.get_product(product).name == "Tee"
            ids = [
                p.product_id for p in c.iter_products(limit=2) if p.product_id.startswith(product)
            ]
            assert ids == [product, product + "-kit"]
            results = c.bulk([BulkItem(product, wh, delta=1), BulkItem(product, wh, delta=-999)])
            assert [x.status for x in results] == [200, 409]
            assert results[1].error is not None
            assert results[1].error.code == "insufficient_stock"
            with pytest.raises(ApiError) as info:
                c.get_stock("no-such-" + product)
            assert info.value.status == 404

    await asyncio.to_thread(sync_part)

    async with AsyncClient(server.base_url) as c:
        assert await c.health()
        assert (await c.get_warehouse(wh)).id == wh
        assert (await c.adjust(product, wh, 5)).quantity == 16
        r = await c.reserve([Line(product, 1, wh)])
        assert (await c.get_reservation(r.id)).status == "active"
        assert (await c.release(r.id)).status == "released"
        assert (await c.list_reservations(status="released", reference=None)).items
        assert (await c.get_product(product)).safety_stock == 1
        assert [p.product_id async for p in c.iter_products()]
        first = await c.movements(product, after=0, limit=1)
        assert first.next_after == first.items[0].id
        assert first.items[0].quantity == 10


async def test_reserve_retries_keep_one_key(server_factory: ServerFactory) -> None:
    """A reservation retried after the server stopped answering is reserved once: the
    client sends the same Idempotency-Key on every attempt."""
    server = await server_factory()
    product, wh = _ids()
    async with AsyncClient(server.base_url, retries=40, max_retry_wait=0.5) as c:
        await c.put_warehouse(wh, wh)
        await c.adjust(product, wh, 3)
        first = await c.reserve([Line(product, 1)], idempotency_key="fixed-" + wh)
        await asyncio.to_thread(server.stop)
        restart = asyncio.create_task(asyncio.to_thread(server.start))
        again = await c.reserve([Line(product, 1)], idempotency_key="fixed-" + wh)
        await restart
        assert (again.id, again.replayed) == (first.id, True)
        assert (await c.get_stock(product)).reserved == 1


async def test_stream_resumes_with_since_after_a_restart(server_factory: ServerFactory) -> None:
    server = await server_factory()
    other = await server_factory()
    product, wh = _ids()
    seen: list[StreamMessage] = []
    async with AsyncClient(server.base_url) as c:
        await c.put_warehouse(wh, wh)
        await c.adjust(product, wh, 5)

        async def consume() -> None:
            async for message in c.stream([product]):
                seen.append(message)

        task = asyncio.create_task(consume())
        try:
            await wait_until(lambda: any(m.type == "subscribed" for m in seen), 10, "subscribed")
            await c.adjust(product, wh, 1)  # version 2
            await wait_until(
                lambda: any(m.type == "stock" and m.data["version"] == 2 for m in seen), 10, "v2"
            )
            await asyncio.to_thread(server.stop)
            mark = len(seen)
            async with AsyncClient(other.base_url) as o:  # changes while the server is down
                await o.adjust(product, wh, 1)  # version 3
                await o.adjust(product, wh, 1)  # version 4
            await asyncio.to_thread(server.start)

            def caught_up() -> bool:
                return any(
                    (m.type == "snapshot" and any(x["version"] == 4 for x in m.data["levels"]))
                    or (m.type == "stock" and m.data["version"] == 4)
                    for m in seen[mark:]
                )

            await wait_until(caught_up, 20, "version 4 after the restart")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    resumed = [m for m in seen[mark:] if m.type == "snapshot"]
    assert resumed, "the client resubscribed"
    # With since, the snapshot after the restart holds only rows newer than version 2.
    assert all(x["version"] > 2 for m in resumed for x in m.data["levels"])
    versions = [m.data["version"] for m in seen if m.type == "stock"]
    assert versions == sorted(versions)


def test_webhook_signature_verifier() -> None:
    body = b'{"id":"e1","type":"stock.changed"}'
    t = int(time.time())
    mac = hmac.new(b"s3cret", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert verify_signature("s3cret", f"t={t},v1={mac}", body) == t
    for header, secret, payload in (
        (f"t={t},v1={mac}", "wrong", body),
        (f"t={t},v1={mac}", "s3cret", body + b" "),
        (f"t={t - 1000},v1={mac}", "s3cret", body),
        ("v1=abc", "s3cret", body),
        ("", "s3cret", body),
    ):
        with pytest.raises(SignatureError):
            verify_signature(secret, header, payload)


async def test_loadtest_seed_goes_through_the_client(server_factory: ServerFactory) -> None:
    from loadtest.seed import HOT_STOCK, PRODUCT_STOCK, WAREHOUSES, seed

    server = await server_factory()
    rows = await asyncio.to_thread(seed, server.base_url, 4)
    assert rows == (4 + 3) * len(WAREHOUSES)
    async with AsyncClient(server.base_url) as c:
        stocks = await c.get_stocks(["lt-sku-4", "lt-hot-1"])
        assert [s.quantity for s in stocks] == [
            PRODUCT_STOCK * len(WAREHOUSES), HOT_STOCK * len(WAREHOUSES),
        ]  # fmt: skip
        await c.adjust("lt-sku-4", WAREHOUSES[0], 10)
        held = await c.reserve([Line("lt-sku-4", PRODUCT_STOCK + 10, WAREHOUSES[0])])
        # Setting 500 below the 510 reserved is a 409 for that row, which seeding keeps.
        assert await asyncio.to_thread(seed, server.base_url, 4) == rows
        assert (await c.get_stock("lt-sku-4")).levels[0].quantity == PRODUCT_STOCK + 10
        assert (await c.get_reservation(held.id)).status == "active"
