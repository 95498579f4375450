"""The PostgreSQL connection: pool, transactions, and the error translation every SQL
module uses (:func:`_translated`).

asyncpg's exceptions never leave a :func:`_translated` block: connection failures become
:class:`~inventory.domain.model.Unavailable` (503), lock waits that ran out or aborted
transactions :class:`~inventory.domain.model.Contention`, values PostgreSQL refuses
:class:`~inventory.domain.model.ValidationFailed`, constraint violations that the domain
should have prevented :class:`StoreIntegrityError`. :class:`Database` is the base of the
statement groups that make up :class:`~inventory.store.pg.Store`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from ..domain.model import Contention, InventoryError, Unavailable, ValidationFailed

__all__ = ["Conn", "Database", "Row", "StoreIntegrityError", "connect_one", "open_pool"]

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Row = asyncpg.Record


class StoreIntegrityError(InventoryError):
    """The database refused a write that the domain should have refused first."""

    code = "conflict"
    status = 409


log = logging.getLogger("inventory.store")

# The database is away or cannot serve now: 503 ``unavailable`` with Retry-After. asyncpg's
# InternalClientError ("cannot switch to state ...; another operation is in progress") is
# what a connection answers after its backend was terminated in the middle of a command;
# OperatorInterventionError covers admin shutdown, crash shutdown, "starting up" and
# statement timeouts; InsufficientResources covers "too many clients", disk and memory;
# a read-only transaction is a failover in progress.
_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    asyncpg.ReadOnlySQLTransactionError,
)


@contextlib.contextmanager
def _translated() -> Any:
    """Every asyncpg failure as a domain error with a fixed message.

    PostgreSQL's own text (constraint, table and column names, values) never reaches a
    response body: it is logged here instead. A PostgreSQL error with no deliberate
    answer below is a bug or a broken deployment (a missing migration): logged with its
    traceback and answered 503, so clients retry instead of treating it as final.
    """
    try:
        yield
    except _CONNECTION_ERRORS as exc:
        raise Unavailable(f"database unavailable: {type(exc).__name__}") from exc
    except asyncpg.DataError as exc:  # a value PostgreSQL cannot store or compare
        log.info("database refused a value: %s", exc)
        raise ValidationFailed("the database refused a value in the request") from exc
    except asyncpg.IntegrityConstraintViolationError as exc:
        log.warning("database refused a write: %s", exc)
        raise StoreIntegrityError("the database refused the write") from exc
    except asyncpg.LockNotAvailableError as exc:  # a lock_timeout outside the row locks
        raise Contention("a lock wait ran out; retry") from exc
    except asyncpg.TransactionRollbackError as exc:
        # Rows and keys are locked in a fixed order, so deadlocks should not happen; if one
        # does, the transaction was rolled back and the client may simply retry.
        raise Contention("the database aborted a conflicting transaction; retry") from exc
    except asyncpg.PostgresError as exc:
        log.error("unexpected database error: %s", type(exc).__name__, exc_info=exc)
        raise Unavailable("the database could not answer; retry later") from exc


class Database:
    """An asyncpg pool. Methods taking ``conn`` run inside the caller's transaction (see
    :meth:`transaction`); the others use a pooled connection."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float = 5.0) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout

    async def close(self) -> None:
        await self.pool.close()

    def _acquire(self) -> Any:
        """asyncpg runs an acquire with a timeout through ``wait_for``: a task of its own,
        two event-loop iterations, which on a busy process (20-28 ms iterations measured
        under a flash sale's refusals) are most of a short statement's answer time. A
        connection idle now needs no timeout: there is nothing to wait for."""
        timeout = None if self.pool.get_idle_size() else self.acquire_timeout
        return self.pool.acquire(timeout=timeout)

    @contextlib.asynccontextmanager
    async def transaction(self, lock_timeout: float | None = None) -> AsyncIterator[Conn]:
        """A transaction on a pooled connection; ``lock_timeout`` (seconds) bounds every
        lock wait in it (then :class:`~inventory.store.port.RowsBusy` from ``lock_rows``),
        set in the same round trip as ``BEGIN``."""
        with _translated():
            async with self._acquire() as conn:
                if lock_timeout is None:
                    async with conn.transaction():
                        yield conn
                    return
                ms = max(1, round(lock_timeout * 1000))
                await conn.execute(f"BEGIN; SET LOCAL lock_timeout = '{ms}ms'")
                try:
                    yield conn
                except BaseException:
                    if not conn.is_closed():  # else the pool discards the connection
                        with contextlib.suppress(*_CONNECTION_ERRORS, asyncpg.PostgresError):
                            await conn.execute("ROLLBACK")
                    raise
                await conn.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        with _translated():
            async with self._acquire() as conn:
                yield conn

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool ``reset`` that sends nothing.

    asyncpg's default resets every released connection with a query (advisory locks,
    cursors, LISTEN, settings): one extra round trip per request. This server changes no
    session state (the relay unlocks its advisory lock itself), and asyncpg still rolls
    back an unfinished transaction before calling this.
    """


async def open_pool(url: str, *, min_size: int, max_size: int, timeout: float) -> asyncpg.Pool:
    """Open a pool; ``timeout`` bounds connecting and every command."""
    with _translated():
        return await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            command_timeout=timeout,
            max_inactive_connection_lifetime=60,
            reset=_keep_session,
        )


async def connect_one(url: str, timeout: float = 10) -> Conn:
    with _translated():
        conn: Conn = await asyncpg.connect(url, timeout=timeout)
    return conn
