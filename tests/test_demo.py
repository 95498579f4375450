"""``inventory demo`` against a real server process, and its one-line failures."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import pytest

from inventory.ops.demo import product_ids, warehouse_ids
from inventory.ops.embedded import free_port


async def run_demo(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "inventory.ops.cli",
        "demo",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_one_line_error(err: str) -> None:
    assert err.count("\n") == 1, err
    assert err.startswith("inventory demo: error: "), err
    assert "Traceback" not in err


async def test_demo_seeds_and_runs_a_bounded_load(server_factory: Any) -> None:
    server = await server_factory()
    code, out, err = await run_demo(
        "--url", server.base_url, "--duration", "2.5", "--products", "4", "--rate", "25",
        "--seed", "7",
    )  # fmt: skip
    assert code == 0, err
    assert "Traceback" not in err
    products = product_ids(4)
    lines = out.splitlines()
    assert f"dashboard: {server.base_url}/?products={','.join(products)}" in lines
    summaries = [line for line in lines if line.startswith("[") and "reserved" in line]
    assert len(summaries) >= 2, out  # one line per second
    assert any(line.startswith("done: ") for line in lines), out

    async with httpx.AsyncClient(base_url=server.base_url) as client:
        for warehouse_id in warehouse_ids(3):
            r = await client.get(f"/v1/warehouses/{warehouse_id}")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "active"
        r = await client.get("/v1/stock", params={"product_ids": ",".join(products)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["missing"] == []
        assert all(len(p["levels"]) == 3 for p in body["products"])
        kinds: set[str] = set()
        for product_id in products:
            r = await client.get(f"/v1/products/{product_id}/movements", params={"limit": 1000})
            assert r.status_code == 200, r.text
            kinds |= {m["kind"] for m in r.json()["movements"]}
    assert "reserved" in kinds
    assert kinds & {"committed", "released"}


async def test_demo_with_tokens(server_factory: Any) -> None:
    tokens = {"demo-admin": ["admin"], "demo-reader": ["read"]}
    server = await server_factory(env={"INVENTORY_TOKENS": json.dumps(tokens)})
    code, out, err = await run_demo(
        "--url", server.base_url, "--duration", "1", "--products", "2", "--token", "demo-admin"
    )  # fmt: skip
    assert code == 0, err
    assert "done: " in out

    code, _, err = await run_demo("--url", server.base_url, "--duration", "1")
    assert code == 1
    assert_one_line_error(err)
    assert "401" in err
    assert "--token" in err

    code, _, err = await run_demo(
        "--url", server.base_url, "--duration", "1", "--token", "demo-reader"
    )  # fmt: skip
    assert code == 1
    assert_one_line_error(err)
    assert "403" in err


async def test_unreachable_server_is_one_line_and_exit_1() -> None:
    port = free_port()  # nothing listens there
    code, _, err = await run_demo("--url", f"http://127.0.0.1:{port}", "--duration", "1")
    assert code == 1
    assert_one_line_error(err)
    assert f"cannot reach the server at http://127.0.0.1:{port}" in err


@pytest.mark.parametrize(
    "args",
    [
        ["--url", "ftp://127.0.0.1"],
        ["--url", "http://127.0.0.1:8000/v1"],
        ["--duration", "0"],
        ["--products", "501"],
        ["--rate", "fast"],
        ["--no-such-option"],
    ],
)
async def test_bad_options_are_one_line(args: list[str]) -> None:
    code, _, err = await run_demo(*args)
    assert code == 2
    assert_one_line_error(err)


async def test_help() -> None:
    code, out, _ = await run_demo("--help")
    assert code == 0
    for option in ("--url", "--duration", "--products", "--token"):
        assert option in out


async def test_flash_sale_demo_keeps_the_limit(server_factory: Any, database_url: str) -> None:
    """``--flash-sale``: bots hit the purchase limit, refused buyers queue, and afterwards
    no customer holds more than the limit (the check's invariants hold)."""
    from inventory.ops.check import check_database

    server = await server_factory()
    code, out, err = await run_demo(
        "--url", server.base_url, "--flash-sale", "--duration", "3", "--rate", "150",
        "--flash-units", "60", "--seed", "3",
    )  # fmt: skip
    assert code == 0, err
    assert "over limit" in out, out
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        product = (await client.get("/v1/products/flash-drop")).json()
    assert product["max_per_customer"] == 2
    found = await check_database(database_url)
    assert found["customers hold no more than max_per_customer"] == []
