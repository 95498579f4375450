"""The database ceilings: ``pgbench`` running what a request must commit, per request.

Write scenarios are held against the *minimal* transaction a reservation must commit
(:func:`_minimal_script`): ``BEGIN``, one ``UPDATE`` per stock row guarded by
``quantity - reserved >= 1``, the reservation, its lines and one ledger row per row,
``COMMIT``, each a prepared statement. It is hand-written on purpose: it is the floor
of work and round trips any design pays when each request is its own transaction, so
beating it means sharing transactions (the reservation engine's batches), not doing
less per reservation. The 1-line one runs over the catalogue (64 clients) and on the
hot product (128 clients: every attempt commits under the row lock); the 5-line one
locks its five rows in ascending product order.

Reads (the stock read, the sold-out refusal) and the commit half of the reserve +
commit cycle mirror the server's own SQL: the statements are *recorded* by calling
:class:`inventory.store.pg.Store` methods on a connection that only writes down what it is
asked to run, so the mirror follows the store's statements when they change. Parameters are
rendered into pgbench expressions by value: the recording is made with sentinel values
and each one is replaced by the pgbench variable that holds the real value in the run
(values flow between statements through ``\\gset``).

Run with ``-M prepared`` (asyncpg prepares every statement too). Throughput counts only
what committed (reservations counted in the database before and after the run);
pgbench's own tps (attempts) is reported next to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from inventory.domain.model import (
    MovementKind,
    Reservation,
    ReservationLine,
    ReservationStatus,
)
from inventory.store.pg import Store

__all__ = ["Mirror", "PgbenchResult", "mirrors", "run_pgbench", "seed_sql"]

_RID = uuid.UUID(int=0xB0B)
_EXPIRES = datetime(2001, 2, 3, tzinfo=UTC)
_WAREHOUSE = "wh-1"


class _Row(dict[str, Any]):
    """A stand-in result row: any column the store reads has a plausible value."""

    def __bool__(self) -> bool:  # a found row, though it stores nothing
        return True

    def __missing__(self, key: str) -> Any:
        return {"status": "active", "created_at": _EXPIRES, "expires_at": _EXPIRES}.get(key, 1)


class _Recorder:
    """A connection that records each statement and answers with stand-in rows."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    async def fetch(self, sql: str, *args: Any) -> list[_Row]:
        self.calls.append((sql, args))
        return [_Row() for _ in range(self.rows)]

    async def fetchrow(self, sql: str, *args: Any) -> _Row:
        self.calls.append((sql, args))
        return _Row()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.calls.append((sql, args))
        return 1

    async def execute(self, sql: str, *args: Any) -> str:
        self.calls.append((sql, args))
        return "UPDATE 1"


def _recorded(rows: int, call: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """Run ``call(store, conn)`` against a recorder; return the statements it sent.

    Nothing in it waits on real I/O, so the coroutine is driven to its end by hand (this
    works inside or outside a running event loop).
    """
    recorder = _Recorder(rows)
    coro = call(Store(pool=None), recorder)  # type: ignore[arg-type]
    try:
        coro.send(None)
    except StopIteration:
        return recorder.calls
    coro.close()
    raise RuntimeError("recording the store's SQL unexpectedly waited on I/O")


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool | int | float):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


def _array_literal(values: Sequence[Any]) -> str:
    return _literal("{" + ",".join("NULL" if v is None else str(v) for v in values) + "}")


def _render(sql: str, args: Sequence[Any], names: dict[Any, str]) -> str:
    """Replace ``$k`` by the pgbench expression for the k-th recorded value.

    ``names`` maps sentinel values (and lists made only of sentinels) to expressions;
    other values become SQL literals.
    """

    def expression(value: Any) -> str:
        key = tuple(value) if isinstance(value, list) else value
        if key in names:
            return names[key]
        if isinstance(value, list):
            return _array_literal(value)
        if isinstance(value, uuid.UUID | datetime | MovementKind):
            raise ValueError(f"no pgbench variable for {value!r}")
        return _literal(value)

    def replace(match: re.Match[str]) -> str:
        return expression(args[int(match.group(1)) - 1])

    return re.sub(r"\$(\d+)", replace, sql).strip()


@dataclass(frozen=True)
class Mirror:
    """One pgbench script and how to count its successes."""

    name: str
    script: str
    success_sql: str | None  # counts committed work; None: every transaction counts


def _minimal_script(products: Sequence[str], then: Sequence[str] = ()) -> list[str]:
    """The least a reservation of one unit of each of ``products`` (SQL expressions,
    in locking order) must commit: one guarded ``UPDATE`` per stock row, the
    reservation, its lines and one ledger row per row, each a prepared statement.

    ``then`` runs after the commit and can use ``:rid`` (the reservation id) and
    ``:ps``/``:ws`` (the rows' keys as arrays).
    """
    wh = _literal(_WAREHOUSE)
    script = ["BEGIN;"]
    for i, product in enumerate(products):
        script.append(
            "UPDATE stock_levels SET reserved = reserved + 1, version = version + 1, "
            f"updated_at = now() WHERE product_id = {product} AND warehouse_id = {wh} "
            f"AND quantity - reserved >= 1 "
            f"RETURNING quantity AS q{i}, reserved AS r{i}, version AS v{i} \\gset"
        )
    script.append(
        "INSERT INTO reservations (id, status, expires_at) "
        "VALUES (gen_random_uuid(), 'active', now() + interval '900 seconds') "
        f"RETURNING id AS rid, ARRAY[{', '.join(products)}] AS ps, "
        f"ARRAY[{', '.join([wh] * len(products))}] AS ws \\gset"
    )
    lines = ", ".join(f"(:rid, {n}, {p}, {wh}, 1)" for n, p in enumerate(products, 1))
    script.append(
        "INSERT INTO reservation_lines (reservation_id, line_no, product_id, warehouse_id, "
        f"quantity) VALUES {lines};"
    )
    ledger = ", ".join(
        f"({p}, {wh}, 'reserved', 0, 1, :q{i}, :r{i}, :v{i}, :rid)" for i, p in enumerate(products)
    )
    script.append(
        "INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, "
        f"reserved_delta, quantity, reserved, version, reservation_id) VALUES {ledger};"
    )
    return [*script, "COMMIT;", *then]


def _commit_script(count: int) -> list[str]:
    """The commit transaction of the reservation ``:rid`` reserved just before."""
    keys = [(f"P{i}", _WAREHOUSE) for i in range(count)]
    sentinels = {
        tuple(k[0] for k in keys): ":ps",
        tuple(k[1] for k in keys): ":ws",
        _RID: ":rid",
        _EXPIRES: ":r_expires_at",
    }
    lines = tuple(ReservationLine(k[0], k[1], 1) for k in keys)
    reservation = Reservation(_RID, ReservationStatus.COMMITTED, lines, None, _EXPIRES, _EXPIRES)

    async def commit(store: Store, conn: Any) -> None:
        await store.get_reservation(_RID, conn, for_update=True)
        deltas = dict.fromkeys(keys, (-1, -1, None))
        await store.apply_deltas(conn, MovementKind.COMMITTED, deltas, _RID)
        await store.update_reservation(conn, reservation)

    calls = _recorded(count, commit)
    script = ["BEGIN;"]
    for i, (sql, args) in enumerate(calls):
        rendered = _render(sql, args, sentinels)
        script.append(rendered + (" \\gset r_" if i == 0 else ";"))
    script.append("COMMIT;")
    return script


def _read(products: Sequence[str]) -> str:
    """The store's read of the products' rows, for products given as pgbench expressions."""
    sentinels = [f"P{i}" for i in range(len(products))]
    [(sql, args)] = _recorded(len(products), lambda s, c: s.levels(sentinels, c))
    return _render(sql, args, {tuple(sentinels): "ARRAY[" + ", ".join(products) + "]"})


def _refusal_script(product: str) -> list[str]:
    """A refused reservation: the read, then a transaction that finds too little."""
    return [_read([product]) + ";", "BEGIN;", "ROLLBACK;"]


def _product(offset: int = 0) -> str:
    """The product ``sku-<:n + offset>`` as an SQL expression."""
    return f"'sku-' || (:n + {offset})"


def mirrors(products: int, hot_product: str, sold_out_product: str) -> dict[str, list[Mirror]]:
    """Scenario name -> its pgbench ceilings, run at the scenario's client count.

    Write scenarios are held against the minimal transaction (:func:`_minimal_script`);
    the 5-line one takes products a fifth of the catalogue apart, in ascending order
    (every client locks in one order, so none deadlocks).
    """
    header = [f"\\set n random(1, {products})"]
    reserved = "SELECT count(*) FROM reservations"
    committed = "SELECT count(*) FROM reservations WHERE status = 'committed'"
    stride = products // 5
    multi = [
        f"\\set n random(1, {stride})",
        *_minimal_script([_product(k * stride) for k in range(5)]),
    ]
    cycle = header + _minimal_script([_product()], then=_commit_script(1))
    minimal = "pgbench minimal transaction"
    return {
        "spread": [Mirror(minimal, "\n".join(header + _minimal_script([_product()])), reserved)],
        "hot": [Mirror(minimal, "\n".join(_minimal_script([_literal(hot_product)])), reserved)],
        "sold-out": [
            Mirror(
                "pgbench same SQL",
                "\n".join(_refusal_script(_literal(sold_out_product))),
                None,
            )
        ],
        "cycle": [Mirror("pgbench minimal + same commit SQL", "\n".join(cycle), committed)],
        "multi-line": [Mirror(minimal, "\n".join(multi), reserved)],
        "stock-read": [
            Mirror(
                "pgbench same SQL",
                "\n".join([*header, _read([_product()]) + ";"]),
                None,
            )
        ],
    }


def seed_sql(
    products: int, quantity: int, hot_product: str, hot_quantity: int, sold_out_product: str
) -> str:
    """The catalogue the HTTP run seeds through the API, as SQL with its ledger rows."""
    rows = (
        f"SELECT 'sku-' || n, {quantity} FROM generate_series(1, {products}) n "
        f"UNION ALL SELECT {_literal(hot_product)}, {hot_quantity} "
        f"UNION ALL SELECT {_literal(sold_out_product)}, 0"
    )
    return f"""
INSERT INTO warehouses (id, name, status) VALUES ('{_WAREHOUSE}', '{_WAREHOUSE}', 'active');
INSERT INTO stock_levels (product_id, warehouse_id, quantity, reserved, version)
    SELECT p, '{_WAREHOUSE}', q, 0, 1 FROM ({rows}) s(p, q);
INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                       quantity, reserved, version)
    SELECT p, '{_WAREHOUSE}', 'adjusted', q, 0, q, 0, 1 FROM ({rows}) s(p, q);
"""


@dataclass
class PgbenchResult:
    """One pgbench run: committed work per second and per-transaction latencies."""

    mirror: str
    clients: int
    duration: float
    transactions: int
    successes: int
    latencies: list[float] = field(default_factory=list)  # seconds, every transaction
    cpu_seconds: float = 0.0

    @property
    def tps(self) -> float:
        return self.transactions / self.duration

    @property
    def rate(self) -> float:
        return self.successes / self.duration


def _logged_latencies(directory: Path) -> list[float]:
    """Per-transaction latencies (seconds) from pgbench's ``-l`` logs."""
    latencies: list[float] = []
    for log in directory.glob("log.*"):
        for line in log.read_text().splitlines():
            parts = line.split()
            with contextlib.suppress(IndexError, ValueError):
                latencies.append(int(parts[2]) / 1e6)
    return latencies


async def run_pgbench(
    binary: str, url: str, mirror: Mirror, clients: int, duration: int
) -> PgbenchResult:
    """Run one mirror for ``duration`` seconds against the database at ``url``."""

    async def count() -> int:
        if mirror.success_sql is None:
            return 0
        conn = await asyncpg.connect(url)
        try:
            return int(await conn.fetchval(mirror.success_sql))
        finally:
            await conn.close()

    before = await count()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="pgbench-") as tmp:
        script = Path(tmp) / "script.sql"
        script.write_text(mirror.script + "\n")
        proc = await asyncio.create_subprocess_exec(
            binary,
            "--no-vacuum",
            "-M",
            "prepared",
            "-f",
            str(script),
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(duration),
            "-l",
            "--log-prefix",
            str(Path(tmp) / "log"),
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(duration + 120):
            out, err = await proc.communicate()
        stdout = out.decode(errors="replace")
        if proc.returncode != 0:
            tail = (err.decode(errors="replace") or stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pgbench failed ({mirror.name}): {' | '.join(tail)}")
        latencies = await asyncio.to_thread(_logged_latencies, Path(tmp))
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"number of transactions actually processed: (\d+)", stdout)
    transactions = int(match.group(1)) if match else len(latencies)
    successes = (await count()) - before if mirror.success_sql is not None else transactions
    return PgbenchResult(
        mirror.name,
        clients,
        float(duration),
        transactions,
        successes,
        latencies,
        (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime),
    )
