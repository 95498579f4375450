"""Chaos: every database session killed, twice, while clients are subscribed on two nodes.

The relay used to die for good here (an ``InterfaceError`` from releasing its lease
escaped its loop), depending on which asyncpg error came first, so the kill is repeated
for many rounds. A PostgreSQL restart is not possible on the shared test server; killing
every session (``pg_terminate_backend``) is what the relay, the hub's reader, the pools
and the sweeper see of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
import httpx
import pytest

from .conftest import wait_until
from .test_realtime_e2e import WsClient, adjust, put_warehouse, truth, unique

pytestmark = pytest.mark.asyncio

SESSIONS = """
SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend' AND application_name <> 'chaos-test'
"""

KILL_ALL = """
SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
  AND backend_type = 'client backend' AND application_name <> 'chaos-test'
  AND pg_terminate_backend(pid)
"""


async def adjust_when_possible(http: httpx.AsyncClient, product: str, warehouse: str) -> None:
    """One adjustment, retried while the server answers 503 (its pooled sessions died)."""
    async with asyncio.timeout(10):
        while True:
            answer = await http.post(
                f"/v1/products/{product}/stock/{warehouse}/adjustments", json={"delta": 1}
            )
            if answer.status_code == 200:
                return
            assert answer.status_code == 503, answer.text
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_updates_resume_after_every_session_is_killed_twice(
    server_factory: Any, scratch_database: str
) -> None:
    env = {"INVENTORY_DATABASE_URL": scratch_database, "INVENTORY_REDIS_PREFIX": unique("chaos")}
    nodes = [await server_factory(env=env), await server_factory(env=env)]
    product, warehouse = unique("chaos-sku"), unique("chaos-wh")
    mine = {"application_name": "chaos-test"}  # the test's own sessions survive
    admin = await asyncpg.connect(scratch_database, server_settings=mine)
    pool = await asyncpg.create_pool(scratch_database, min_size=1, max_size=2, server_settings=mine)
    lags = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            https = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=n.base_url, timeout=10))
                for n in nodes
            ]
            await put_warehouse(https[0], warehouse)
            await adjust(https[0], product, warehouse, 5)
            clients = [await stack.enter_async_context(WsClient.open(n.ws_url)) for n in nodes]
            for client in clients:
                await client.subscribe([product])
            for round_no in range(10):
                killed: set[int] = set()
                for _ in range(2):  # the second kill hits the sessions opened again

                    async def reconnected(killed: set[int] = killed) -> bool:
                        return bool(set(await admin.fetchval(SESSIONS)) - killed)

                    await wait_until(reconnected, 5, "the servers to open sessions")
                    killed.update(await admin.fetchval(KILL_ALL))
                reachable = time.monotonic()  # the server never went away, only sessions
                await adjust_when_possible(https[round_no % 2], product, warehouse)
                expected = await truth(pool, [product])
                await asyncio.gather(*(c.converge(expected, timeout=2.0) for c in clients))
                lags.append(time.monotonic() - reachable)
            for http in https:  # and nothing stays unready
                assert (await http.get("/ready")).status_code == 200
    except BaseException:
        for node in nodes:  # what the servers said, for the failure report
            print(node.log.read_text(errors="replace")[-5000:])
        raise
    finally:
        await pool.close()
        await admin.close()
    print(f"update after the kills reached both nodes in at most {max(lags):.2f}s")
