"""PostgreSQL side of the real-time feed: stock snapshots and the outbox relay's queries.

Implements the ports of :mod:`realtime.ports` on asyncpg.

The outbox is the ``movements`` ledger read in commit order of its writers (migration
``0003_ledger_commit_order.sql``). Policy and why it is correct:

* Every transaction that inserts ledger rows takes a *commit ticket* at COMMIT: a
  deferred constraint trigger on ``movements`` takes a shared transaction-level advisory
  lock, then ``nextval('ledger_commit_seq')``, and records ``(ticket, xid)`` in
  ``ledger_commits``. The lock is held until the transaction has ended, and PostgreSQL
  makes a commit visible before it releases the transaction's locks.
* The relay first asks for the *fence*, ``ledger_commit_fence(after)``: it takes the same
  lock exclusively for the length of one autocommit statement and reads the sequence.
  Holding the lock exclusively means no ledger writer is between taking its ticket and
  finishing, so every ticket at or below the fence belongs to a transaction that has
  committed (and is visible to any later snapshot) or rolled back (its ticket row never
  appears). The relay then reads tickets ``(cursor, fence]`` in ticket order with a fresh
  snapshot: nothing committed is skipped, and tickets are never reordered later.
* Who it waits for: only ledger writers that are committing at that instant (the
  exclusive request waits for them and briefly holds back the next ones). A transaction
  that writes no ledger row, in this database or another, never takes the lock, so an
  idle-in-transaction psql session holds nothing back. (The previous design read rows
  below the cluster-wide ``pg_snapshot_xmin`` and waited for every open transaction on
  the server.)
* Cost: per ledger-writing transaction one trigger call per ledger row (the first does
  the work, the others compare a transaction-local setting), one shared advisory lock,
  one ``nextval`` and one small insert; per relay poll with nothing new, one statement
  that reads the sequence and takes no lock; per batch, the fence and the read.
* Writers need do nothing: the trigger is in the database. ``SET CONSTRAINTS ALL
  IMMEDIATE`` in a writer only makes it take its ticket earlier (the relay then waits for
  that transaction to finish), never breaks the order.

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

_FENCE = "SELECT ledger_commit_fence($1)"
_NO_ROW = 2**63 - 1  # a row id above every row: the cursor is past a whole ticket

# No cursor yet: start after the newest finished ticket (the current tail, no replay).
_INIT_CURSOR = """
INSERT INTO relay_cursor (name, last_ticket, last_id)
VALUES ($1, $2, $3)
ON CONFLICT (name) DO NOTHING
"""

_READ_CURSOR = "SELECT last_ticket, last_id FROM relay_cursor WHERE name = $1"

_FETCH = """
SELECT c.ticket, m.id, m.product_id, m.warehouse_id, m.kind, m.quantity, m.reserved,
       m.version, m.created_at
FROM ledger_commits c JOIN movements m ON m.xid = c.xid
WHERE c.ticket >= $1 AND c.ticket <= $3 AND (c.ticket, m.id) > ($1, $2)
ORDER BY c.ticket, m.id
LIMIT $4
"""

_ADVANCE = "UPDATE relay_cursor SET last_ticket = $2, last_id = $3 WHERE name = $1"


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
        fence: int,
    ) -> None:
        self._pool = pool
        self._connection: asyncpg.pool.PoolConnectionProxy | None = connection
        self._name = name
        self._cursor = cursor
        self._fence = fence  # the highest fence seen: tickets up to it are final
        self._more = True  # the last read was full: the fence may hold more rows

    def _session(self) -> asyncpg.pool.PoolConnectionProxy:
        if self._connection is None:
            raise asyncpg.InterfaceError("the relay lease was released")
        return self._connection

    async def fetch(self, limit: int) -> list[StockChange]:
        connection = self._session()
        fence = await connection.fetchval(_FENCE, self._fence, timeout=_TIMEOUT)
        if fence > self._fence:
            self._fence, self._more = fence, True
        if not self._more:
            return []
        rows = await connection.fetch(_FETCH, *self._cursor, self._fence, limit, timeout=_TIMEOUT)
        self._more = len(rows) >= limit
        return [
            StockChange(
                ticket=row["ticket"],
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

    async def advance(self, position: tuple[int, int], *, save: bool = True) -> None:
        if save:
            await self._session().execute(_ADVANCE, self._name, *position, timeout=_TIMEOUT)
        self._cursor = position

    async def release(self) -> None:
        """Unlock and return the session to the pool; when that fails (a lost session,
        a cancelled call), close it, which drops the session-level lock with it. Never
        raises: the relay calls this in a ``finally`` and must go on campaigning (asyncpg
        raises ``InterfaceError`` when a connection it has already released is closed)."""
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await connection.fetchval(_UNLOCK, _LOCK_CLASS, self._name, timeout=_TIMEOUT)
        except BaseException as exc:  # a lost session has dropped the lock already
            log.info("relay session closed instead of unlocked (%r)", exc)
            await _discard(self._pool, connection)
            if not isinstance(exc, Exception):
                raise
            return
        with contextlib.suppress(Exception):
            await self._pool.release(connection, timeout=_TIMEOUT)


async def _discard(pool: asyncpg.Pool, connection: asyncpg.pool.PoolConnectionProxy) -> None:
    """Close a connection for good and hand its slot back to the pool; never raises
    (either step fails harmlessly on a connection the pool has taken back already)."""
    with contextlib.suppress(Exception):
        connection.terminate()
    with contextlib.suppress(Exception):
        await pool.release(connection)


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
            fence = await connection.fetchval(_FENCE, 0, timeout=_TIMEOUT)
            await connection.execute(_INIT_CURSOR, name, fence, _NO_ROW, timeout=_TIMEOUT)
            row = await connection.fetchrow(_READ_CURSOR, name, timeout=_TIMEOUT)
        except BaseException:
            await _discard(self._pool, connection)
            raise
        assert row is not None
        cursor = (row["last_ticket"], row["last_id"])
        return PgOutboxLease(self._pool, connection, name, cursor, cursor[0])
