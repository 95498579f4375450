"""Redis key and channel names (:mod:`realtime.keys`): no collisions, one slot per product."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import replace
from redis.crc import key_slot

from inventory.config import Settings
from inventory.ops.app import create_app
from realtime.keys import RedisKeys

# The product id grammar of the API, plus characters it refuses (keys must not care).
ids = st.text(alphabet="abAB09._:-%{}/ é", min_size=1, max_size=40)


@settings(deadline=None)
@given(a=ids, b=ids)
def test_names_of_different_products_or_kinds_never_collide(a: str, b: str) -> None:
    keys = RedisKeys("inventory")
    names_a = {keys.lock(a), keys.fence(a), keys.stock_channel(a)}
    names_b = {keys.lock(b), keys.fence(b), keys.stock_channel(b)}
    assert len(names_a) == 3
    assert (names_a == names_b) == (a == b)
    if a != b:
        assert not names_a & names_b


@settings(deadline=None)
@given(product=ids)
def test_a_products_names_share_one_slot_and_the_channel_decodes(product: str) -> None:
    keys = RedisKeys("inventory")
    slots = {
        key_slot(name.encode()) for name in (*keys.lock_pair(product), keys.stock_channel(product))
    }
    assert len(slots) == 1
    assert keys.product_of_channel(keys.stock_channel(product).encode()) == product


def test_relay_keys_share_one_slot_and_foreign_channels_are_not_products() -> None:
    keys = RedisKeys("a:b{c}")
    assert len({key_slot(keys.relay(name).encode()) for name in ("lease", "cursor", "x:y")}) == 1
    assert keys.product_of_channel(b"a:b{c}:stock:{p}") is None
    assert keys.product_of_channel(RedisKeys("other").stock_channel("p").encode()) is None
    assert keys.lock("p:fence") != keys.fence("p")
    assert keys.lock("sku-1") == "a%3Ab%7Bc%7D:lock:{sku-1}"


@pytest.fixture
async def lock_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process app using the ``lock`` reservation strategy."""
    app = create_app(replace(settings, reserve_strategy="lock"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c


async def test_a_product_named_like_anothers_fence_reserves_with_the_lock_strategy(
    lock_client: httpx.AsyncClient,
    make_warehouse: Callable[..., Awaitable[str]],
    new_id: Callable[[str], str],
) -> None:
    # Before: the fence counter of product p was the lock key of product "p:fence", so
    # after one reservation of p every reservation of "p:fence" waited for a lock that
    # never expires (503 contention forever).
    base = new_id("p")
    wid = await make_warehouse()
    for pid in (base, f"{base}:fence"):
        r = await lock_client.put(f"/v1/products/{pid}/stock/{wid}", json={"quantity": 5})
        assert r.status_code == 200, r.text
    for pid in (base, f"{base}:fence"):
        body: dict[str, Any] = {"lines": [{"product_id": pid, "quantity": 1}]}
        r = await lock_client.post("/v1/reservations", json=body)
        assert r.status_code == 201, r.text
