"""PostgreSQL side of the real-time feed: stock snapshots and the outbox relay's queries.

Implements the ports of :mod:`realtime.ports` on asyncpg.

The outbox is the ``movements`` ledger read in ``(xid, id)`` order. A row is *final* once
every transaction older than its own has finished: ``xid < pg_snapshot_xmin(...)``. Reading
only final rows strictly after the cursor makes the stream gap-free although ``bigserial``
ids commit out of order. Trade-off: a long-running transaction anywhere in the cluster
holds the relay back (not the writers) until it ends; the statement and
idle-in-transaction timeouts of the application bound that.

Leadership is a session-level advisory lock taken on a connection that the lease keeps
for itself: every read and cursor write of the leader goes through that session, so a
leader that lost its session (and with it the lock) can no longer move the cursor.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import asyncpg

from realtime.ports import LevelState, StockChange

__all__ = ["PgLevelReader", "PgOutbox", "PgOutboxLease"]

log = logging.getLogger("inventory.store_feed")

_LOCK_CLASS = 0x5EED  # advisory lock namespace of the relay; the key is hashtext(name)
_TIMEOUT = 5.0  # seconds for any single statement of the relay session

_READ_LEVELS = """
SELECT product_id, warehouse_id, quantity, reserved, version, updated_at
FROM stock_levels
WHERE product_id = ANY($1::text[])
ORDER BY product_id, warehouse_id
"""

_TRY_LOCK = "SELECT pg_try_advisory_lock($1, hashtext($2))"
_UNLOCK = "SELECT pg_advisory_unlock($1, hashtext($2))"

# No cursor yet: start after the newest final row (the current tail, no replay).
_INIT_CURSOR = """
INSERT INTO relay_cursor (name, last_xid, last_id)
SELECT $1, COALESCE(tail.xid, '0'::xid8), COALESCE(tail.id, 0)
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (
    SELECT xid, id FROM movements
    WHERE xid < pg_snapshot_xmin(pg_current_snapshot())
    ORDER BY xid DESC, id DESC
    LIMIT 1
) AS tail ON true
ON CONFLICT (name) DO NOTHING
"""

_READ_CURSOR = "SELECT last_xid, last_id FROM relay_cursor WHERE name = $1"

_FETCH = """
SELECT xid, id, product_id, warehouse_id, kind, quantity, reserved, version, created_at
FROM movements
WHERE (xid, id) > ($1::xid8, $2::bigint)
  AND xid < pg_snapshot_xmin(pg_current_snapshot())
ORDER BY xid, id
LIMIT $3
"""

_ADVANCE = "UPDATE relay_cursor SET last_xid = $2::xid8, last_id = $3 WHERE name = $1"


class PgLevelReader:
    """:class:`realtime.ports.LevelReader` on a pool: one query for many products."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def read_levels(self, product_ids: Sequence[str]) -> dict[str, list[LevelState]]:
        result: dict[str, list[LevelState]] = {p: [] for p in product_ids}
        if not result:
            return result
        rows = await self._pool.fetch(_READ_LEVELS, list(result), timeout=_TIMEOUT)
        for row in rows:
            result[row["product_id"]].append(
                LevelState(
                    product_id=row["product_id"],
                    warehouse_id=row["warehouse_id"],
                    quantity=row["quantity"],
                    reserved=row["reserved"],
                    version=row["version"],
                    updated_at=row["updated_at"],
                )
            )
        return result


class PgOutboxLease:
    """The relay leader's session: holds the advisory lock and the cursor."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        connection: asyncpg.pool.PoolConnectionProxy,
        name: str,
        cursor: tuple[int, int],
    ) -> None:
        self._pool = pool
        self._connection = connection
        self._name = name
        self._cursor = cursor

    async def fetch(self, limit: int) -> list[StockChange]:
        rows = await self._connection.fetch(_FETCH, *self._cursor, limit, timeout=_TIMEOUT)
        return [
            StockChange(
                xid=row["xid"],
                id=row["id"],
                product_id=row["product_id"],
                warehouse_id=row["warehouse_id"],
                kind=row["kind"],
                quantity=row["quantity"],
                reserved=row["reserved"],
                version=row["version"],
                created_at=row["created_at"],
            )
            for row in rows
        ]

    async def advance(self, position: tuple[int, int]) -> None:
        await self._connection.execute(_ADVANCE, self._name, *position, timeout=_TIMEOUT)
        self._cursor = position

    async def release(self) -> None:
        connection = self._connection
        try:
            await connection.fetchval(_UNLOCK, _LOCK_CLASS, self._name, timeout=_TIMEOUT)
        except Exception:  # a lost session has dropped the lock already
            connection.terminate()
        with contextlib.suppress(Exception):
            await self._pool.release(connection, timeout=_TIMEOUT)


class PgOutbox:
    """:class:`realtime.ports.Outbox` on a pool; the name keys the lock and the cursor."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def acquire(self, name: str) -> PgOutboxLease | None:
        connection = await self._pool.acquire(timeout=_TIMEOUT)
        try:
            locked = await connection.fetchval(_TRY_LOCK, _LOCK_CLASS, name, timeout=_TIMEOUT)
            if not locked:
                await self._pool.release(connection)
                return None
            await connection.execute(_INIT_CURSOR, name, timeout=_TIMEOUT)
            row = await connection.fetchrow(_READ_CURSOR, name, timeout=_TIMEOUT)
        except BaseException:
            connection.terminate()
            with contextlib.suppress(Exception):
                await self._pool.release(connection)
            raise
        assert row is not None
        return PgOutboxLease(self._pool, connection, name, (row["last_xid"], row["last_id"]))
