"""``inventory check``: the invariant checker, run as the CLI.

The clean session database passes. Corruption is only ever written to scratch
databases made here, each with one deliberate inconsistency the checker must name.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from inventory.ops.check import check_database
from inventory.ops.embedded import free_port
from inventory.store.commerce import COMMERCE_INVARIANTS
from inventory.store.invariants import INVARIANTS

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parent.parent

MakeStock = Callable[..., Awaitable[tuple[str, list[str]]]]

BOUNDS = "0 <= reserved <= quantity on every row"
RESERVED = "reserved equals the sum of active reservation lines"
REPLAY = "the ledger replays to quantity, reserved and version"
CONTIGUOUS = "versions are contiguous and each ledger row records its running state"
BOOKED = "reservation lines match their ledger rows"


@dataclass
class Run:
    code: int
    out: str
    err: str


async def inventory_check(database_url: str) -> Run:
    env = {**os.environ, "INVENTORY_DATABASE_URL": database_url}
    env.pop("INVENTORY_REDIS_URL", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "inventory.ops.cli", "check",
        env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def assert_report(run: Run, failing: set[str]) -> None:
    lines = run.out.splitlines()
    for name in INVARIANTS:
        status = "FAIL" if name in failing else "ok  "
        assert f"{status} {name}" in lines, (name, run.out)
    assert lines[-1] == ("INVARIANT VIOLATIONS FOUND" if failing else "all invariants hold")


async def test_check_passes_on_the_session_database(
    database_url: str, client: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    """After ordinary traffic (and whatever other tests left behind) every check holds."""
    pid, [_, w2] = await make_stock(6, 4)
    finished = {"commit": "committed", "release": "released"}
    for action in ("commit", "release", None):
        r = await client.post(
            "/v1/reservations", json={"lines": [{"product_id": pid, "quantity": 3}]}
        )
        assert r.status_code == 201, r.text
        if action is not None:
            r = await client.post(f"/v1/reservations/{r.json()['id']}/{action}")
            assert r.json()["status"] == finished[action]
    r = await client.post(f"/v1/products/{pid}/stock/{w2}/adjustments", json={"delta": -1})
    assert r.status_code == 200
    stock = (await client.get(f"/v1/products/{pid}/stock")).json()
    assert (stock["quantity"], stock["reserved"]) == (6, 3)
    run = await inventory_check(database_url)
    assert run.code == 0, run.out + run.err
    assert_report(run, set())
    assert "Traceback" not in run.err


# A consistent row, present in every scratch database, that must never be reported.
CLEAN = """
INSERT INTO warehouses (id, name, status) VALUES ('w', 'w', 'active');
INSERT INTO stock_levels (product_id, warehouse_id, quantity, reserved, version)
VALUES ('sku-clean', 'w', 5, 2, 2);
INSERT INTO reservations (id, status, expires_at)
VALUES ('00000000-0000-0000-0000-00000000000c', 'active', now() + interval '1 hour');
INSERT INTO reservation_lines (reservation_id, line_no, product_id, warehouse_id, quantity)
VALUES ('00000000-0000-0000-0000-00000000000c', 1, 'sku-clean', 'w', 2);
INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                       quantity, reserved, version, reservation_id)
VALUES ('sku-clean', 'w', 'adjusted', 5, 0, 5, 0, 1, NULL),
       ('sku-clean', 'w', 'reserved', 0, 2, 5, 2, 2, '00000000-0000-0000-0000-00000000000c');
"""

R = "'00000000-0000-0000-0000-0000000000aa'"

CORRUPTIONS: list[tuple[str, str, set[str], str]] = [
    (
        "oversold",
        f"""
        ALTER TABLE stock_levels DROP CONSTRAINT stock_reserved_bounds;
        INSERT INTO stock_levels VALUES ('sku-over', 'w', 1, 3, 2);
        INSERT INTO reservations (id, status, expires_at)
        VALUES ({R}, 'active', now() + interval '1 hour');
        INSERT INTO reservation_lines VALUES ({R}, 1, 'sku-over', 'w', 3);
        INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                               quantity, reserved, version, reservation_id)
        VALUES ('sku-over', 'w', 'adjusted', 1, 0, 1, 0, 1, NULL),
               ('sku-over', 'w', 'reserved', 0, 3, 1, 3, 2, {R});
        """,
        {BOUNDS},
        "sku-over",
    ),
    (
        "reserved-without-active-reservation",
        f"""
        INSERT INTO stock_levels VALUES ('sku-held', 'w', 5, 2, 2);
        INSERT INTO reservations (id, status, expires_at) VALUES ({R}, 'released', now());
        INSERT INTO reservation_lines VALUES ({R}, 1, 'sku-held', 'w', 2);
        INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                               quantity, reserved, version, reservation_id)
        VALUES ('sku-held', 'w', 'adjusted', 5, 0, 5, 0, 1, NULL),
               ('sku-held', 'w', 'reserved', 0, 2, 5, 2, 2, {R});
        """,
        {RESERVED},
        "sku-held",
    ),
    (
        "row-drifted-from-ledger",
        """
        INSERT INTO stock_levels VALUES ('sku-drift', 'w', 9, 0, 1);
        INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                               quantity, reserved, version)
        VALUES ('sku-drift', 'w', 'adjusted', 5, 0, 5, 0, 1);
        """,
        {REPLAY},
        "sku-drift",
    ),
    (
        "version-gap",
        """
        INSERT INTO stock_levels VALUES ('sku-gap', 'w', 7, 0, 3);
        INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                               quantity, reserved, version)
        VALUES ('sku-gap', 'w', 'adjusted', 5, 0, 5, 0, 1),
               ('sku-gap', 'w', 'adjusted', 2, 0, 7, 0, 3);
        """,
        {REPLAY, CONTIGUOUS},
        "sku-gap",
    ),
    (
        "ledger-row-state-wrong",
        """
        INSERT INTO stock_levels VALUES ('sku-state', 'w', 7, 0, 2);
        INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                               quantity, reserved, version)
        VALUES ('sku-state', 'w', 'adjusted', 5, 0, 4, 0, 1),
               ('sku-state', 'w', 'adjusted', 2, 0, 7, 0, 2);
        """,
        {CONTIGUOUS},
        "sku-state",
    ),
    (
        "reservation-line-not-booked",
        f"""
        INSERT INTO stock_levels VALUES ('sku-unbooked', 'w', 5, 2, 2);
        INSERT INTO reservations (id, status, expires_at)
        VALUES ({R}, 'active', now() + interval '1 hour');
        INSERT INTO reservation_lines VALUES ({R}, 1, 'sku-unbooked', 'w', 2);
        INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                               quantity, reserved, version, reservation_id)
        VALUES ('sku-unbooked', 'w', 'adjusted', 5, 0, 5, 0, 1, NULL),
               ('sku-unbooked', 'w', 'reserved', 0, 2, 5, 2, 2, NULL);
        """,
        {BOOKED},
        "sku-unbooked",
    ),
]


async def test_check_passes_on_a_consistent_scratch_database(scratch_database: str) -> None:
    conn = await asyncpg.connect(scratch_database)
    try:
        await conn.execute(CLEAN)
    finally:
        await conn.close()
    run = await inventory_check(scratch_database)
    assert run.code == 0, run.out + run.err
    assert_report(run, set())


@pytest.mark.parametrize(
    ("sql", "failing", "culprit"),
    [pytest.param(sql, failing, culprit, id=name) for name, sql, failing, culprit in CORRUPTIONS],
)
async def test_check_reports_a_violation(
    scratch_database: str, sql: str, failing: set[str], culprit: str
) -> None:
    conn = await asyncpg.connect(scratch_database)
    try:
        await conn.execute(CLEAN)
        await conn.execute(sql)
    finally:
        await conn.close()
    found = await check_database(scratch_database)
    assert set(found) == set(INVARIANTS) | set(COMMERCE_INVARIANTS)
    assert {name for name, bad in found.items() if bad} == failing
    for name in failing:
        assert all(culprit in str(row) for row in found[name]), found[name]
    run = await inventory_check(scratch_database)
    assert run.code == 1, run.out + run.err
    assert_report(run, failing)
    assert culprit in run.out
    assert "sku-clean" not in run.out
    assert "Traceback" not in run.err


async def test_check_with_unreachable_database_is_one_line_error() -> None:
    run = await inventory_check(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    assert run.code != 0
    assert "Traceback" not in run.err
    errors = [x for x in run.err.splitlines() if x.startswith("inventory: error:")]
    assert len(errors) == 1, run.err
    assert run.out == ""
