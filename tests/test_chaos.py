"""Chaos while clients are subscribed on two nodes: every database session killed, twice,
and PostgreSQL itself restarted.

The relay used to die for good here (an ``InterfaceError`` from releasing its lease
escaped its loop), depending on which asyncpg error came first, so the kill is repeated
for many rounds. The restarts run on a PostgreSQL of the test's own
(``private_postgres``): restarting the session's or the machine's server would break
every other test.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Container
from functools import partial
from typing import Any, Literal

import asyncpg
import httpx
import pytest

from .conftest import PrivatePostgres, wait_until
from .test_realtime_e2e import Levels, WsClient, adjust, put_warehouse, truth, unique

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


async def retried(
    send: Callable[[], Awaitable[httpx.Response]],
    ok: Container[int] = (200,),
    timeout: float = 10,
) -> httpx.Response:
    """``send()`` again while the server answers 503 (its sessions died, or PostgreSQL is
    down); any answer other than ``ok`` and 503 fails the test."""
    async with asyncio.timeout(timeout):
        while True:
            answer = await send()
            if answer.status_code in ok:
                return answer
            assert answer.status_code == 503, answer.text
            await asyncio.sleep(0.05)


async def adjust_when_possible(http: httpx.AsyncClient, product: str, warehouse: str) -> None:
    """One adjustment, retried while the server answers 503."""
    url = f"/v1/products/{product}/stock/{warehouse}/adjustments"
    await retried(partial(http.post, url, json={"delta": 1}))


async def http_clients(
    stack: contextlib.AsyncExitStack, nodes: list[Any], warehouse: str, stock: dict[str, int]
) -> list[httpx.AsyncClient]:
    """An HTTP client per node (closed with ``stack``); the warehouse and the products'
    on-hand set up through the first."""
    https = [
        await stack.enter_async_context(httpx.AsyncClient(base_url=n.base_url, timeout=10))
        for n in nodes
    ]
    await put_warehouse(https[0], warehouse)
    for product, quantity in stock.items():
        await adjust(https[0], product, warehouse, quantity)
    return https


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
            https = await http_clients(stack, nodes, warehouse, {product: 5})
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


# --- PostgreSQL restarts ----------------------------------------------------------------

RESTARTS: tuple[Literal["fast", "immediate"], ...] = ("fast", "immediate", "fast")
"""A clean restart, a crash (recovery from the WAL at start), a clean restart."""


class Load:
    """Through each node, until stopped: a reservation (its ``Idempotency-Key`` the same
    on every retry), its release and an adjustment, each retried through outages as a
    careful client would, at a steady trickle (not a benchmark)."""

    def __init__(self, https: list[httpx.AsyncClient], product: str, warehouse: str) -> None:
        self._line = {"product_id": product, "warehouse_id": warehouse, "quantity": 1}
        self._adjustments = f"/v1/products/{product}/stock/{warehouse}/adjustments"
        self._stop = asyncio.Event()
        self._rounds = 0
        self._tasks = [asyncio.create_task(self._run(http)) for http in https]

    @property
    def rounds(self) -> int:
        """Rounds done so far by all nodes; raises what stopped a node's load early."""
        for task in self._tasks:
            if task.done() and not self._stop.is_set():
                raise AssertionError("the load stopped") from task.exception()
        return self._rounds

    async def _run(self, http: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            body = {"lines": [self._line], "ttl_seconds": 60}
            headers = {"Idempotency-Key": uuid.uuid4().hex}
            reserve = partial(http.post, "/v1/reservations", json=body, headers=headers)
            reservation = (await retried(reserve, ok=(201,), timeout=30)).json()["id"]
            release = partial(http.post, f"/v1/reservations/{reservation}/release")
            await retried(release, timeout=30)
            await retried(partial(http.post, self._adjustments, json={"delta": 1}), timeout=30)
            self._rounds += 1
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Let every node's current round finish; raises a load's failure."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Reader:
    """Reads every message of a WebSocket client as it comes (checking its order), so
    the client never falls behind while the test waits on something else."""

    def __init__(self, client: WsClient) -> None:
        self.client = client
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.client.recv(timeout=3600)

    def has(self, expected: Levels) -> bool:
        """Whether the client has seen at least the versions of ``expected``; raises what
        stopped the reader (a closed connection, an order check)."""
        if self._task.done():
            raise AssertionError("a WebSocket client stopped reading") from self._task.exception()
        versions = self.client.versions
        return all(versions.get(key, 0) >= version for key, version in expected.items())

    async def cancel(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def all_answer(https: list[httpx.AsyncClient], path: str, status: int) -> bool:
    answers = await asyncio.gather(*(http.get(path) for http in https))
    return all(answer.status_code == status for answer in answers)


async def versions_now(url: str, products: list[str]) -> Levels:
    """The committed versions, read on a new session (the old ones died with the server)."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await truth(conn, products)
    finally:
        await conn.close()


@pytest.mark.slow
async def test_updates_resume_after_every_postgresql_restart(
    server_factory: Any, private_postgres: PrivatePostgres
) -> None:
    """Both nodes on a PostgreSQL that is restarted three times (:data:`RESTARTS`) under
    a load of reservations and adjustments retried through each outage. Each time it is
    back: an adjustment made then reaches the clients of both nodes within 2 s of
    PostgreSQL being back (the adjustment's own retries included), /ready is green again
    on both and the load goes on; at the end every client has the last version of
    every level (and no message ever went backwards)."""
    env = {
        "INVENTORY_DATABASE_URL": private_postgres.url,
        "INVENTORY_REDIS_PREFIX": unique("restart"),
    }
    nodes = list(await asyncio.gather(server_factory(env=env), server_factory(env=env)))
    probe, busy, warehouse = unique("probe-sku"), unique("busy-sku"), unique("restart-wh")
    lags: list[float] = []
    try:
        async with contextlib.AsyncExitStack() as stack:
            https = await http_clients(stack, nodes, warehouse, {probe: 5, busy: 100})
            readers = []
            for node in nodes:
                client = await stack.enter_async_context(WsClient.open(node.ws_url))
                await client.subscribe([probe, busy])
                readers.append(Reader(client))
                stack.push_async_callback(readers[-1].cancel)
            load = Load(https, busy, warehouse)
            stack.push_async_callback(load.cancel)
            for n, mode in enumerate(RESTARTS):
                done = load.rounds
                await wait_until(lambda d=done: load.rounds > d + 5, 10, "the load going")
                await private_postgres.stop(mode)
                await wait_until(lambda: all_answer(https, "/ready", 503), 10, "nodes unready")
                await private_postgres.start()
                back = time.monotonic()
                await adjust_when_possible(https[n % 2], probe, warehouse)
                expected = await versions_now(private_postgres.url, [probe])
                await wait_until(
                    lambda e=expected: all(r.has(e) for r in readers),
                    round(2.0 - (time.monotonic() - back), 3),  # 2 s from "back"
                    f"restart {n + 1} ({mode}): the adjustment on both nodes' clients",
                )
                lags.append(time.monotonic() - back)
                await wait_until(lambda: all_answer(https, "/ready", 200), 10, "nodes ready")
                done = load.rounds
                await wait_until(lambda d=done: load.rounds > d, 10, "the load going on")
            await load.stop()
            final = await versions_now(private_postgres.url, [probe, busy])
            await wait_until(lambda: all(r.has(final) for r in readers), 2.0, "last versions")
    except BaseException:
        for node in nodes:  # what the servers said, for the failure report
            print(node.log.read_text(errors="replace")[-5000:])
        raise
    print(
        f"{load.rounds} load rounds; after each restart an update reached both nodes "
        f"{', '.join(f'{lag:.2f}' for lag in lags)} s after PostgreSQL was back"
    )
