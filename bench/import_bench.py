"""Benchmark of ``inventory import``: rows/s through the HTTP API against ``COPY`` of the
same rows into a scratch table, measured in the same run.

``python -m bench.import_bench [--rows 1000000] [--rounds 3] [--concurrency 4]``

Each round writes a CSV of ``--rows`` rows (half as many products, two warehouses) with
new product ids, imports it through a real ``inventory serve`` (the same code path as the
CLI: :func:`inventory.ops.transfer.import_file`, batches of 1,000 through
``POST /v1/stock/bulk``, each a transaction that creates the rows and their ledger rows),
then ``COPY``s the same file into a plain three-column table of a scratch database: the
ceiling, the cheapest way PostgreSQL can take those rows. The ratio (import / COPY) is
the figure; medians over rounds. PostgreSQL and Redis: the ``INVENTORY_*_URL`` servers, or
embedded ones.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.stack import ServerProcess, backing_servers, scratch_databases, server_env
from inventory.client import Client
from inventory.ops.transfer import import_file

__all__ = ["main", "run"]

WAREHOUSES = ("bench-w1", "bench-w2")


def _write_csv(path: Path, rows: int, prefix: str) -> None:
    with path.open("w") as f:
        f.write("product_id,warehouse_id,quantity\n")
        for n in range(rows):
            f.write(f"{prefix}-{n // 2:07d},{WAREHOUSES[n % 2]},{n % 1000}\n")


async def _copy(url: str, path: Path, table: str) -> float:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"CREATE TABLE {table} (product_id text, warehouse_id text, quantity bigint)"
        )
        started = time.perf_counter()
        await conn.copy_to_table(
            table, source=path, format="csv", header=True,
            columns=["product_id", "warehouse_id", "quantity"],
        )  # fmt: skip
        return time.perf_counter() - started
    finally:
        await conn.close()


def _rss_mib() -> float:
    """This process's resident memory now (Linux ``/proc``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _import(base_url: str, path: Path, concurrency: int) -> tuple[float, float]:
    """Seconds the import took, and the importing process's peak memory growth (MiB:
    its peak RSS after the import minus its RSS before; an upper bound, the peak being
    process-wide)."""
    before = _rss_mib()
    with Client(base_url, timeout=120) as client:
        started = time.perf_counter()
        summary = import_file(client, path, stderr=io.StringIO(), concurrency=concurrency)
        elapsed = time.perf_counter() - started
    if summary.failed or summary.imported != summary.rows:
        raise RuntimeError(f"the import failed rows: {summary}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return elapsed, peak - before


async def run(rows: int, rounds: int, concurrency: int = 4) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    with backing_servers() as backing, tempfile.TemporaryDirectory() as tmp:
        async with scratch_databases(backing.pg_url) as dbs:
            env = server_env(dbs.http, backing.redis_url)
            server = ServerProcess.inventory(env, workers=1)
            await asyncio.to_thread(server.start)
            try:
                base_url = f"http://127.0.0.1:{server.port}"
                with Client(base_url) as client:
                    for w in WAREHOUSES:
                        client.put_warehouse(w, w)
                for r in range(rounds):
                    path = Path(tmp) / f"round{r}.csv"
                    _write_csv(path, rows, f"r{r}-{secrets.token_hex(3)}")
                    imported, grew = await asyncio.to_thread(_import, base_url, path, concurrency)
                    copied = await _copy(dbs.pgbench, path, f"copy_round_{r}")
                    results.append(
                        {"import_s": imported, "copy_s": copied, "peak_growth_mib": grew}
                    )
                    print(
                        f"round {r + 1}: import {rows / imported:,.0f} rows/s, "
                        f"COPY {rows / copied:,.0f} rows/s",
                        file=sys.stderr,
                    )
            finally:
                await asyncio.to_thread(server.stop)
    import_rate = statistics.median(rows / x["import_s"] for x in results)
    copy_rate = statistics.median(rows / x["copy_s"] for x in results)
    return {
        "rows": rows,
        "rounds": rounds,
        "concurrency": concurrency,
        "import_rows_per_s": round(import_rate),
        "copy_rows_per_s": round(copy_rate),
        "ratio": round(import_rate / copy_rate, 3),
        "importer_peak_growth_mib": round(max(x["peak_growth_mib"] for x in results), 1),
        "raw": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.import_bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.rows, args.rounds, args.concurrency))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
