"""Safety stock, purchase limits and kits through the reservation engine (SPEC: Products;
Flash-sale protections). Each error is answered per SPEC with nothing written."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx

from inventory.ops.check import check_database

MakeStock = Callable[..., Awaitable[tuple[str, list[str]]]]
NewId = Callable[[str], str]


def err(r: httpx.Response) -> str:
    code: str = r.json()["error"]["code"]
    return code


async def settings(client: httpx.AsyncClient, pid: str, **body: Any) -> None:
    r = await client.put(f"/v1/products/{pid}", json=body)
    assert r.status_code in (200, 201), r.text


async def reserve(
    client: httpx.AsyncClient, *lines: tuple[str, int], **extra: Any
) -> httpx.Response:
    body = {"lines": [{"product_id": p, "quantity": n} for p, n in lines], **extra}
    return await client.post("/v1/reservations", json=body)


async def stock(client: httpx.AsyncClient, pid: str) -> dict[str, Any]:
    r = await client.get(f"/v1/products/{pid}/stock")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_safety_stock_limits_reservable(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, _ = await make_stock(6, 4)
    await settings(client, pid, safety_stock=3, low_stock_threshold=7)
    body = await stock(client, pid)
    assert (body["available"], body["reservable"], body["low_stock"]) == (10, 7, True)
    r = await reserve(client, (pid, 8))
    assert r.status_code == 409
    assert r.json()["error"]["details"] == [{"product_id": pid, "requested": 8, "available": 7}]
    assert (await stock(client, pid))["reserved"] == 0
    r = await reserve(client, (pid, 4), (pid, 3))
    assert r.status_code == 201, r.text
    body = await stock(client, pid)
    assert (body["reserved"], body["reservable"]) == (7, 0)
    assert (await reserve(client, (pid, 1))).status_code == 409


async def test_safety_stock_holds_inside_a_combined_batch(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, _ = await make_stock(50)
    await settings(client, pid, safety_stock=20)
    answers = await asyncio.gather(*(reserve(client, (pid, 1)) for _ in range(60)))
    assert sum(r.status_code == 201 for r in answers) == 30
    assert {r.status_code for r in answers} == {201, 409}
    assert (await stock(client, pid))["reserved"] == 30


async def test_purchase_limit(client: httpx.AsyncClient, make_stock: MakeStock) -> None:
    pid, _ = await make_stock(100)
    other, _ = await make_stock(100)
    await settings(client, pid, max_per_customer=3)
    r = await reserve(client, (pid, 1), (other, 1))
    assert (r.status_code, err(r)) == (422, "customer_required")
    assert r.json()["error"]["details"]["product_id"] == pid
    assert (await reserve(client, (other, 1))).status_code == 201  # no limit there
    first = await reserve(client, (pid, 2), customer_id="alice")
    assert first.status_code == 201, first.text
    r = await reserve(client, (pid, 1), (pid, 1), customer_id="alice")
    assert (r.status_code, err(r)) == (409, "purchase_limit_exceeded")
    assert r.json()["error"]["details"] == {"product_id": pid, "limit": 3, "held": 2}
    assert (await stock(client, pid))["reserved"] == 2
    assert (await reserve(client, (pid, 3), customer_id="bob")).status_code == 201
    # released stops counting; committed keeps counting
    rid = first.json()["id"]
    assert (await client.post(f"/v1/reservations/{rid}/release")).status_code == 200
    r = await reserve(client, (pid, 3), customer_id="alice")
    assert r.status_code == 201, r.text
    assert (await client.post(f"/v1/reservations/{r.json()['id']}/commit")).status_code == 200
    r = await reserve(client, (pid, 1), customer_id="alice")
    assert r.json()["error"]["details"] == {"product_id": pid, "limit": 3, "held": 3}


async def test_customer_required_is_not_stored_for_idempotency(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    pid, _ = await make_stock(10)
    await settings(client, pid, max_per_customer=1)
    key = {"Idempotency-Key": new_id("k")}
    body = {"lines": [{"product_id": pid, "quantity": 1}]}
    r = await client.post("/v1/reservations", json=body, headers=key)
    assert (r.status_code, err(r)) == (422, "customer_required")
    r = await client.post("/v1/reservations", json={**body, "customer_id": "c"}, headers=key)
    assert r.status_code == 201, r.text


async def test_one_customer_racing_never_exceeds_limit(
    client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    pid, _ = await make_stock(1000)
    await settings(client, pid, max_per_customer=5)
    answers = await asyncio.gather(
        *(reserve(client, (pid, 1 + i % 2), customer_id="bot") for i in range(40))
    )
    codes = {r.status_code for r in answers}
    assert codes <= {201, 409}, [r.text for r in answers if r.status_code not in (201, 409)]
    held = sum(
        sum(x["quantity"] for x in r.json()["lines"]) for r in answers if r.status_code == 201
    )
    assert 4 <= held <= 5
    assert (await stock(client, pid))["reserved"] == held


async def test_kits(client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId) -> None:
    a, [wa] = await make_stock(10)
    b, _ = await make_stock(9)
    kit = new_id("kit")
    await settings(client, kit, components=[{"product_id": a, "quantity": 2},
                                            {"product_id": b, "quantity": 3}])  # fmt: skip
    body = await stock(client, kit)
    assert (body["kit"], body["reservable"]) == (True, 3)
    parts = [(c["product_id"], c["quantity"], c["stock"]["reservable"]) for c in body["components"]]
    assert parts == [(a, 2, 10), (b, 3, 9)]
    r = await reserve(client, (kit, 2), (a, 1))
    assert r.status_code == 201, r.text
    lines = [(x["product_id"], x["quantity"], x.get("kit_id")) for x in r.json()["lines"]]
    assert lines == [(a, 4, kit), (b, 6, kit), (a, 1, None)]
    got = (await client.get(f"/v1/reservations/{r.json()['id']}")).json()
    assert got["lines"] == r.json()["lines"]
    assert (await stock(client, kit))["reservable"] == 1
    r = await reserve(client, (kit, 2))  # b has 3 left: all or nothing
    assert (r.status_code, err(r)) == (409, "insufficient_stock")
    assert (await stock(client, a))["reserved"] == 5
    r = await client.post(f"/v1/products/{kit}/stock/{wa}/adjustments", json={"delta": 1})
    assert (r.status_code, err(r)) == (409, "is_kit")


async def test_kit_reservations_combine(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    a, _ = await make_stock(30)
    b, _ = await make_stock(30)
    kit = new_id("kit")
    await settings(client, kit, components=[{"product_id": a, "quantity": 1},
                                            {"product_id": b, "quantity": 2}])  # fmt: skip
    answers = await asyncio.gather(*(reserve(client, (kit, 1)) for _ in range(25)))
    assert sum(r.status_code == 201 for r in answers) == 15
    assert ((await stock(client, a))["reserved"], (await stock(client, b))["reserved"]) == (15, 30)


async def test_check_covers_commerce(database_url: str, client: httpx.AsyncClient) -> None:
    found = await check_database(database_url)
    for name in (
        "customers hold no more than max_per_customer",
        "every offered waitlist entry has its reservation",
        "kit lines sum to whole kits",
    ):
        assert found[name] == [], name


async def test_check_sees_a_limit_breach(scratch_database: str) -> None:
    """A breach written around the engine is reported (the check can fail)."""
    from inventory.store.migrate import migrate

    await migrate(scratch_database)
    conn = await asyncpg.connect(scratch_database)
    try:
        await conn.execute(
            """INSERT INTO products (product_id, max_per_customer) VALUES ('p', 1);
               INSERT INTO warehouses VALUES ('w', 'w', null, 'active');
               INSERT INTO reservations (id, status, expires_at, customer_id) VALUES
                 ('00000000-0000-0000-0000-000000000001', 'committed', now(), 'c');
               INSERT INTO reservation_lines VALUES
                 ('00000000-0000-0000-0000-000000000001', 1, 'p', 'w', 2, null)"""
        )
    finally:
        await conn.close()
    found = await check_database(scratch_database)
    assert len(found["customers hold no more than max_per_customer"]) == 1


async def test_check_sees_an_entry_left_waiting(scratch_database: str) -> None:
    """A head entry that stock could serve is reported once its product has been quiet
    for 5 s (an offer may take up to a second), and not while stock just changed."""
    from inventory.store.migrate import migrate

    await migrate(scratch_database)
    conn = await asyncpg.connect(scratch_database)
    try:
        await conn.execute(
            """INSERT INTO warehouses VALUES ('w', 'w', null, 'active');
               INSERT INTO stock_levels (product_id, warehouse_id, quantity, version)
               VALUES ('p', 'w', 3, 1);
               INSERT INTO waitlist (id, product_id, customer_id, quantity, hold_seconds,
                                     status, created_at, updated_at)
               VALUES ('00000000-0000-0000-0000-000000000001', 'p', 'c', 2, 60, 'waiting',
                       now() - interval '1 minute', now() - interval '1 minute')"""
        )
        name = "no waiting entry could have been offered"
        assert len((await check_database(scratch_database))[name]) == 1
        await conn.execute(
            """INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta,
                                      reserved_delta, quantity, reserved, version)
               VALUES ('p', 'w', 'adjusted', 0, 0, 3, 0, 1)"""
        )
        assert (await check_database(scratch_database))[name] == []  # stock just changed
    finally:
        await conn.close()


async def test_kit_stock_in_the_batch_read(
    client: httpx.AsyncClient, make_stock: MakeStock, new_id: NewId
) -> None:
    """``GET /v1/stock`` answers a kit with the body ``GET`` of the kit answers, in
    request order among the products; a kit is never ``missing``."""
    a, _ = await make_stock(7)
    kit, nothing = new_id("kit"), new_id("none")
    await settings(client, kit, components=[{"product_id": a, "quantity": 2}])
    r = await client.get("/v1/stock", params={"product_ids": f"{kit},{nothing},{a}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["product_id"] for p in body["products"]] == [kit, a]
    assert body["products"][0] == await stock(client, kit)
    assert (body["products"][0]["kit"], body["products"][0]["reservable"]) == (True, 3)
    assert body["products"][1] == await stock(client, a)
    assert body["missing"] == [nothing]


async def test_commerce_messages_per_database_and_redis(
    scratch_database: str, redis_url: str, new_id: NewId
) -> None:
    """Two deployments share a database but not a Redis (here: two Redis databases, which
    have separate keys and so separate ids): each has a relay leading, and each relay's
    commerce follower publishes the kit numbers (Redis pub/sub ignores the database
    number, so both reach this one subscriber)."""
    from urllib.parse import urlsplit

    from inventory.service.catalog import Component, ProductSettings, put_settings
    from inventory.service.commerce_feed import CommerceFeed
    from inventory.store.feed import PgOutbox
    from inventory.store.pg import connect
    from realtime.relay import Relay, relay_keys
    from realtime.sharded import redis_from_url

    from .conftest import wait_until
    from .test_realtime_e2e import channel_messages, write_change

    prefix, part, kit = new_id("feed"), new_id("part"), new_id("kit")
    other_url = urlsplit(redis_url)._replace(path="/1").geturl()
    redises = [redis_from_url(redis_url), redis_from_url(other_url)]
    store = await connect(scratch_database, min_size=1, max_size=6, timeout=10)
    writer = await asyncpg.connect(scratch_database)
    relays = [
        Relay(PgOutbox(store.pool), r, prefix=prefix, campaign_interval=0.1,
              followers=[CommerceFeed(store, r, prefix=prefix).publish])
        for r in redises
    ]  # fmt: skip
    try:
        for relay in relays:
            await relay.start()
        await put_settings(store, ProductSettings(kit, components=(Component(part, 1),)))
        async with channel_messages(redis_url, prefix, kit) as published:
            await wait_until(lambda: all(r.leader for r in relays), 10, "both relays leading")
            ids = [(await r.get(relay_keys(prefix)[0])).decode() for r in redises]
            assert ids[0] != ids[1]
            assert [r.lease_name for r in relays] == [f"{prefix}:stock@{i}" for i in ids]
            await write_change(writer, part, new_id("wh"))
            await wait_until(lambda: len(published) == 2, 5, "a kit message from each relay")
            assert [(set(m), m["reservable"]) for m in published] == [
                ({"reservable", "seq"}, 1)
            ] * 2
    finally:
        for relay in relays:
            await relay.stop()
        await writer.close()
        for r in redises:
            await r.delete(*relay_keys(prefix))
            await r.aclose()
        await store.close()


async def _last_change(conn: asyncpg.Connection, product: str) -> Any:
    """The product's newest ledger row as the commerce feed gets it from the outbox."""
    from realtime.ports import StockChange

    r = await conn.fetchrow(
        """SELECT id, product_id, warehouse_id, kind, quantity, reserved, version, created_at
           FROM movements WHERE product_id = $1 ORDER BY id DESC LIMIT 1""",
        product,
    )
    assert r is not None
    return StockChange(0, *r.values())


async def test_kit_numbers_and_seq_stay_paired_when_readers_race(
    database_url: str, redis_url: str, new_id: NewId
) -> None:
    """A subscriber's snapshot of kit ``k`` reads the database (1 kit), then stalls
    before Redis; a component change commits (2 kits) and the feed publishes it; then the
    snapshot goes on. It must not come out as the older number with a higher ``seq`` (a
    hub would keep that over the feed's message until the next change): it answers the
    pair that stands. Then: a number recorded by a reader that died before publishing it
    is published by the next reader; an unchanged number keeps its ``seq``; a reading
    from another database origin (a restore) is news whatever its order."""
    import dataclasses

    import redis.asyncio as aioredis
    from msgspec import structs

    from inventory.service.catalog import Component, ProductSettings, put_settings
    from inventory.service.commerce_feed import CommerceFeed, KitNumbers, KitSnapshots
    from inventory.store.commerce import read_kits
    from inventory.store.pg import connect
    from realtime.feed import AlertData, KitData, encode
    from realtime.keys import RedisKeys

    from .conftest import wait_until
    from .test_realtime_e2e import channel_messages, write_change

    class GatedRedis(aioredis.Redis):
        """Holds its first script or counter command until ``gate`` is set."""

        gate = asyncio.Event()
        reached = asyncio.Event()

        async def execute_command(self, *args: Any, **options: Any) -> Any:
            if args[0] in ("EVALSHA", "INCRBY") and not self.gate.is_set():
                self.reached.set()
                await self.gate.wait()
            return await super().execute_command(*args, **options)

    prefix, part, kit, wh = new_id("kitrace"), new_id("part"), new_id("kit"), new_id("wh")
    plain, gated = aioredis.Redis.from_url(redis_url), GatedRedis.from_url(redis_url)
    store = await connect(database_url, min_size=1, max_size=4, timeout=10)
    writer = await asyncpg.connect(database_url)
    feed = CommerceFeed(store, plain, prefix=prefix)

    def kit_message(extras: list[tuple[str, KitData]]) -> tuple[int, int]:
        [(product, data)] = extras
        assert product == kit
        return data.reservable, data.seq

    try:
        await put_settings(store, ProductSettings(kit, components=(Component(part, 1),)))
        await write_change(writer, part, wh)  # 1 unit: 1 kit
        async with channel_messages(redis_url, prefix, kit) as published:
            snapshot = asyncio.create_task(KitSnapshots(store, gated, prefix)([kit]))
            await asyncio.wait_for(GatedRedis.reached.wait(), 10)  # read 1, not yet recorded
            await write_change(writer, part, wh)  # 2 units: 2 kits
            await feed.publish([await _last_change(writer, part)])
            await wait_until(lambda: bool(published), 5, "the feed's kit message")
            GatedRedis.gate.set()
            fed = (published[-1]["reservable"], published[-1]["seq"])
            assert fed[0] == 2
            assert kit_message(await snapshot) == fed  # not (1, a higher seq)
            # A gap on the component re-reads the kits using it (the hub's ``related``).
            snapshots = KitSnapshots(store, plain, prefix)
            assert await snapshots([part]) == []
            assert kit_message(await snapshots([part], [part])) == fed

            # A reader records 3 and dies before publishing; the feed's next batch has the
            # same number and publishes it.
            await write_change(writer, part, wh)
            async with store.connection() as conn:
                [dead] = await KitNumbers(plain, prefix).record(await read_kits(conn, [kit]))
            assert (dead.reservable, dead.seq, dead.publish) == (3, fed[1] + 1, True)
            await feed.publish([await _last_change(writer, part)])
            await wait_until(lambda: len(published) == 2, 5, "the dead reader's number")
            assert (published[-1]["reservable"], published[-1]["seq"]) == (3, fed[1] + 1)
            # Unchanged: same seq, nothing published.
            assert kit_message(await snapshots([kit])) == (3, fed[1] + 1)
            # A reading from another origin (a restored database) is news whatever its
            # order; the next one from here too. Seq goes on going up.
            numbers = KitNumbers(plain, prefix)
            async with store.connection() as conn:
                here = await read_kits(conn, [kit])
            restored = dataclasses.replace(here, origin="restored", order=(1, 0))
            [k] = await numbers.record(dataclasses.replace(restored, reservables={part: 9}))
            assert (k.reservable, k.seq) == (9, fed[1] + 2)
            await numbers.published([k])
            [k] = await numbers.record(here)
            assert (k.reservable, k.seq, k.publish) == (3, fed[1] + 3, True)
            await numbers.published([k])
            await feed.publish([await _last_change(writer, part)])
            marker = AlertData("end", 0, 0.0)
            await plain.publish(RedisKeys(prefix).stock_channel(kit), encode(marker))
            await wait_until(lambda: len(published) == 3, 5, "the end marker")
            assert published[-1] == structs.asdict(marker)  # and no kit message before it
    finally:
        GatedRedis.gate.set()
        await writer.close()
        await plain.delete(RedisKeys(prefix).kit(kit))
        for client in (plain, gated):
            await client.aclose()
        await store.close()
