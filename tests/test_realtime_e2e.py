"""End-to-end tests of the real-time path: outbox relay, Redis pub/sub, WebSocket hub.

Real ``inventory serve`` processes, the session's PostgreSQL and Redis (a private Valkey
where a test stops Redis), and real WebSocket clients over TCP. Every client checks on
every message it reads that, per (product, warehouse), versions never go backwards and
that ``available == quantity - reserved``. Waits are conditions with deadlines.

The relay tests at the end drive :class:`realtime.relay.Relay` in-process against the
real servers, each under its own channel namespace (so its own cursor and leader).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import psutil
import pytest
import redis
import redis.cluster
from msgspec import structs
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from inventory.ops.embedded import EmbeddedValkey
from inventory.store.feed import PgOutbox
from realtime import feed
from realtime.keys import RedisKeys
from realtime.relay import Relay
from realtime.sharded import ShardedSubscriber, publish_all, redis_from_url
from realtime.tasks import restarts
from tests.cluster import LocalCluster
from tests.conftest import wait_until

Levels = dict[tuple[str, str], int]


# --- helpers --------------------------------------------------------------------------


class WsClient:
    """A WebSocket client that checks the ordering guarantees on every message it reads."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.versions: Levels = {}
        self.messages: list[dict[str, Any]] = []

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str, **options: Any) -> AsyncIterator[WsClient]:
        async with connect(url, open_timeout=10, **options) as connection:
            yield cls(connection)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            message = orjson.dumps(message).decode()
        await self.connection.send(message)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.connection.recv(), timeout)
        message: dict[str, Any] = orjson.loads(raw)
        self._check(message)
        self.messages.append(message)
        return message

    def _check(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "snapshot":
            for level in message["levels"]:
                assert level["available"] == level["quantity"] - level["reserved"]
                self.versions[(message["product_id"], level["warehouse_id"])] = level["version"]
        elif kind == "stock":
            key = (message["product_id"], message["warehouse_id"])
            assert message["version"] > self.versions.get(key, 0), (message, self.versions)
            assert message["available"] == message["quantity"] - message["reserved"]
            self.versions[key] = message["version"]
        elif kind == "unsubscribed":
            for key in [k for k in self.versions if k[0] in message["product_ids"]]:
                del self.versions[key]

    async def until(
        self, done: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """Read until a message satisfies ``done``; returns it."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv(timeout)
                if done(message):
                    return message

    async def converge(self, truth: Levels, timeout: float) -> None:
        """Read until this client holds exactly the versions of ``truth``."""
        async with asyncio.timeout(timeout):
            while any(self.versions.get(key) != version for key, version in truth.items()):
                await self.recv(timeout)

    async def subscribe(
        self, product_ids: Sequence[str], since: dict[str, dict[str, int]] | None = None
    ) -> list[dict[str, Any]]:
        """Subscribe; returns the messages up to and including ``subscribed``."""
        start = len(self.messages)
        request: dict[str, Any] = {"op": "subscribe", "product_ids": list(product_ids)}
        if since is not None:
            request["since"] = since
        await self.send(request)
        await self.until(lambda m: m["type"] in ("subscribed", "error"))
        return self.messages[start:]


async def put_warehouse(http: httpx.AsyncClient, warehouse_id: str) -> None:
    answer = await http.put(
        f"/v1/warehouses/{warehouse_id}", json={"name": "w", "status": "active"}
    )
    assert answer.status_code in (200, 201), answer.text


async def adjust(http: httpx.AsyncClient, product_id: str, warehouse_id: str, delta: int) -> int:
    answer = await http.post(
        f"/v1/products/{product_id}/stock/{warehouse_id}/adjustments", json={"delta": delta}
    )
    assert answer.status_code == 200, answer.text
    version: int = answer.json()["version"]
    return version


async def truth(pool: asyncpg.Pool | asyncpg.Connection, product_ids: Sequence[str]) -> Levels:
    rows = await pool.fetch(
        "SELECT product_id, warehouse_id, version FROM stock_levels WHERE product_id = ANY($1)",
        list(product_ids),
    )
    return {(r["product_id"], r["warehouse_id"]): r["version"] for r in rows}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    """A private Valkey on a free port that a test may stop and restart (same port)."""
    server = EmbeddedValkey(tmp_path / "valkey")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server_redis_url(any_redis_url: str) -> str:
    """Every server test here runs on single-node Redis and on a 3-master Redis Cluster
    (sharded pub/sub), except those pinned to ``single`` (they stop their own Valkey)."""
    return any_redis_url


single_only = pytest.mark.parametrize("any_redis_url", ["single"], indirect=True)


@contextlib.asynccontextmanager
async def http_client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        yield client


# --- the WebSocket API ----------------------------------------------------------------


async def test_snapshot_then_every_event_in_version_order(server_factory: Any) -> None:
    server = await server_factory()
    product, warehouse, other = unique("rt-sku"), unique("rt-wh"), unique("rt-none")
    async with http_client(server.base_url) as http, WsClient.open(server.ws_url) as client:
        await put_warehouse(http, warehouse)
        await adjust(http, product, warehouse, 10)
        first = await client.subscribe([product, other])
        assert [m["type"] for m in first] == ["snapshot", "snapshot", "subscribed"]
        snapshot = {m["product_id"]: m for m in first if m["type"] == "snapshot"}
        [level] = snapshot[product]["levels"]
        assert level["warehouse_id"] == warehouse
        assert (level["quantity"], level["reserved"], level["version"]) == (10, 0, 1)
        assert level["updated_at"].endswith("Z")
        assert snapshot[other]["levels"] == []
        assert first[-1] == {"type": "subscribed", "product_ids": [product, other]}

        async def expect(version: int, event: str, quantity: int, reserved: int) -> None:
            message = await client.until(lambda m: m["type"] == "stock", timeout=5)
            assert (message["version"], message["event"]) == (version, event)
            assert (message["quantity"], message["reserved"]) == (quantity, reserved)
            assert message["product_id"] == product
            assert isinstance(message["ts"], float)

        async def reservation(quantity: int, ttl: int = 900) -> str:
            line = {"product_id": product, "warehouse_id": warehouse, "quantity": quantity}
            answer = await http.post("/v1/reservations", json={"lines": [line], "ttl_seconds": ttl})
            assert answer.status_code == 201, answer.text
            reservation_id: str = answer.json()["id"]
            return reservation_id

        await adjust(http, product, warehouse, 5)
        await expect(2, "adjusted", 15, 0)
        committed = await reservation(3)
        await expect(3, "reserved", 15, 3)
        assert (await http.post(f"/v1/reservations/{committed}/commit")).status_code == 200
        await expect(4, "committed", 12, 0)
        released = await reservation(2)
        await expect(5, "reserved", 12, 2)
        assert (await http.post(f"/v1/reservations/{released}/release")).status_code == 200
        await expect(6, "released", 12, 0)
        await reservation(1, ttl=1)
        await expect(7, "reserved", 12, 1)
        await expect(8, "expired", 12, 0)  # the sweeper, within 2 s of the deadline


async def test_since_and_unsubscribe(server_factory: Any) -> None:
    server = await server_factory()
    a, b = unique("rt-a"), unique("rt-b")
    w1, w2 = unique("rt-wh"), unique("rt-wh")
    async with http_client(server.base_url) as http, WsClient.open(server.ws_url) as client:
        for warehouse in (w1, w2):
            await put_warehouse(http, warehouse)
            await adjust(http, a, warehouse, 4)
        await adjust(http, b, w1, 1)
        first = await client.subscribe([a, b], since={a: {w1: 1}})
        levels = {m["product_id"]: m["levels"] for m in first if m["type"] == "snapshot"}
        assert [level["warehouse_id"] for level in levels[a]] == [w2]  # w1 v1 is known
        assert len(levels[b]) == 1

        await client.send({"op": "unsubscribe", "product_ids": [a]})
        assert await client.until(lambda m: m["type"] == "unsubscribed") == {
            "type": "unsubscribed",
            "product_ids": [a],
        }
        await adjust(http, a, w1, 1)  # committed and published before b's change
        version = await adjust(http, b, w1, 1)
        message = await client.until(lambda m: m["type"] == "stock")
        assert (message["product_id"], message["version"]) == (b, version)
        assert not [m for m in client.messages[len(first) :] if m.get("product_id") == a]


async def test_change_through_one_server_is_seen_on_another(server_factory: Any) -> None:
    a, b = await asyncio.gather(server_factory(), server_factory())
    product, warehouse = unique("rt-sku"), unique("rt-wh")
    async with http_client(b.base_url) as http, WsClient.open(a.ws_url) as client:
        await put_warehouse(http, warehouse)
        await client.subscribe([product])
        version = await adjust(http, product, warehouse, 7)  # a new row, through B
        message = await client.until(lambda m: m["type"] == "stock", timeout=2.0)
        assert (message["warehouse_id"], message["version"], message["quantity"]) == (
            warehouse,
            version,
            7,
        )


def move_slot(cluster: LocalCluster, channel: str) -> None:
    """Migrate the slot of ``channel`` (holding no keys) to another master, the way a
    resharding does (IMPORTING/MIGRATING, then SETSLOT NODE on every node)."""
    slot = key_slot(channel.encode())
    nodes = {port: redis.Redis(port=port) for port in cluster.ports}
    try:
        with redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0]) as client:
            source = int(client.nodes_manager.get_node_from_slot(slot).port)
        target = next(port for port in cluster.ports if port != source)
        ids = {port: node.execute_command("CLUSTER MYID") for port, node in nodes.items()}
        nodes[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        nodes[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        assert nodes[source].execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
        for port in (target, source, *(p for p in nodes if p not in (source, target))):
            nodes[port].execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
    finally:
        for node in nodes.values():
            node.close()


@pytest.mark.parametrize("any_redis_url", ["cluster"], indirect=True)
async def test_stream_follows_a_slot_migration(
    server_factory: Any, db_pool: asyncpg.Pool, private_cluster: LocalCluster
) -> None:
    """A product's channel slot moves to another shard while a client is subscribed
    (server-side SUNSUBSCRIBE on the old owner): the hub re-reads the slot map,
    subscribes on the new owner and resyncs, so later updates still arrive."""
    namespace = unique("rt-move")
    server = await server_factory(
        env={"INVENTORY_REDIS_URL": private_cluster.url, "INVENTORY_REDIS_PREFIX": namespace}
    )
    product, warehouse = unique("rt-sku"), unique("rt-wh")
    async with http_client(server.base_url) as http, WsClient.open(server.ws_url) as client:
        await put_warehouse(http, warehouse)
        await adjust(http, product, warehouse, 5)
        await client.subscribe([product])
        channel = RedisKeys(namespace).stock_channel(product)
        await asyncio.to_thread(move_slot, private_cluster, channel)
        for _ in range(3):
            await adjust(http, product, warehouse, 1)
            await client.converge(await truth(db_pool, [product]), timeout=5.0)


class _ResyncBug:
    """A hub whose first resync after a slot move raises (a bug in its callback)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.failed = self.resyncs = 0

    def on_message(self, channel: bytes, data: bytes) -> None:
        self.messages.append(data)

    def on_connected(self, reconnect: bool) -> None:
        if not reconnect:
            return
        if not self.failed:
            self.failed += 1
            raise RuntimeError("resync bug")
        self.resyncs += 1


async def test_cluster_map_refresh_is_restarted_and_still_resyncs(
    private_cluster: LocalCluster,
) -> None:
    """The sharded subscriber's slot-map refresh runs supervised: when an error escapes
    it (the hub's resync callback, after a slot migration) it is restarted and counted,
    the resync the hub is owed is made by the restarted task, and messages arrive from
    the channel's new owner."""
    client = redis_from_url(private_cluster.url)
    hub = _ResyncBug()
    subscriber = ShardedSubscriber(client, hub, refresh_interval=0.05)
    channel = unique("rt-map")
    before = restarts["realtime-cluster-map"]
    try:
        await subscriber.start()
        subscriber.want([channel])

        async def subscribed() -> bool:  # false until the node subscribers are connected
            return await (await subscriber.flush())

        await wait_until(subscribed, 5, "the channel subscribed")
        await asyncio.to_thread(move_slot, private_cluster, channel)
        await wait_until(
            lambda: restarts["realtime-cluster-map"] == before + 1, 5, "the refresh restarted"
        )
        await wait_until(lambda: hub.resyncs == 1, 5, "the owed resync, by the new run")
        assert hub.failed == 1
        await publish_all(client, [(channel, b"after the move")])
        await wait_until(lambda: b"after the move" in hub.messages, 5, "a message after it")
    finally:
        await subscriber.stop()
        await client.aclose()


async def test_bad_input_answers_error_and_keeps_the_connection(server_factory: Any) -> None:
    server = await server_factory()
    product = unique("rt-sku")
    cases: list[tuple[str | bytes, str]] = [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('{"op": "publish"}', "unknown_op"),
        ('{"op": "ping", "extra": 1}', "invalid_message"),
        ('{"op": "subscribe", "product_ids": []}', "invalid_message"),
        ('{"op": "subscribe", "product_ids": ["bad id"]}', "invalid_product_id"),
        ('{"op": "subscribe", "product_ids": ["' + "x" * 129 + '"]}', "invalid_product_id"),
        ('{"op": "unsubscribe", "product_ids": [3]}', "invalid_product_id"),
        ('{"op": "subscribe", "product_ids": ["a"], "since": {"a": {"w": -1}}}', "invalid_message"),
        (b"\x00\x01binary", "unsupported_frame"),
    ]
    async with WsClient.open(server.ws_url) as client:
        for frame, code in cases:
            await client.send(frame)
            error = await client.recv()
            assert error["type"] == "error", (frame, error)
            assert error["code"] == code, (frame, error)
            assert error["message"]
        await client.send({"op": "ping"})
        assert await client.recv() == {"type": "pong"}

        many = [f"{product}-{i}" for i in range(1000)]
        answer = await client.subscribe(many)
        assert answer[-1]["type"] == "subscribed"
        assert sum(m["type"] == "snapshot" for m in answer) == 1000
        error = (await client.subscribe([product]))[-1]
        assert error["type"] == "error"
        assert error["code"] == "too_many_subscriptions"
        await client.send({"op": "ping"})
        assert await client.recv() == {"type": "pong"}

    async with WsClient.open(server.ws_url, max_size=None) as client:
        await client.send("x" * (64 * 1024 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
    async with WsClient.open(server.ws_url) as client:  # the server is unaffected
        await client.send({"op": "ping"})
        assert await client.recv() == {"type": "pong"}


# --- disturbances ---------------------------------------------------------------------


@single_only
async def test_redis_restart_resyncs_every_client(
    server_factory: Any, db_pool: asyncpg.Pool, valkey: EmbeddedValkey
) -> None:
    server = await server_factory(
        env={"INVENTORY_REDIS_URL": valkey.url, "INVENTORY_REDIS_PREFIX": unique("rt-restart")}
    )
    products = [unique("rt-sku") for _ in range(3)]
    warehouses = [unique("rt-wh") for _ in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(http_client(server.base_url))
        for warehouse in warehouses:
            await put_warehouse(http, warehouse)
            for product in products:
                await adjust(http, product, warehouse, 5)
        clients = [await stack.enter_async_context(WsClient.open(server.ws_url)) for _ in range(5)]
        for client in clients:
            await client.subscribe(products)

        valkey.stop()
        for product in products:  # writers do not need Redis
            for warehouse in warehouses:
                await adjust(http, product, warehouse, 1)
            await adjust(http, product, warehouses[0], -1)
        await asyncio.sleep(0.5)
        valkey.start()
        expected = await truth(db_pool, products)
        await asyncio.gather(*(c.converge(expected, timeout=2.0) for c in clients))

        await adjust(http, products[0], warehouses[1], 1)  # and the stream flows again
        expected = await truth(db_pool, products)
        await asyncio.gather(*(c.converge(expected, timeout=2.0) for c in clients))


@single_only
async def test_each_redis_gets_its_own_relay_leader(
    server_factory: Any, db_pool: asyncpg.Pool, valkey: EmbeddedValkey
) -> None:
    """Two processes on one database and prefix but different Redis servers: each Redis
    has its own relay leader and stream (the lease and cursor are per database and
    Redis). Changes written through either process reach subscribers of both, also
    while the other Redis is down and after its process was SIGKILLed."""
    namespace = unique("rt-redis")
    other = await server_factory(
        env={"INVENTORY_REDIS_URL": valkey.url, "INVENTORY_REDIS_PREFIX": namespace}
    )  # started first: under a prefix-only lease it would lead for both
    main = await server_factory(env={"INVENTORY_REDIS_PREFIX": namespace})
    products = [unique("rt-sku") for _ in range(3)]
    warehouse = unique("rt-wh")
    async with (
        http_client(other.base_url) as http,
        http_client(main.base_url) as main_http,
        WsClient.open(main.ws_url) as client,
        WsClient.open(other.ws_url) as other_client,
    ):
        for server_http in (http, main_http):
            body = (await server_http.get("/ready")).json()
            assert body["checks"]["relay"] is True, body
        await put_warehouse(http, warehouse)
        for product in products:
            await adjust(http, product, warehouse, 3)
        await client.subscribe(products)
        await other_client.subscribe(products)
        await adjust(main_http, products[0], warehouse, 1)
        expected = await truth(db_pool, products)
        await asyncio.gather(
            client.converge(expected, timeout=3.0), other_client.converge(expected, timeout=3.0)
        )

        valkey.stop()
        for product in products:  # written through the process whose Redis is down
            await adjust(http, product, warehouse, 2)
        await client.converge(await truth(db_pool, products), timeout=3.0)
        other.kill()
        await adjust(main_http, products[1], warehouse, 1)
        await client.converge(await truth(db_pool, products), timeout=3.0)


async def scrape(http: httpx.AsyncClient, name: str) -> float:
    """One sample of a Prometheus counter or gauge from ``GET /metrics``."""
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.slow
@single_only
async def test_clients_that_never_read_do_not_grow_server_memory(
    server_factory: Any, db_pool: asyncpg.Pool, database_url: str
) -> None:
    """50 clients stop reading while 20,000 updates flow; unbounded queues would grow by
    about 50 x 20,000 x 230 B = 230 MB, the hub keeps the newest state per row and
    connection. A reading client stays within 2 s of the truth throughout (checked at
    every 1,000 updates) and ends on it; a stalled client that reads again ends on it too.

    The stalled clients announce a small MSS and receive buffer, as over a real network:
    on loopback (64 KiB segments) the kernel would otherwise buffer megabytes per socket
    and the server would never have to hold anything back. The updates are written
    straight to the database with the service's own SQL shape (row update plus its ledger
    row, one transaction per statement, no wait for the WAL flush) so that 20,000 changes
    take seconds, paced to about one statement per relay poll; everything after the commit
    is the real path.
    """
    server = await server_factory()
    process = psutil.Process(server.pid)
    loop = asyncio.get_running_loop()
    product = unique("rt-hot")
    warehouses = [unique("rt-wh") for _ in range(20)]
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(http_client(server.base_url))
        for warehouse in warehouses:
            await put_warehouse(http, warehouse)
            await adjust(http, product, warehouse, 1)
        stalled = []
        for _ in range(50):
            sock = socket.socket()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            # max_queue=1: the client stops reading its socket after one message; without
            # compression, so that each message takes its full size in the buffers.
            opened = WsClient.open(server.ws_url, max_queue=1, compression=None, sock=sock)
            client = await stack.enter_async_context(opened)
            # On the way out, before its own exit: a closing handshake would wait for reads.
            stack.callback(client.connection.transport.abort)
            await client.send({"op": "subscribe", "product_ids": [product]})
            stalled.append(client)
        reader = await stack.enter_async_context(WsClient.open(server.ws_url))
        await reader.subscribe([product])

        writer = await asyncpg.connect(database_url)
        stack.push_async_callback(writer.close)
        await writer.execute("SET synchronous_commit TO off")
        checkpoints: list[tuple[float, Levels]] = []  # (written at, versions then)

        async def update(statements: int, pace: float) -> None:
            for done in range(1, statements + 1):
                await writer.execute(
                    """
                    WITH changed AS (
                        UPDATE stock_levels
                        SET quantity = quantity + 1, version = version + 1, updated_at = now()
                        WHERE product_id = $1
                        RETURNING product_id, warehouse_id, quantity, reserved, version)
                    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta,
                                           reserved_delta, quantity, reserved, version, reason)
                    SELECT product_id, warehouse_id, 'adjusted', 1, 0, quantity, reserved,
                           version, 'realtime e2e load'
                    FROM changed
                    """,
                    product,
                )
                if done % 50 == 0:
                    checkpoints.append((loop.time(), await truth(db_pool, [product])))
                await asyncio.sleep(pace)

        await update(50, pace=0.0)  # warm-up: 1,000 updates
        await reader.converge(checkpoints.pop()[1], timeout=10)
        baseline = peak = process.memory_info().rss
        # 19,000 more, about one statement per relay poll: each update reaches the clients
        # as a message of its own (instead of being coalesced with the next versions).
        writing = asyncio.create_task(update(950, pace=0.01))
        reached = 0
        while not writing.done() or reached < len(checkpoints):
            with contextlib.suppress(TimeoutError):
                await reader.recv(timeout=0.1)
            peak = max(peak, process.memory_info().rss)
            while reached < len(checkpoints) and all(
                reader.versions.get(key, 0) >= version
                for key, version in checkpoints[reached][1].items()
            ):
                reached += 1
            if reached < len(checkpoints):
                behind = loop.time() - checkpoints[reached][0]
                assert behind < 2.0, f"the reading client is {behind:.1f}s behind"
        await writing
        assert reader.versions == await truth(db_pool, [product])
        assert peak - baseline < 40 * 2**20, f"RSS grew {(peak - baseline) / 2**20:.1f} MiB"

        async def conflated() -> bool:  # exported every second
            return await scrape(http, "inventory_ws_conflated_total") > 0

        await eventually(conflated, 3.0)  # the stalled connections were held back

        slow = stalled[0]  # reads again: what was buffered, then the newest state
        await slow.converge(await truth(db_pool, [product]), timeout=10.0)
        assert sum(m["type"] == "stock" for m in slow.messages) < 20_000


# --- the relay in-process -------------------------------------------------------------


async def write_change(conn: asyncpg.Connection, product: str, warehouse: str) -> int:
    """One stock change as the service writes it: the row and its ledger entry."""
    await conn.execute(
        "INSERT INTO warehouses (id, name, status) VALUES ($1, $1, 'active') "
        "ON CONFLICT (id) DO NOTHING",
        warehouse,
    )
    version: int = await conn.fetchval(
        """
        WITH changed AS (
            INSERT INTO stock_levels (product_id, warehouse_id, quantity, version)
            VALUES ($1, $2, 1, 1)
            ON CONFLICT (product_id, warehouse_id) DO UPDATE
            SET quantity = stock_levels.quantity + 1, version = stock_levels.version + 1,
                updated_at = now()
            RETURNING product_id, warehouse_id, quantity, reserved, version)
        INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                               quantity, reserved, version, reason)
        SELECT product_id, warehouse_id, 'adjusted', 1, 0, quantity, reserved, version,
               'realtime relay test'
        FROM changed
        RETURNING version
        """,
        product,
        warehouse,
    )
    return version


@contextlib.asynccontextmanager
async def channel_messages(
    redis_url: str, namespace: str, product: str
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every stock message of ``product`` published under ``namespace`` meanwhile."""
    redis = redis_from_url(redis_url)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    channel = RedisKeys(namespace).stock_channel(product)
    received: list[dict[str, Any]] = []
    if isinstance(redis, RedisCluster):  # sharded pub/sub, as the relay publishes there
        await pubsub.ssubscribe(channel)

        async def listen() -> None:
            while True:
                message = await pubsub.get_sharded_message(True, timeout=1.0)
                if message is not None:
                    received.append(structs.asdict(feed.decode(message["data"])))
    else:
        await pubsub.subscribe(channel)

        async def listen() -> None:
            async for message in pubsub.listen():
                received.append(structs.asdict(feed.decode(message["data"])))

    task = asyncio.create_task(listen())
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float) -> None:
    """Poll ``check`` (plain or async) until it holds; TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if await result if inspect.isawaitable(result) else result:
                return
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_relay(database_url: str, redis_url: str, namespace: str) -> AsyncIterator[Relay]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    redis = redis_from_url(redis_url)
    relay = Relay(PgOutbox(pool), redis, prefix=namespace)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()
        await redis.aclose()
        await pool.close()


async def test_relay_publishes_in_commit_order_and_skips_nothing(
    database_url: str, any_redis_url: str
) -> None:
    """Ids and xids commit out of order: the younger transaction's row is published as
    soon as it commits (not held back by the open older one), and the older row still
    arrives when it commits later, although the cursor has moved past its xid and id."""
    namespace = unique("rt-relay")
    product = unique("rt-sku")
    older, younger = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        async with (
            channel_messages(any_redis_url, namespace, product) as published,
            running_relay(database_url, any_redis_url, namespace) as relay,
        ):
            await eventually(lambda: relay.leader, 5)
            first = older.transaction()
            await first.start()
            await write_change(older, product, "w-old")
            async with younger.transaction():
                await write_change(younger, product, "w-young")
            await eventually(lambda: len(published) == 1, 5)
            assert published[0]["warehouse_id"] == "w-young"
            await first.commit()
            await eventually(lambda: len(published) == 2, 5)
            assert [m["warehouse_id"] for m in published] == ["w-young", "w-old"]
    finally:
        await older.close()
        await younger.close()


@contextlib.asynccontextmanager
async def open_foreign_transaction(url: str, sql: str | None = None) -> AsyncIterator[None]:
    """A session on ``url`` inside a transaction that has an xid and stays open (as an
    idle-in-transaction psql session), optionally after running ``sql``."""
    conn = await asyncpg.connect(url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.fetchval("SELECT pg_current_xact_id()")
        if sql is not None:
            await conn.execute(sql)
        yield
        await transaction.rollback()
    finally:
        await conn.close()


@pytest.mark.parametrize("where", ["another database", "an unrelated table"])
async def test_relay_does_not_wait_for_foreign_transactions(
    database_url: str, scratch_database: str, redis_url: str, where: str
) -> None:
    """A transaction that writes no ledger row, open in another database of the same
    server or in this one (writing only an unrelated table), holds nothing back: the
    update arrives while it is still open."""
    namespace = unique("rt-relay")
    product = unique("rt-sku")
    conn = await asyncpg.connect(database_url)
    if where == "another database":
        foreign = open_foreign_transaction(scratch_database)
    else:
        await conn.execute("CREATE TABLE IF NOT EXISTS unrelated_to_ledger (x int)")
        foreign = open_foreign_transaction(
            database_url, "INSERT INTO unrelated_to_ledger VALUES (1)"
        )
    try:
        async with (
            channel_messages(redis_url, namespace, product) as published,
            running_relay(database_url, redis_url, namespace) as relay,
            foreign,
        ):
            await eventually(lambda: relay.leader, 5)
            await write_change(conn, product, "w1")
            await eventually(lambda: len(published) == 1, 3)
            assert published[0]["version"] == 1
    finally:
        await conn.close()


async def test_relay_keeps_its_cursor_while_redis_is_down(
    database_url: str, valkey: EmbeddedValkey
) -> None:
    """The cursor moves only after a publish succeeded: held while Redis is down, then
    the backlog is published when it returns."""
    namespace = unique("rt-relay")
    product = unique("rt-sku")
    conn = await asyncpg.connect(database_url)

    relay_name: list[str] = []

    async def cursor() -> tuple[int, int]:
        row = await conn.fetchrow(
            "SELECT last_ticket, last_id FROM relay_cursor WHERE name = $1", relay_name[0]
        )
        return (row["last_ticket"], row["last_id"]) if row is not None else (0, 0)

    async def newest() -> tuple[int, int]:
        row = await conn.fetchrow(
            """SELECT c.ticket, m.id FROM movements m JOIN ledger_commits c USING (xid)
               WHERE m.product_id = $1 ORDER BY m.id DESC LIMIT 1""",
            product,
        )
        assert row is not None
        return (row["ticket"], row["id"])

    async def caught_up() -> bool:
        return await cursor() == await newest()

    try:
        async with running_relay(database_url, valkey.url, namespace) as relay:
            await eventually(lambda: relay.leader, 5)
            assert relay.lease_name is not None
            relay_name.append(relay.lease_name)
            await write_change(conn, product, "w1")
            await eventually(caught_up, 5)
            published = await cursor()
            valkey.stop()
            for _ in range(3):
                await write_change(conn, product, "w1")
            await asyncio.sleep(1.0)
            assert await cursor() == published  # the backlog is kept, not skipped
            valkey.start()
            await eventually(caught_up, 3)
    finally:
        await conn.close()


async def test_relay_leadership_moves_when_the_leader_stops(
    database_url: str, any_redis_url: str
) -> None:
    namespace = unique("rt-relay")
    product = unique("rt-sku")
    conn = await asyncpg.connect(database_url)
    try:
        async with (
            channel_messages(any_redis_url, namespace, product) as published,
            running_relay(database_url, any_redis_url, namespace) as first,
        ):
            await eventually(lambda: first.leader, 5)
            async with running_relay(database_url, any_redis_url, namespace) as second:
                await asyncio.sleep(0.2)
                assert not second.leader  # one leader per database and namespace
                await write_change(conn, product, "w1")
                await eventually(lambda: len(published) == 1, 5)
                await first.stop()
                await eventually(lambda: second.leader, 5)
                await write_change(conn, product, "w1")
                await eventually(lambda: len(published) == 2, 5)
                assert [m["version"] for m in published] == [1, 2]
    finally:
        await conn.close()
