"""``inventory check``: verify the stock invariants against the database.

The same checks run after every load test and benchmark scenario: no oversell or
negative stock, ``reserved`` equal to the active reservation lines, a ledger that replays
to every row, contiguous versions; and the flash-sale rules (purchase limits held, offered
waitlist entries backed by their reservation, no head entry left waiting that could have
been offered, kit lines in whole kits).
"""

from __future__ import annotations

from typing import Any, TextIO

from ..store.commerce import COMMERCE_INVARIANTS
from ..store.db import connect_one
from ..store.invariants import INVARIANTS, invariant_violations

__all__ = ["check_database", "run_check"]


async def check_database(url: str) -> dict[str, list[dict[str, Any]]]:
    """Invariant name -> offending rows (empty lists when everything holds)."""
    conn = await connect_one(url)
    try:
        return await invariant_violations(conn, invariants={**INVARIANTS, **COMMERCE_INVARIANTS})
    finally:
        await conn.close()


async def run_check(url: str, out: TextIO) -> bool:
    """Print what was checked and any violation; True when every invariant holds."""
    results = await check_database(url)
    for name, rows in results.items():
        print(f"{'ok  ' if not rows else 'FAIL'} {name}", file=out)
        for row in rows:
            print(f"       {row}", file=out)
    ok = not any(results.values())
    print("all invariants hold" if ok else "INVARIANT VIOLATIONS FOUND", file=out)
    return ok
