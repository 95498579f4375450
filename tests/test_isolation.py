"""Isolation of the reservation engine from rows held by a foreign transaction, and
``expires_at`` taken while the row locks are held. Both strategies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from inventory.config import Settings
from inventory.domain.model import Contention, RequestedLine, Reservation
from inventory.ops.app import _lock_factory
from inventory.ops.check import check_database
from inventory.service.engine import ReservationEngine, ReserveRequest, lane_of

from .conftest import wait_until

StockFactory = Callable[..., Awaitable[tuple[str, list[str]]]]
LANES = 4


@pytest.fixture(params=["optimistic", "lock"])
async def engine(request: Any, app: Any, settings: Settings) -> AsyncIterator[ReservationEngine]:
    """An engine on the app's store with the strategy's product locks (if any)."""
    runtime = app.state.runtime
    locks = _lock_factory(runtime.redis, settings) if request.param == "lock" else None
    eng = ReservationEngine(runtime.store, lock_products=locks, lanes=LANES)
    yield eng
    await eng.close()


class ForeignLock:
    """A separate session holding ``SELECT ... FOR UPDATE`` on products' rows."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> ForeignLock:
        self.conn = await asyncpg.connect(self.url)
        self.monitor = await asyncpg.connect(self.url)
        self.tx = self.conn.transaction()
        await self.tx.start()
        return self

    async def hold(self, *products: str) -> None:
        await self.conn.execute(
            "SELECT 1 FROM stock_levels WHERE product_id = ANY($1::text[]) FOR UPDATE",
            list(products),
        )

    async def blocking(self) -> bool:
        """Whether a session waits for this one's locks (the monitor's own connection
        sees fresh activity)."""
        n: int = await self.monitor.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            self.conn.get_server_pid(),
        )
        return n > 0

    async def release(self) -> Any:
        """Roll back; returns the database clock just before."""
        at = await self.conn.fetchval("SELECT clock_timestamp()")
        await self.tx.rollback()
        return at

    async def __aexit__(self, *exc: object) -> None:
        if not self.conn.is_closed():
            await self.conn.close()
        await self.monitor.close()


async def same_lane_stock(
    make_stock: StockFactory, new_id: Callable[[str], str], lane: int, quantity: int
) -> str:
    """A new product in ``lane``."""
    while True:
        pid = new_id("sku")
        if lane_of(pid, LANES) == lane:
            await make_stock(quantity, product_id=pid)
            return pid


async def test_busy_row_delays_only_its_own_requests(
    engine: ReservationEngine,
    make_stock: StockFactory,
    new_id: Callable[[str], str],
    database_url: str,
) -> None:
    busy, _ = await make_stock(10)
    lane = lane_of(busy, LANES)
    others = [await same_lane_stock(make_stock, new_id, lane, 10) for _ in range(4)]
    async with ForeignLock(database_url) as foreign:
        await foreign.hold(busy)
        blocked = asyncio.create_task(
            engine.reserve(ReserveRequest((RequestedLine(busy, 1),), 60, None))
        )
        await wait_until(foreign.blocking, 10, "the busy product's request waits")
        # Same lane as the busy product, one and two lines, some sharing a batch with a
        # second request for the busy product: all answered while the lock is held.
        requests = [ReserveRequest((RequestedLine(p, 1),), 60, None) for p in others]
        requests.append(
            ReserveRequest((RequestedLine(others[1], 1), RequestedLine(others[0], 2)), 60, None)
        )
        also_blocked = asyncio.create_task(
            engine.reserve(
                ReserveRequest((RequestedLine(others[2], 1), RequestedLine(busy, 1)), 60, None)
            )
        )
        answers = await asyncio.wait_for(asyncio.gather(*(engine.reserve(r) for r in requests)), 10)
        assert all(isinstance(a, Reservation) for a in answers)
        assert not blocked.done()
        assert not also_blocked.done()
        await foreign.release()
        assert isinstance(await asyncio.wait_for(blocked, 10), Reservation)
        assert isinstance(await asyncio.wait_for(also_blocked, 10), Reservation)
    assert not any((await check_database(database_url)).values())


async def test_busy_row_past_the_bound_is_503(
    app: Any, settings: Settings, make_stock: StockFactory, database_url: str
) -> None:
    store = app.state.runtime.store
    for locks in (None, _lock_factory(app.state.runtime.redis, settings)):
        engine = ReservationEngine(store, lock_products=locks, wait_bound=0.5)
        busy, _ = await make_stock(10)
        try:
            async with ForeignLock(database_url) as foreign:
                await foreign.hold(busy)
                started = time.monotonic()
                with pytest.raises(Contention) as raised:
                    await engine.reserve(ReserveRequest((RequestedLine(busy, 1),), 60, None))
                took = time.monotonic() - started
                await foreign.release()
        finally:
            await engine.close()
        assert raised.value.retry_after >= 1
        assert 0.5 <= took < 3, took
        stock = await store.levels([busy])
        assert [lv.reserved for lv in stock[0]] == [0]


async def test_reservation_made_during_a_lock_wait_has_its_full_ttl(
    engine: ReservationEngine, make_stock: StockFactory, database_url: str, db_pool: Any
) -> None:
    pid, _ = await make_stock(5)
    ttl = 30
    async with ForeignLock(database_url) as foreign:
        await foreign.hold(pid)
        task = asyncio.create_task(
            engine.reserve(ReserveRequest((RequestedLine(pid, 1),), ttl, None))
        )
        await wait_until(foreign.blocking, 10, "the reservation waits for the row")
        released = await foreign.release()
        reservation = await asyncio.wait_for(task, 10)
    answered = await db_pool.fetchval("SELECT clock_timestamp()")
    assert isinstance(reservation, Reservation)
    # Taken after the lock was granted, not at the transaction's start.
    assert reservation.created_at >= released
    assert reservation.expires_at - reservation.created_at == timedelta(seconds=ttl)
    assert reservation.expires_at - answered >= timedelta(seconds=ttl) - timedelta(seconds=0.5)
    stored = await db_pool.fetchrow(
        "SELECT created_at, expires_at FROM reservations WHERE id = $1", reservation.id
    )
    assert (stored["created_at"], stored["expires_at"]) == (
        reservation.created_at,
        reservation.expires_at,
    )


async def test_isolation_over_http(
    client: httpx.AsyncClient,
    make_stock: StockFactory,
    new_id: Callable[[str], str],
    database_url: str,
) -> None:
    """Through the app's own engine: requests for other products of the busy product's
    lane are answered 201 while the foreign lock is held; the busy product's request
    (with an Idempotency-Key) is answered after the release and replays."""
    busy, _ = await make_stock(10)
    lane = lane_of(busy, LANES)
    others = [await same_lane_stock(make_stock, new_id, lane, 10) for _ in range(3)]
    async with ForeignLock(database_url) as foreign:
        await foreign.hold(busy)
        busy_body = {"lines": [{"product_id": busy, "quantity": 1}]}
        key = {"Idempotency-Key": new_id("key")}
        blocked = asyncio.create_task(client.post("/v1/reservations", json=busy_body, headers=key))
        await wait_until(foreign.blocking, 10, "the busy product's request waits")
        answers = await asyncio.gather(
            *(
                client.post("/v1/reservations", json={"lines": [{"product_id": p, "quantity": 1}]})
                for p in others * 3
            )
        )
        assert [r.status_code for r in answers] == [201] * len(answers)
        assert not blocked.done()
        await foreign.release()
        first = await asyncio.wait_for(blocked, 10)
        assert first.status_code == 201, first.text
    # The key was claimed after the wait for the row and its answer stored.
    again = await client.post("/v1/reservations", json=busy_body, headers=key)
    assert (again.status_code, again.content) == (201, first.content)
    assert not any((await check_database(database_url)).values())
