"""PostgreSQL store of stock, warehouses, reservations and idempotency records, and the
error translation every SQL module uses (:func:`_translated`; the other SQL lives beside
its feature: :mod:`.store_feed`, :mod:`.expiry`, :mod:`.catalog`, :mod:`.bulk`, the
commerce, waitlist and webhook modules).

Returns domain objects (plain dicts for the ledger pages and the invariant report, which
are only encoded) and raises domain errors: asyncpg's exceptions never leave a
:func:`_translated` block. Connection failures become
:class:`~inventory.domain.Unavailable` (503), a lost version check becomes
:class:`VersionMiss`, a row lock wait past ``lock_timeout`` :class:`RowsBusy`, constraint
violations that the domain should have prevented :class:`StoreIntegrityError`.

Every write of stock rows appends its ledger rows in the same statement
(:meth:`Store.apply_deltas` for adjustments, commits, releases and expiry;
:meth:`Store.insert_batch` for the reservation engine's batches), so a stock change and
its movement can never be apart. Rows of one transaction are locked in (product,
warehouse) order, so multi-row writes never deadlock each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from ..domain.model import (
    Contention,
    InventoryError,
    Movement,
    MovementKind,
    NotFound,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockLevel,
    Unavailable,
    ValidationFailed,
    Warehouse,
    WarehouseStatus,
)
from .migrate import apply_migrations

__all__ = [
    "IdempotencyRecord",
    "RowsBusy",
    "Store",
    "StoreIntegrityError",
    "VersionMiss",
    "body_hash",
    "connect",
    "migrate",
]

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
Row = asyncpg.Record


class VersionMiss(Exception):
    """A version-checked update found a newer row: the caller re-reads and retries."""


class RowsBusy(Exception):
    """Waiting for a stock row lock ran past the transaction's ``lock_timeout``."""


class StoreIntegrityError(InventoryError):
    """The database refused a write that the domain should have refused first."""

    code = "conflict"
    status = 409


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    body_hash: bytes
    status_code: int | None
    response: bytes | None


def body_hash(body: Any) -> bytes:
    """SHA-256 of the canonical JSON of a parsed body (key order and spacing ignored)."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


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


def _level(r: Row) -> StockLevel:
    return StockLevel(
        r["product_id"], r["warehouse_id"], r["quantity"], r["reserved"], r["version"],
        r["updated_at"],
    )  # fmt: skip


def _warehouse(r: Row) -> Warehouse:
    return Warehouse(r["id"], r["name"], r["location"], WarehouseStatus(r["status"]))


def _reservation(r: Row, lines: Iterable[Row | Mapping[str, Any]]) -> Reservation:
    return Reservation(
        r["id"],
        ReservationStatus(r["status"]),
        tuple(
            ReservationLine(x["product_id"], x["warehouse_id"], x["quantity"], x.get("kit_id"))
            for x in lines
        ),
        r["reference"],
        r["created_at"],
        r["expires_at"],
    )


_LEVEL_COLS = "product_id, warehouse_id, quantity, reserved, version, updated_at"

_LOCK_ROWS = """
SELECT 1 FROM stock_levels
WHERE (product_id, warehouse_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))
ORDER BY product_id, warehouse_id
FOR UPDATE
"""

# One statement: update rows (version-checked where a version is given) and append one
# ledger row per updated row. Returns the rows after the change.
_APPLY = f"""
WITH d AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
        AS d(product_id, warehouse_id, q, r, v)
), u AS (
    UPDATE stock_levels s
    SET quantity = s.quantity + d.q, reserved = s.reserved + d.r,
        version = s.version + 1, updated_at = now()
    FROM d
    WHERE s.product_id = d.product_id AND s.warehouse_id = d.warehouse_id
      AND (d.v IS NULL OR s.version = d.v)
    RETURNING s.product_id, s.warehouse_id, s.quantity, s.reserved, s.version, s.updated_at,
              d.q, d.r
), m AS (
    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                           quantity, reserved, version, reservation_id, reason)
    SELECT product_id, warehouse_id, $6, q, r, quantity, reserved, version, $7, $8 FROM u
)
SELECT {_LEVEL_COLS} FROM u
"""

_INSERT_LEVEL = f"""
WITH i AS (
    INSERT INTO stock_levels (product_id, warehouse_id, quantity, reserved, version)
    VALUES ($1, $2, $3, 0, 1)
    ON CONFLICT DO NOTHING
    RETURNING {_LEVEL_COLS}
), m AS (
    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                           quantity, reserved, version, reason)
    SELECT product_id, warehouse_id, 'adjusted', quantity, 0, quantity, 0, 1, $4 FROM i
)
SELECT {_LEVEL_COLS} FROM i
"""

_LOCK_ROWS_FOR_BATCH = f"""
WITH got AS MATERIALIZED (
    SELECT {_LEVEL_COLS} FROM stock_levels
    WHERE product_id = ANY($1::text[])
    ORDER BY product_id, warehouse_id FOR UPDATE{{skip}}
)
SELECT s.product_id, s.warehouse_id, g.quantity, g.reserved, g.version, g.updated_at,
       g.product_id IS NOT NULL AS locked, w.id, w.name, w.location, w.status
FROM stock_levels s JOIN warehouses w ON w.id = s.warehouse_id
LEFT JOIN got g ON g.product_id = s.product_id AND g.warehouse_id = s.warehouse_id
WHERE s.product_id = ANY($1::text[])
"""
_LOCK_FREE_ROWS = _LOCK_ROWS_FOR_BATCH.format(skip=" SKIP LOCKED")
_LOCK_ALL_ROWS = _LOCK_ROWS_FOR_BATCH.format(skip="")

# ``at`` is read when the row locks are held (clock_timestamp(), not the transaction's
# start): created_at and expires_at count from it.
_INSERT_BATCH = """
WITH t AS MATERIALIZED (SELECT clock_timestamp() AS at), u AS (
    UPDATE stock_levels s
    SET reserved = s.reserved + d.r, version = s.version + d.n, updated_at = now()
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
        AS d(product_id, warehouse_id, r, n, v)
    WHERE s.product_id = d.product_id AND s.warehouse_id = d.warehouse_id AND s.version = d.v
    RETURNING 1
), m AS (
    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                           quantity, reserved, version, reservation_id)
    SELECT p, w, 'reserved', 0, r, q, res, v, rid
    FROM unnest($6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],
                $11::bigint[], $12::uuid[]) AS m(p, w, r, q, res, v, rid)
), r AS (
    INSERT INTO reservations (id, status, reference, created_at, expires_at, customer_id)
    SELECT id, 'active', ref, t.at, t.at + make_interval(secs => ttl), cid
    FROM unnest($13::uuid[], $14::text[], $15::float8[], $21::text[]) AS r(id, ref, ttl, cid), t
), l AS (
    INSERT INTO reservation_lines (reservation_id, line_no, product_id, warehouse_id, quantity,
                                   kit_id)
    SELECT * FROM unnest($16::uuid[], $17::int[], $18::text[], $19::text[], $20::bigint[],
                         $22::text[])
)
SELECT (SELECT count(*) FROM u) AS updated, (SELECT at FROM t) AS at
"""

# Keys are inserted in (scope, key) order, so two transactions claiming overlapping keys
# wait for each other in one order and never deadlock.
_CLAIM_KEYS = """
INSERT INTO idempotency_keys (scope, key, body_hash)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) AS k(scope, key, h)
ORDER BY scope, key
ON CONFLICT DO NOTHING
RETURNING scope, key
"""


class Store:
    """Data access over an asyncpg pool. Methods taking ``conn`` run inside the caller's
    transaction (see :meth:`transaction`); the others use a pooled connection."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float = 5.0) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout

    async def close(self) -> None:
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def transaction(self, lock_timeout: float | None = None) -> AsyncIterator[Conn]:
        """A transaction on a pooled connection; ``lock_timeout`` (seconds) bounds every
        lock wait in it (then :class:`RowsBusy` from :meth:`lock_rows`), set in the
        same round trip as ``BEGIN``."""
        with _translated():
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
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
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                yield conn

    async def ping(self) -> None:
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")

    # --- warehouses ----------------------------------------------------------------

    async def put_warehouse(self, wh: Warehouse) -> tuple[Warehouse, bool]:
        """Create or update; returns the stored warehouse and whether it was created."""
        async with self.connection() as conn:
            row = await conn.fetchrow(
                """INSERT INTO warehouses (id, name, location, status) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (id) DO UPDATE
                   SET name = $2, location = $3, status = $4, updated_at = now()
                   RETURNING id, name, location, status, (xmax = 0) AS created""",
                wh.id,
                wh.name,
                wh.location,
                wh.status.value,
            )
        assert row is not None
        return _warehouse(row), bool(row["created"])

    async def get_warehouse(self, warehouse_id: str) -> Warehouse:
        async with self.connection() as conn:
            row = await conn.fetchrow(
                "SELECT id, name, location, status FROM warehouses WHERE id = $1", warehouse_id
            )
        if row is None:
            raise NotFound(f"warehouse {warehouse_id} not found", {"warehouse_id": warehouse_id})
        return _warehouse(row)

    async def list_warehouses(self) -> list[Warehouse]:
        async with self.connection() as conn:
            rows = await conn.fetch("SELECT id, name, location, status FROM warehouses ORDER BY id")
        return [_warehouse(r) for r in rows]

    async def warehouses(self, conn: Conn, ids: Iterable[str]) -> dict[str, Warehouse]:
        rows = await conn.fetch(
            "SELECT id, name, location, status FROM warehouses WHERE id = ANY($1::text[])",
            list(set(ids)),
        )
        return {r["id"]: _warehouse(r) for r in rows}

    # --- stock ---------------------------------------------------------------------

    async def levels(
        self, product_ids: Sequence[str], conn: Conn | None = None
    ) -> tuple[list[StockLevel], dict[str, Warehouse]]:
        """Every stock row of the products, ordered, and the warehouses they are in."""
        sql = f"""SELECT s.{_LEVEL_COLS.replace(", ", ", s.")},
                         w.id, w.name, w.location, w.status
                  FROM stock_levels s JOIN warehouses w ON w.id = s.warehouse_id
                  WHERE s.product_id = ANY($1::text[])
                  ORDER BY s.product_id, s.warehouse_id"""
        if conn is None:
            async with self.connection() as c:
                rows = await c.fetch(sql, list(product_ids))
        else:
            rows = await conn.fetch(sql, list(product_ids))
        return [_level(r) for r in rows], {r["id"]: _warehouse(r) for r in rows}

    async def lock_level(self, conn: Conn, product_id: str, warehouse_id: str) -> StockLevel:
        """The row FOR UPDATE, or an empty (version 0) level when it does not exist."""
        row = await conn.fetchrow(
            f"""SELECT {_LEVEL_COLS} FROM stock_levels
                WHERE product_id = $1 AND warehouse_id = $2 FOR UPDATE""",
            product_id,
            warehouse_id,
        )
        return _level(row) if row else StockLevel(product_id, warehouse_id)

    async def insert_level(self, conn: Conn, movement: Movement) -> StockLevel | None:
        """Create a row from its first movement; None when another transaction won."""
        row = await conn.fetchrow(
            _INSERT_LEVEL,
            movement.product_id,
            movement.warehouse_id,
            movement.quantity,
            movement.reason,
        )
        return _level(row) if row else None

    async def apply_deltas(
        self,
        conn: Conn,
        kind: MovementKind,
        deltas: Mapping[tuple[str, str], tuple[int, int, int | None]],
        reservation_id: UUID | None = None,
        reason: str | None = None,
    ) -> list[StockLevel]:
        """Apply ``{(product, warehouse): (quantity_delta, reserved_delta, version)}``.

        ``version`` None updates unconditionally (relative updates under the row lock);
        otherwise the row must still have that version, else :class:`VersionMiss`.
        """
        keys = sorted(deltas)
        products = [k[0] for k in keys]
        warehouses = [k[1] for k in keys]
        if len(keys) > 1:
            await conn.execute(_LOCK_ROWS, products, warehouses)
        rows = await conn.fetch(
            _APPLY,
            products,
            warehouses,
            [deltas[k][0] for k in keys],
            [deltas[k][1] for k in keys],
            [deltas[k][2] for k in keys],
            kind.value,
            reservation_id,
            reason,
        )
        if len(rows) != len(keys):
            raise VersionMiss()
        return [_level(r) for r in rows]

    async def lock_rows(
        self,
        conn: Conn,
        product_ids: Sequence[str],
        wait_for: Collection[str] = (),
        wait: float = 0.0,
        *,
        then_claims: bool = False,
    ) -> tuple[list[StockLevel], dict[str, Warehouse], set[str]]:
        """Lock the products' stock rows in (product, warehouse) order.

        Rows of ``wait_for`` products are locked first, waiting at most ``wait`` seconds
        (the transaction's ``lock_timeout``, see :meth:`transaction`; then
        :class:`RowsBusy`, the transaction being unusable) while holding nothing else;
        the others never wait: rows another transaction holds are skipped (``SKIP
        LOCKED``). Returns the locked rows, the warehouses they are in, and the products
        with a row that could not be locked. ``then_claims``: the transaction claims
        idempotency keys next, so the ``lock_timeout`` is lifted again (a claim waits
        for a racing transaction's key as long as it takes).
        """
        rows: list[Row] = []
        rest = list(product_ids)
        if wait_for:
            try:
                # The client-side command timeout must not fire before lock_timeout.
                rows = await conn.fetch(_LOCK_ALL_ROWS, sorted(wait_for), timeout=wait + 1)
            except asyncpg.LockNotAvailableError:
                raise RowsBusy() from None
            if then_claims:
                await conn.execute("SELECT set_config('lock_timeout', '0', true)")
            rest = [p for p in rest if p not in wait_for]
        if rest:
            rows += await conn.fetch(_LOCK_FREE_ROWS, rest)
        busy = {r["product_id"] for r in rows if not r["locked"]}
        locked = [_level(r) for r in rows if r["locked"]]
        return locked, {r["id"]: _warehouse(r) for r in rows if r["locked"]}, busy

    async def insert_batch(
        self,
        conn: Conn,
        rows: Sequence[tuple[StockLevel, StockLevel]],
        movements: Sequence[Movement],
        reservations: Sequence[tuple[UUID, str | None, int, str | None]],
        lines: Sequence[tuple[UUID, int, ReservationLine]],
    ) -> datetime:
        """Write a combined batch of reservations in one statement.

        ``rows`` are (locked state, state after the batch) pairs: each row is updated once
        (version-checked against the locked state) while ``movements`` records every
        individual change with its own version, exactly as if the reservations had been
        applied one after another. Returns ``created_at``, the database clock read
        while the row locks are held (``expires_at`` is it plus each TTL).
        """
        before = [b for b, _ in rows]
        result = await conn.fetchrow(
            _INSERT_BATCH,
            [b.product_id for b in before],
            [b.warehouse_id for b in before],
            [a.reserved - b.reserved for b, a in rows],
            [a.version - b.version for b, a in rows],
            [b.version for b in before],
            [m.product_id for m in movements],
            [m.warehouse_id for m in movements],
            [m.reserved_delta for m in movements],
            [m.quantity for m in movements],
            [m.reserved for m in movements],
            [m.version for m in movements],
            [m.reservation_id for m in movements],
            [r[0] for r in reservations],
            [r[1] for r in reservations],
            [float(r[2]) for r in reservations],
            [x[0] for x in lines],
            [x[1] for x in lines],
            [x[2].product_id for x in lines],
            [x[2].warehouse_id for x in lines],
            [x[2].quantity for x in lines],
            [r[3] for r in reservations],
            [x[2].kit_id for x in lines],
        )
        assert result is not None
        if result["updated"] != len(rows):
            raise VersionMiss()
        at: datetime = result["at"]
        return at

    async def store_idempotent_responses(
        self, conn: Conn, answers: Sequence[tuple[str, str, int, bytes]]
    ) -> None:
        """Store ``(scope, key, status, body)`` answers of keys claimed in ``conn``."""
        await conn.execute(
            """UPDATE idempotency_keys k SET status_code = a.status, response = a.body
               FROM unnest($1::text[], $2::text[], $3::int[], $4::bytea[])
                   AS a(scope, key, status, body)
               WHERE k.scope = a.scope AND k.key = a.key""",
            [a[0] for a in answers],
            [a[1] for a in answers],
            [a[2] for a in answers],
            [a[3] for a in answers],
        )

    async def movements(
        self, product_id: str, after: int, limit: int
    ) -> list[dict[str, Any]] | None:
        """Ledger page of a product, oldest first; None when the product has no stock row."""
        async with self.connection() as conn:
            exists = await conn.fetchval(
                "SELECT 1 FROM stock_levels WHERE product_id = $1 LIMIT 1", product_id
            )
            if not exists:
                return None
            rows = await conn.fetch(
                """SELECT id, product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                          quantity, reserved, version, reservation_id, reason, created_at
                   FROM movements WHERE product_id = $1 AND id > $2 ORDER BY id LIMIT $3""",
                product_id,
                after,
                limit,
            )
        return [dict(r) for r in rows]

    # --- reservations --------------------------------------------------------------

    async def get_reservation(
        self, reservation_id: UUID, conn: Conn | None = None, *, for_update: bool = False
    ) -> tuple[Reservation, datetime]:
        """The reservation and the database clock (``now``) read with it."""
        sql = """SELECT id, status, reference, created_at, expires_at, clock_timestamp() AS now
                 FROM reservations WHERE id = $1""" + (" FOR UPDATE" if for_update else "")
        lines_sql = """SELECT product_id, warehouse_id, quantity, kit_id FROM reservation_lines
                       WHERE reservation_id = $1 ORDER BY line_no"""
        if conn is None:
            async with self.connection() as c:
                row = await c.fetchrow(sql, reservation_id)
                lines = await c.fetch(lines_sql, reservation_id) if row else []
        else:
            row = await conn.fetchrow(sql, reservation_id)
            lines = await conn.fetch(lines_sql, reservation_id) if row else []
        if row is None:
            raise NotFound(f"reservation {reservation_id} not found", {"id": str(reservation_id)})
        return _reservation(row, lines), row["now"]

    async def update_reservation(self, conn: Conn, reservation: Reservation) -> None:
        await conn.execute(
            "UPDATE reservations SET status = $2, expires_at = $3, updated_at = now() "
            "WHERE id = $1",
            reservation.id,
            reservation.status.value,
            reservation.expires_at,
        )

    # --- idempotency ---------------------------------------------------------------

    async def claim_idempotency_keys(
        self, conn: Conn, claims: Sequence[tuple[str, str, bytes]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        """Claim ``(scope, key, body hash)`` keys in this transaction; returns the stored
        records of those someone already had.

        A concurrent claimer waits on the primary key until the first transaction ends,
        then sees its stored answer (or claims the key if that transaction rolled back).
        """
        claimed = await conn.fetch(
            _CLAIM_KEYS, [c[0] for c in claims], [c[1] for c in claims], [c[2] for c in claims]
        )
        got = {(r["scope"], r["key"]) for r in claimed}
        taken = [c for c in claims if (c[0], c[1]) not in got]
        if not taken:
            return {}
        # A statement of its own: its snapshot sees answers committed while the claim waited.
        rows = await conn.fetch(
            """SELECT k.scope, k.key, k.body_hash, k.status_code, k.response
               FROM idempotency_keys k
               JOIN unnest($1::text[], $2::text[]) AS t(scope, key)
                 ON k.scope = t.scope AND k.key = t.key""",
            [c[0] for c in taken],
            [c[1] for c in taken],
        )
        return {
            (r["scope"], r["key"]): IdempotencyRecord(
                bytes(r["body_hash"]), r["status_code"], r["response"]
            )
            for r in rows
        }


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool ``reset`` that sends nothing.

    asyncpg's default resets every released connection with a query (advisory locks,
    cursors, LISTEN, settings): one extra round trip per request. This server changes no
    session state (the relay unlocks its advisory lock itself), and asyncpg still rolls
    back an unfinished transaction before calling this.
    """


async def connect(url: str, *, min_size: int, max_size: int, timeout: float) -> Store:
    """Open a pool; ``timeout`` bounds connecting and every command."""
    with _translated():
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            command_timeout=timeout,
            max_inactive_connection_lifetime=60,
            reset=_keep_session,
        )
    return Store(pool, acquire_timeout=timeout)


async def migrate(url: str) -> list[str]:
    """Apply missing migrations on a one-off connection."""
    with _translated():
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await apply_migrations(conn)
        finally:
            await conn.close()


# --- invariants (``inventory check``) ----------------------------------------------------

INVARIANTS: dict[str, str] = {
    "0 <= reserved <= quantity on every row": """
        SELECT product_id, warehouse_id, quantity, reserved FROM stock_levels
        WHERE reserved < 0 OR reserved > quantity OR quantity < 0""",
    "reserved equals the sum of active reservation lines": """
        WITH active AS (
            SELECT l.product_id, l.warehouse_id, sum(l.quantity) AS held
            FROM reservation_lines l JOIN reservations r ON r.id = l.reservation_id
            WHERE r.status = 'active' GROUP BY 1, 2)
        SELECT coalesce(s.product_id, a.product_id) AS product_id,
               coalesce(s.warehouse_id, a.warehouse_id) AS warehouse_id,
               s.reserved, a.held
        FROM stock_levels s FULL JOIN active a USING (product_id, warehouse_id)
        WHERE coalesce(s.reserved, 0) <> coalesce(a.held, 0)""",
    "the ledger replays to quantity, reserved and version": """
        WITH replay AS (
            SELECT product_id, warehouse_id, sum(quantity_delta) AS quantity,
                   sum(reserved_delta) AS reserved, count(*) AS changes,
                   max(version) AS version
            FROM movements GROUP BY 1, 2)
        SELECT coalesce(s.product_id, r.product_id) AS product_id,
               coalesce(s.warehouse_id, r.warehouse_id) AS warehouse_id,
               s.quantity, r.quantity AS replayed_quantity, s.reserved,
               r.reserved AS replayed_reserved, s.version, r.changes
        FROM stock_levels s FULL JOIN replay r USING (product_id, warehouse_id)
        WHERE s.quantity IS DISTINCT FROM r.quantity OR s.reserved IS DISTINCT FROM r.reserved
           OR s.version IS DISTINCT FROM r.changes OR s.version IS DISTINCT FROM r.version""",
    "versions are contiguous and each ledger row records its running state": """
        SELECT product_id, warehouse_id, version, quantity, running_quantity
        FROM (SELECT product_id, warehouse_id, version, quantity, reserved,
                     row_number() OVER w AS n,
                     sum(quantity_delta) OVER w AS running_quantity,
                     sum(reserved_delta) OVER w AS running_reserved
              FROM movements
              WINDOW w AS (PARTITION BY product_id, warehouse_id ORDER BY version, id)) m
        WHERE version <> n OR quantity <> running_quantity OR reserved <> running_reserved""",
    "reservation lines match their ledger rows": """
        WITH lines AS (
            SELECT reservation_id, product_id, warehouse_id, sum(quantity) AS quantity
            FROM reservation_lines GROUP BY 1, 2, 3),
        booked AS (
            SELECT reservation_id, product_id, warehouse_id, sum(reserved_delta) AS quantity
            FROM movements WHERE kind = 'reserved' GROUP BY 1, 2, 3)
        SELECT reservation_id, product_id, warehouse_id, l.quantity, b.quantity AS booked
        FROM lines l FULL JOIN booked b USING (reservation_id, product_id, warehouse_id)
        WHERE l.quantity IS DISTINCT FROM b.quantity""",
}


async def invariant_violations(
    conn: Conn, limit: int = 20, invariants: Mapping[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Each invariant's name and up to ``limit`` offending rows (empty when it holds);
    ``invariants`` (name -> SQL) defaults to :data:`INVARIANTS`.

    Runs in one REPEATABLE READ transaction so all checks see the same snapshot.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    with _translated():
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for name, sql in (INVARIANTS if invariants is None else invariants).items():
                rows = await conn.fetch(f"SELECT * FROM ({sql}) v LIMIT {int(limit)}")
                found[name] = [dict(r) for r in rows]
    return found


async def connect_one(url: str, timeout: float = 10) -> Conn:
    with _translated():
        conn: Conn = await asyncpg.connect(url, timeout=timeout)
    return conn
