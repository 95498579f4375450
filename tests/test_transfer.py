"""``inventory import`` / ``inventory export`` against a real server process."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import httpx
import pytest

from inventory.client import BulkItem, BulkResult, Client
from inventory.ops.transfer import ImportSummary, import_file
from inventory.store.invariants import invariant_violations

from .conftest import ROOT, ServerFactory, ServerProcess


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inventory.ops.cli", *args, "--url", server.base_url],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "INVENTORY_TOKEN": ""},
    )  # fmt: skip


def warehouses(server: ServerProcess, *ids: str) -> None:
    with httpx.Client(base_url=server.base_url) as http:
        for w in ids:
            r = http.put(f"/v1/warehouses/{w}", json={"name": w, "status": "active"})
            assert r.status_code in (200, 201)


async def test_import_reports_bad_rows_by_line_and_goes_on(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory()
    w = f"wh-{uuid.uuid4().hex[:8]}"
    warehouses(server, w)
    p = f"imp-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "stock.csv"
    path.write_text(
        "product_id,warehouse_id,quantity,reason\n"  # line 1
        f"{p}-a,{w},5,count\n"  # 2
        f"{p}-b,{w},-1,\n"  # 3: negative
        f"{p}-c,no-such-wh,1,\n"  # 4: unknown warehouse (server)
        f'"{p}-d",{w},7,"multi\nline reason"\n'  # 5-6: quoted newline
        f"{p}-e,{w}\n"  # 7: too few fields
        f"bad id,{w},1,\n"  # 8: invalid id (server)
        f"{p}-a,{w},9,recount\n"  # 9: the same row again, later wins
    )
    done = cli(server, "import", str(path))
    assert done.returncode == 1, done.stderr
    errors = [x for x in done.stderr.splitlines() if x.startswith("line ")]
    assert [x.split(":")[0] for x in errors] == ["line 3", "line 4", "line 7", "line 8"]
    assert "not_found" in errors[1]
    assert "7 rows: 3 imported, 4 failed" in done.stderr
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.get(f"/v1/products/{p}-a/stock")).json()["quantity"] == 9
        assert (await http.get(f"/v1/products/{p}-d/stock")).json()["quantity"] == 7
        moves = (await http.get(f"/v1/products/{p}-a/movements")).json()["movements"]
        assert [(m["quantity"], m["reason"]) for m in moves] == [(5, "count"), (9, "recount")]


async def test_import_jsonl_and_bad_header(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = await server_factory()
    w = f"wh-{uuid.uuid4().hex[:8]}"
    warehouses(server, w)
    p = f"jl-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "stock.jsonl"
    path.write_text(
        json.dumps({"product_id": p, "warehouse_id": w, "quantity": 3}) + "\n"
        + "[1]\n"
        + json.dumps({"product_id": p, "warehouse_id": w, "quantity": "4"}) + "\n"
        + json.dumps({"product_id": p, "warehouse_id": w, "quantity": 1.5}) + "\n"
    )  # fmt: skip
    done = cli(server, "import", str(path))
    assert done.returncode == 1
    assert [x.split(":")[0] for x in done.stderr.splitlines() if x.startswith("line")] == [
        "line 2", "line 4",
    ]  # fmt: skip
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"product_id": p, "warehouse_id": w, "quantity": 8}) + "\n")
    done = cli(server, "import", str(ok))
    assert done.returncode == 0, done.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("sku,wh,qty\n1,2,3\n")
    done = cli(server, "import", str(bad))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "header" in done.stderr
    missing = cli(server, "import", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr


class _MeetingClient(Client):
    """A client whose first two bulk calls wait for each other: the import can only get
    past them with two batches in flight at once (the barrier breaks otherwise)."""

    def __init__(self, base_url: str) -> None:
        super().__init__(base_url)
        self.meet = threading.Barrier(2, timeout=30)
        self.lock = threading.Lock()
        self.calls = 0

    def bulk(self, items: Sequence[BulkItem], *, atomic: bool = False) -> list[BulkResult]:
        with self.lock:
            self.calls += 1
            first_two = self.calls <= 2
        if first_two:
            self.meet.wait()
        return super().bulk(items, atomic=atomic)


async def test_concurrent_import_keeps_line_order_and_later_wins(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = await server_factory()
    w = f"wh-{uuid.uuid4().hex[:8]}"
    warehouses(server, w)
    p = f"cc-{uuid.uuid4().hex[:8]}"
    bad = {10: "-1", 2999: "x"}  # refused by the import itself
    unknown_wh = {1500, 4200}  # refused by the server
    lines = ["product_id,warehouse_id,quantity"]
    for line in range(2, 5502):  # 5,500 rows: six batches
        qty = bad.get(line, str(line % 50))
        lines.append(f"{p}-{line},{'nowh' if line in unknown_wh else w},{qty}")
    # One row named in batch 2 (lines 1002-2001) and again in batch 3 (2002-3001).
    lines[1003 - 1] = f"{p}-rep,{w},1"
    lines[2500 - 1] = f"{p}-rep,{w},2"
    path = tmp_path / "many.csv"
    path.write_text("\n".join(lines) + "\n")

    def run() -> tuple[ImportSummary, str, int]:
        out = io.StringIO()
        client = _MeetingClient(server.base_url)
        with client:
            summary = import_file(client, path, stderr=out, concurrency=4)
        return summary, out.getvalue(), client.calls

    summary, stderr, calls = await asyncio.to_thread(run)
    assert calls == 6
    errors = [x for x in stderr.splitlines() if x.startswith("line ")]
    assert [int(x.split(":")[0].split()[1]) for x in errors] == [10, 1500, 2999, 4200]
    assert all("not_found" in errors[i] for i in (1, 3))
    assert (summary.rows, summary.imported, summary.failed) == (5500, 5496, 4)
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.get(f"/v1/products/{p}-rep/stock")).json()["quantity"] == 2
        moves = (await http.get(f"/v1/products/{p}-rep/movements")).json()["movements"]
        assert [m["quantity"] for m in moves] == [1, 2]
        assert (await http.get(f"/v1/products/{p}-5501/stock")).json()["quantity"] == 5501 % 50


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_import_100k_rows_then_export_round_trips(
    server_factory: ServerFactory, tmp_path: Path, db_pool: asyncpg.Pool
) -> None:
    server = await server_factory()
    tag = uuid.uuid4().hex[:8]
    whs = [f"rt-{tag}-1", f"rt-{tag}-2"]
    warehouses(server, *whs)
    path = tmp_path / "big.csv"
    expected: dict[tuple[str, str], int] = {}
    with path.open("w") as f:
        f.write("product_id,warehouse_id,quantity\n")
        for n in range(100_000):
            key = (f"rt-{tag}-{n // 2:06d}", whs[n % 2])
            expected[key] = n % 97
            f.write(f"{key[0]},{key[1]},{n % 97}\n")
    done = cli(server, "import", str(path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "100000 rows: 100000 imported, 0 failed" in done.stderr

    out = tmp_path / "export.csv"
    done = cli(server, "export", "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    with out.open() as f:
        rows = [r for r in csv.DictReader(f) if r["product_id"].startswith(f"rt-{tag}-")]
    assert {(r["product_id"], r["warehouse_id"]): int(r["quantity"]) for r in rows} == expected
    assert all(r["version"] == "1" for r in rows)

    # Import the export back: every row sets what it already has -> no version moves.
    back = cli(server, "import", str(out))
    assert back.returncode == 0, back.stderr[-2000:]
    jsonl = cli(server, "export", "--format", "jsonl")
    ours = [json.loads(x) for x in io.StringIO(jsonl.stdout) if f'"rt-{tag}-' in x]
    assert len(ours) == 100_000
    assert {x["version"] for x in ours} == {1}
    async with db_pool.acquire() as conn:
        violations = await invariant_violations(conn)
    assert not any(violations.values())
