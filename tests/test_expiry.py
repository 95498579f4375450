"""Expiry at scale (inventory.service.expiry): set-based release, busy rows, the separate purge.

Each test works in its own scratch database with its own service and no server
sweeper, so it controls when reservations fall due and when the sweeper runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from inventory.domain.model import (
    RequestedLine,
    Reservation,
    Warehouse,
    WarehouseStatus,
)
from inventory.service.expiry import Expiry
from inventory.service.inventory import InventoryService
from inventory.store.invariants import invariant_violations
from inventory.store.pg import connect

from .conftest import wait_until

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def service_on(url: str) -> AsyncIterator[InventoryService]:
    store = await connect(url, min_size=1, max_size=6, timeout=10)
    service = InventoryService(store)
    try:
        yield service
    finally:
        await service.close()
        await store.close()


async def stocked(service: InventoryService, products: int, warehouses: int, qty: int) -> None:
    for w in range(warehouses):
        await service.put_warehouse(Warehouse(f"w{w}", f"w{w}", None, WarehouseStatus.ACTIVE))
        for p in range(products):
            await service.change_stock(f"p{p}", f"w{w}", quantity=qty)


async def reserve(service: InventoryService, lines: list[RequestedLine]) -> Reservation:
    result = await service.reserve(lines, 600, None)
    assert isinstance(result, Reservation)
    return result


async def make_due(url: str, ids: list[uuid.UUID] | None = None) -> None:
    """Move deadlines into the past (all active reservations, or ``ids``)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """UPDATE reservations SET expires_at = clock_timestamp() - interval '1 second'
               WHERE status = 'active' AND ($1::uuid[] IS NULL OR id = ANY($1::uuid[]))""",
            ids,
        )
    finally:
        await conn.close()


async def statuses(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM reservations GROUP BY 1")
    finally:
        await conn.close()
    return {r["status"]: r["n"] for r in rows}


async def stored_status(url: str, reservation_id: uuid.UUID) -> str:
    """The status in the database (the API shows a due reservation as expired already)."""
    conn = await asyncpg.connect(url)
    try:
        status: str = await conn.fetchval(
            "SELECT status FROM reservations WHERE id = $1", reservation_id
        )
    finally:
        await conn.close()
    return status


async def assert_invariants(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        violations = await invariant_violations(conn)
    finally:
        await conn.close()
    assert all(not rows for rows in violations.values()), violations


async def test_a_burst_of_thousands_falling_due_is_released_with_a_replayable_ledger(
    scratch_database: str,
) -> None:
    """3,000 reservations, one and two lines, many per stock row, due together: all are
    released (several per statement) and the ledger replays with contiguous versions,
    as if they had been released one by one."""
    async with service_on(scratch_database) as service:
        await stocked(service, products=20, warehouses=2, qty=1000)
        requests = []
        for i in range(3000):
            p = f"p{i % 20}"
            if i % 3 == 0:  # two lines on two rows, one of them twice
                lines = [
                    RequestedLine(p, 1, "w0"),
                    RequestedLine(p, 2, "w1"),
                    RequestedLine(p, 1, "w0"),
                ]
            else:
                lines = [RequestedLine(p, 1 + i % 2, f"w{i % 2}")]
            requests.append(lines)
        for start in range(0, len(requests), 200):
            await asyncio.gather(*(reserve(service, x) for x in requests[start : start + 200]))
        await make_due(scratch_database)
        expiry = Expiry(service.store, batch=500)
        released = await expiry.expire_due()
        assert released == 3000
        assert await statuses(scratch_database) == {"expired": 3000}
        levels, _ = await service.stock([f"p{i}" for i in range(20)])
        assert all(level.reserved == 0 for level in levels)
    await assert_invariants(scratch_database)


async def test_a_row_locked_by_a_foreign_session_holds_up_only_its_reservations(
    scratch_database: str,
) -> None:
    """A foreign session holds one stock row: reservations on other rows are released at
    once (the sweep does not wait for the lock); the held ones are released by a later
    sweep after the lock is gone. Also with more held reservations than one batch."""
    async with service_on(scratch_database) as service:
        await stocked(service, products=3, warehouses=1, qty=100)
        held = [await reserve(service, [RequestedLine("p0", 1, "w0")]) for _ in range(12)]
        both = await reserve(service, [RequestedLine("p0", 1, "w0"), RequestedLine("p1", 1)])
        free = [await reserve(service, [RequestedLine(p, 1)]) for p in ("p1", "p2") * 5]
        await make_due(scratch_database)
        foreign = await asyncpg.connect(scratch_database)
        try:
            transaction = foreign.transaction()
            await transaction.start()
            await foreign.execute(
                "SELECT 1 FROM stock_levels WHERE product_id = 'p0' AND warehouse_id = 'w0' "
                "FOR UPDATE"
            )
            expiry = Expiry(service.store, batch=5)  # the held ones fill whole batches
            async with asyncio.timeout(5):
                assert await expiry.expire_due() == len(free)
            for reservation in free:
                assert await stored_status(scratch_database, reservation.id) == "expired"
            for reservation in [*held, both]:  # none released partly
                assert await stored_status(scratch_database, reservation.id) == "active"
            await transaction.rollback()
        finally:
            await foreign.close()
        assert await expiry.expire_due() == len(held) + 1
        assert await statuses(scratch_database) == {"expired": len(held) + 1 + len(free)}
    await assert_invariants(scratch_database)


async def test_a_stuck_purge_does_not_delay_expiry(scratch_database: str) -> None:
    """The purge runs on its own: while it waits on a table lock held elsewhere, the
    sweeper keeps releasing due reservations on time."""
    async with service_on(scratch_database) as service:
        await stocked(service, products=2, warehouses=1, qty=100)
        expiry = Expiry(service.store)
        locker = await asyncpg.connect(scratch_database)
        transaction = locker.transaction()
        await transaction.start()
        await locker.execute("LOCK TABLE idempotency_keys IN ACCESS EXCLUSIVE MODE")
        purge = asyncio.create_task(expiry.run_purge(0, every=0.05, retry=0.05))
        sweeper = asyncio.create_task(expiry.run_sweeper(0.05))
        try:
            await wait_until(
                lambda: locker.fetchval(
                    "SELECT count(*) > 0 FROM pg_locks WHERE NOT granted "
                    "AND relation = 'idempotency_keys'::regclass"
                ),
                5,
                "the purge to wait on the table lock",
            )
            for _ in range(3):
                reservation = await reserve(service, [RequestedLine("p0", 1)])
                await make_due(scratch_database, [reservation.id])

                async def released(rid: uuid.UUID = reservation.id) -> bool:
                    return await stored_status(scratch_database, rid) == "expired"

                await wait_until(released, 2, "the due reservation to be released")
            assert not purge.done()  # still stuck behind the lock
        finally:
            await transaction.rollback()
            await locker.close()
            for task in (purge, sweeper):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    await assert_invariants(scratch_database)


async def test_purge_deletes_old_keys_in_chunks(scratch_database: str) -> None:
    async with service_on(scratch_database) as service:
        conn = await asyncpg.connect(scratch_database)
        try:
            await conn.execute(
                """INSERT INTO idempotency_keys (scope, key, body_hash, created_at)
                   SELECT 's', g::text, '\\x00', now() - interval '2 hours'
                   FROM generate_series(1, 2500) g"""
            )
            await conn.execute(
                "INSERT INTO idempotency_keys (scope, key, body_hash) VALUES ('s', 'new', '\\x00')"
            )
            assert await Expiry(service.store).purge(1, chunk=1000) == 2500
            assert await conn.fetchval("SELECT count(*) FROM idempotency_keys") == 1
        finally:
            await conn.close()
