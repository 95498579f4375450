"""Fan-out benchmark: the WebSocket hub against a bare ``websockets`` broadcast server.

Three measurements, each repeated and reported as the median:

* **Throughput**: one product, ``clients`` subscribers on one server process. Stock
  messages are published to the product's Redis channel at ``rate`` per second (by
  default 200,000 offers/s to 1,000 clients: more than the bare server can fan out on a
  2-core machine, so it runs flat out and queues). Reported: deliveries/s seen by the
  clients and server CPU time per delivery (psutil, the server process only). The hub
  writes pre-encoded frames straight to the sockets and may deliver everything offered;
  the report then says so, and its figure is a lower bound (raise ``--rate`` to find
  its ceiling: conflation then keeps it flat out without a backlog). The
  ceiling is a bare ``websockets`` server (:func:`serve_bare`, its own process) that
  subscribes to the same channel and calls ``websockets.asyncio.server.broadcast`` with
  the same payload to the same number of clients, in the same run. Both paths get the
  identical Redis input; the relay is not involved (it runs once per database, not per
  delivery). The bare server has no backpressure: it never conflates, it queues.
* **Latency**: commit -> client at ``clients`` subscribers and ``latency_rate`` updates/s,
  made through the HTTP API (``POST .../adjustments``), so the path is commit, outbox
  relay, Redis, hub, socket. Per delivery: arrival wall time minus the message's ``ts``
  (the movement's ``created_at``, i.e. the transaction start). The ceiling is the bare
  server's publish -> client latency at the same rate (``ts`` set at publish).
* **Memory per idle connection**: ``idle_connections`` connections each subscribed to
  ``idle_products`` products; server RSS growth / connections, against the bare server
  with the same number of (idle) connections.

The clients are raw asyncio protocols (handshake, unmasked frame parsing, pong replies)
costing a few microseconds per frame, so the client side does not cap the servers on a
2-core machine. Neither side negotiates permessage-deflate.

A fourth measurement, **slow clients** (``--slow``), shows what the raw clients hide:
real clients read slower, so the server meets backpressure. ``clients`` subscribers in
``slow_processes`` client processes (sharing the machine's cores with the servers), of
two kinds in turn: ``raw`` (the protocol above) and ``library`` (the ``websockets``
library's asyncio client, parsing every frame with orjson). Updates are made through
the HTTP API at ``latency_rate`` per second in both phases; the hub's clients subscribe to
the product, the bare server's get every message of the namespace from the same relay.
Reported per kind: deliveries/s, server CPU per delivery (the hub's from which the
inventory server's HTTP and relay CPU in the bare phase, same load, is subtracted) and
commit -> client p50/p99 (log-binned at 2 % resolution in the client processes).

Run: ``python -m bench.fanout [--clients 1000] [--repeats 3] [--json out.json]``; it uses
``INVENTORY_DATABASE_URL`` / ``INVENTORY_REDIS_URL`` or embedded servers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import resource
import secrets
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import httpx
import orjson
import psutil
import redis.asyncio as aioredis

from bench.stack import ServerProcess, backing_servers, scratch_databases
from realtime import feed
from realtime.feed import StockData
from realtime.keys import RedisKeys
from realtime.protocol import encode_stock

__all__ = ["main", "run_fanout_bench", "serve_bare"]

WAREHOUSES = 10  # rows of the benchmark product, updated round-robin


# --- clients --------------------------------------------------------------------------


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (payloads here are small)."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


class _Client(asyncio.Protocol):
    """A minimal WebSocket client that counts text frames and optionally times them."""

    def __init__(self, host: str, port: int, record: bool) -> None:
        self._request = (
            f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.open: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.subscribed: asyncio.Future[None] | None = None  # set by subscribe()
        self.frames = 0
        self.latencies: list[float] | None = [] if record else None
        self._buffer = bytearray()
        self._upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.open, self.subscribed):
            if future is not None and not future.done():
                future.set_exception(ConnectionError(f"connection lost: {exc}"))

    def subscribe(self, product_ids: Sequence[str]) -> asyncio.Future[None]:
        assert self.transport is not None
        self.subscribed = asyncio.get_running_loop().create_future()
        message = orjson.dumps({"op": "subscribe", "product_ids": list(product_ids)})
        self.transport.write(_frame(0x1, message))
        return self.subscribed

    def reset(self) -> None:
        self.frames = 0
        if self.latencies is not None:
            self.latencies.clear()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if b" 101 " not in buffer[: buffer.find(b"\r\n")]:
                self.open.set_exception(ConnectionError(bytes(buffer[:end]).decode()))
                return
            self._upgraded = True
            del buffer[: end + 4]
            self.open.set_result(None)
        now = time.time()
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            length = buffer[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                header = 10
            end = pos + header + length
            if end > size:
                break
            opcode = buffer[pos] & 0x0F
            if opcode == 0x1:
                self._on_text(buffer, pos + header, end, now)
            elif opcode == 0x9:
                assert self.transport is not None
                self.transport.write(_frame(0xA, bytes(buffer[pos + header : end])))
            pos = end
        del buffer[:pos]

    def _on_text(self, buffer: bytearray, start: int, end: int, now: float) -> None:
        if buffer.startswith(b'{"type":"stock"', start):
            self.frames += 1
            if self.latencies is not None:
                at = buffer.rfind(b'"ts":', start, end)
                self.latencies.append(now - float(buffer[at + 5 : end - 1]))
        elif (
            buffer.startswith(b'{"type":"subscribed"', start)
            and self.subscribed is not None
            and not self.subscribed.done()
        ):
            self.subscribed.set_result(None)


@contextlib.asynccontextmanager
async def _clients(
    port: int, count: int, *, subscribe: Sequence[Sequence[str]] | None, record: bool = False
) -> AsyncIterator[list[_Client]]:
    """``count`` connected clients; with ``subscribe``, client i subscribes to entry i."""
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    try:
        for start in range(0, count, 100):
            batch = [
                _Client("127.0.0.1", port, record) for _ in range(start, min(count, start + 100))
            ]
            for client in batch:
                await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
            await asyncio.gather(*(c.open for c in batch))
            clients += batch
        if subscribe is not None:
            done = [client.subscribe(subscribe[i]) for i, client in enumerate(clients)]
            await asyncio.wait_for(asyncio.gather(*done), 120)
        yield clients
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.abort()


# --- update sources -------------------------------------------------------------------


def _stock_payload(n: int, ts: float) -> bytes:
    """The ``n``-th change of a product as the relay publishes it (rows round-robin)."""
    data = StockData(f"w{n % WAREHOUSES}", "adjusted", 1000 + n, 0, n // WAREHOUSES + 1, ts)
    return feed.encode(data)


async def _paced(rate: float, duration: float, send: Callable[[int], Awaitable[None]]) -> None:
    """Call ``await send(i)`` for i = 0, 1, ... at ``rate`` per second for ``duration``."""
    start = time.perf_counter()
    i = 0
    while (elapsed := time.perf_counter() - start) < duration:
        due = int(elapsed * rate) + 1
        while i < due:
            await send(i)
            i += 1
        await asyncio.sleep(max(0.0, i / rate - (time.perf_counter() - start)))


class _Publisher:
    """Publishes stock messages of one product to its channel, versions continuing."""

    def __init__(self, redis: aioredis.Redis, prefix: str, product_id: str) -> None:
        self._redis = redis
        self._channel = RedisKeys(prefix).stock_channel(product_id)
        self.product_id = product_id
        self._sent = 0

    async def run(self, rate: float, duration: float) -> None:
        async def send(_: int) -> None:
            payload = _stock_payload(self._sent, time.time())
            self._sent += 1
            await self._redis.publish(self._channel, payload)

        await _paced(rate, duration, send)


# --- the bare ceiling server ----------------------------------------------------------


async def serve_bare(port: int, redis_url: str, prefix: str) -> None:
    """A bare ``websockets`` server broadcasting every stock message under ``prefix`` to all
    its connections (no subscriptions, no backpressure), each built from the published
    data once, as the hub does."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    async def handler(connection: ServerConnection) -> None:
        await connection.wait_closed()

    redis = aioredis.Redis.from_url(redis_url)
    async with serve(handler, "127.0.0.1", port, compression=None, max_size=65536) as server:
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.psubscribe(RedisKeys(prefix).stock_pattern)
        print("ready", flush=True)
        keys = RedisKeys(prefix)
        async for message in pubsub.listen():
            data = feed.decode(message["data"])
            product_id = keys.product_of_channel(message["channel"])
            if isinstance(data, StockData) and product_id is not None:
                broadcast(server.connections, encode_stock(product_id, data).decode())


@dataclass(frozen=True)
class _Server:
    port: int
    process: psutil.Process
    hub: bool  # the inventory server (else the bare broadcast server)


@contextlib.asynccontextmanager
async def _bare_server(redis_url: str, prefix: str) -> AsyncIterator[_Server]:
    from inventory.ops.embedded import free_port

    port = free_port()
    argv = ["-m", "bench.fanout", "bare-server", str(port), redis_url, prefix]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 30)
        yield _Server(port, psutil.Process(proc.pid), hub=False)
    finally:
        proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def _hub_server(database_url: str, redis_url: str, prefix: str) -> AsyncIterator[_Server]:
    env = {
        **os.environ,
        "INVENTORY_DATABASE_URL": database_url,
        "INVENTORY_REDIS_URL": redis_url,
        "INVENTORY_REDIS_PREFIX": prefix,
        "INVENTORY_TOKENS": "",
        "INVENTORY_LOG_LEVEL": "warning",
    }
    server = ServerProcess.inventory(env, workers=1)
    await asyncio.to_thread(server.start)
    try:
        assert server.proc is not None
        yield _Server(server.port, psutil.Process(server.proc.pid), hub=True)
    finally:
        await asyncio.to_thread(server.stop)


# --- measurements ---------------------------------------------------------------------


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@dataclass(frozen=True)
class _Throughput:
    deliveries_per_s: float
    cpu_us_per_delivery: float


async def _throughput(
    server: _Server,
    publisher: _Publisher,
    clients: int,
    rate: float,
    duration: float,
    topics: Sequence[Sequence[str]] | None,
) -> _Throughput:
    """Deliveries/s and server CPU per delivery; the server's idle CPU (timers, relay
    polling) is measured first with the clients connected and subtracted."""
    process = server.process
    async with _clients(server.port, clients, subscribe=topics) as conns:
        cpu0, idle0 = _cpu(process), time.perf_counter()
        await asyncio.sleep(2.0)
        idle_cores = (_cpu(process) - cpu0) / (time.perf_counter() - idle0)
        await publisher.run(rate, 1.0)  # warm-up
        frames0, cpu0 = sum(c.frames for c in conns), _cpu(process)
        started = time.perf_counter()
        await publisher.run(rate, duration)
        elapsed = time.perf_counter() - started
        frames = sum(c.frames for c in conns) - frames0
        cpu = _cpu(process) - cpu0 - idle_cores * elapsed
    return _Throughput(frames / elapsed, cpu / max(frames, 1) * 1e6)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "samples": 0}

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3

    return {"p50_ms": pick(0.50), "p99_ms": pick(0.99), "samples": len(ordered)}


async def _latency(
    server: _Server, publisher: _Publisher, clients: int, rate: float, duration: float
) -> dict[str, float]:
    """Hub: commit -> client, updates through the HTTP API. Bare: publish -> client."""
    topics = [[publisher.product_id]] * clients if server.hub else None
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
        _clients(server.port, clients, subscribe=topics, record=True) as conns,
    ):
        if server.hub:
            warehouse = f"bench-{secrets.token_hex(3)}"
            answer = await http.put(
                f"/v1/warehouses/{warehouse}", json={"name": "b", "status": "active"}
            )
            answer.raise_for_status()
            url = f"/v1/products/{publisher.product_id}/stock/{warehouse}/adjustments"
            (await http.post(url, json={"delta": 1000})).raise_for_status()

            async def send(i: int) -> None:
                (await http.post(url, json={"delta": -1 if i % 2 else 1})).raise_for_status()

            for c in conns:
                c.reset()
            await _paced(rate, duration, send)
        else:
            await publisher.run(rate, duration)
        await asyncio.sleep(1.0)
        samples = [x for c in conns for x in (c.latencies or [])]
    return _percentiles(samples)


async def _memory(
    server: _Server, connections: int, subscribe: Sequence[Sequence[str]] | None
) -> float:
    """RSS growth per connection, in KiB (after a warm-up round of the same clients)."""
    warm = None if subscribe is None else subscribe[:50]
    async with _clients(server.port, 50, subscribe=warm):
        pass
    await asyncio.sleep(1.0)
    before: int = server.process.memory_info().rss
    async with _clients(server.port, connections, subscribe=subscribe):
        await asyncio.sleep(1.0)
        after: int = server.process.memory_info().rss
    return (after - before) / connections / 1024


# --- slow clients: client processes, raw or the websockets library ----------------------

_BIN = math.log(1.02)  # latency histogram: 2 % wide bins


def _bin(seconds: float) -> int:
    return round(math.log(max(seconds, 1e-5)) / _BIN)


class _Tally:
    """Stock frames and their commit -> client latencies, binned (one per client process)."""

    def __init__(self) -> None:
        self.frames = 0
        self.bins: Counter[int] = Counter()
        self.ready = 0  # clients connected (and subscribed, on the hub)

    def add(self, latency: float) -> None:
        self.frames += 1
        self.bins[_bin(latency)] += 1


async def _library_client(port: int, product: str, hub: bool, tally: _Tally) -> None:
    """One ``websockets`` asyncio client parsing every frame with orjson."""
    from websockets.asyncio.client import connect

    async with connect(
        f"ws://127.0.0.1:{port}/v1/ws", compression=None, open_timeout=60, max_size=2**20
    ) as connection:
        if hub:
            await connection.send(
                orjson.dumps({"op": "subscribe", "product_ids": [product]}).decode()
            )
        else:
            tally.ready += 1
        async for raw in connection:
            message = orjson.loads(raw)
            if message["type"] == "stock":
                tally.add(time.time() - message["ts"])
            elif message["type"] == "subscribed":
                tally.ready += 1


async def _client_process(port: int, count: int, product: str, hub: bool, kind: str) -> None:
    """A client process: ``count`` clients of ``kind``; answers ``reset`` and ``report``
    lines on stdin (the report is one JSON line on stdout), ends on ``stop``."""
    tally = _Tally()
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        if kind == "raw":
            raw = await stack.enter_async_context(
                _clients(port, count, subscribe=[[product]] * count if hub else None, record=True)
            )

            def collect() -> None:  # raw clients keep their own samples
                for client in raw:
                    for latency in client.latencies or ():
                        tally.add(latency)
                    client.reset()

        else:
            tasks = [
                asyncio.create_task(_library_client(port, product, hub, tally))
                for _ in range(count)
            ]
            stack.callback(lambda: [t.cancel() for t in tasks])

            def collect() -> None:
                for task in tasks:
                    if task.done() and not task.cancelled() and task.exception():
                        raise RuntimeError("a client failed") from task.exception()

            while tally.ready < count:
                collect()
                await asyncio.sleep(0.05)

        print("ready", flush=True)
        while (line := (await loop.run_in_executor(None, sys.stdin.readline)).strip()) != "stop":
            collect()
            if line == "report":
                print(json.dumps({"frames": tally.frames, "bins": tally.bins}), flush=True)
            tally.frames, tally.bins = 0, Counter()


class _ClientProcesses:
    """The client processes of one phase, driven over their stdin/stdout."""

    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self._procs = procs

    async def _ask(self, command: str) -> list[bytes]:
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write(f"{command}\n".encode())
        if command != "report":
            return []
        lines = []
        for proc in self._procs:
            assert proc.stdout is not None
            lines.append(await asyncio.wait_for(proc.stdout.readline(), 60))
        return lines

    async def reset(self) -> None:
        await self._ask("reset")

    async def report(self) -> tuple[int, Counter[int]]:
        frames, bins = 0, Counter[int]()
        for line in await self._ask("report"):
            data = json.loads(line)
            frames += data["frames"]
            bins.update({int(k): v for k, v in data["bins"].items()})
        return frames, bins


@contextlib.asynccontextmanager
async def _client_processes(
    port: int, clients: int, processes: int, product: str, hub: bool, kind: str
) -> AsyncIterator[_ClientProcesses]:
    procs = []
    try:
        for i in range(processes):
            count = clients // processes + (1 if i < clients % processes else 0)
            argv = ["-m", "bench.fanout", "clients", str(port), str(count), product, kind]
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    *argv,
                    *(["--hub"] if hub else []),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        for proc in procs:
            assert proc.stdout is not None
            if (await asyncio.wait_for(proc.stdout.readline(), 120)).strip() != b"ready":
                raise RuntimeError("a client process failed to start")
        yield _ClientProcesses(procs)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def _bin_percentiles(bins: Counter[int]) -> dict[str, float]:
    total = sum(bins.values())
    result = {"p50_ms": float("nan"), "p99_ms": float("nan")}
    seen = 0
    for key in sorted(bins):
        seen += bins[key]
        for name, q in (("p50_ms", 0.50), ("p99_ms", 0.99)):
            if math.isnan(result[name]) and seen >= q * total:
                result[name] = math.exp(key * _BIN) * 1e3
    return result


@dataclass(frozen=True)
class _SlowRun:
    deliveries_per_s: float
    cpu_us_per_delivery: float
    p50_ms: float
    p99_ms: float


async def _slow_phase(
    fan_out: _Server,
    inventory: _Server,
    http: httpx.AsyncClient,
    urls: Sequence[str],
    kind: str,
    cfg: Settings,
    product: str,
) -> tuple[int, float, float, float, Counter[int]]:
    """One phase: frames, seconds, fan-out server CPU, inventory server CPU, latency bins."""
    async with _client_processes(
        fan_out.port, cfg.clients, cfg.slow_processes, product, fan_out.hub, kind
    ) as clients:

        async def send(i: int) -> None:
            url = urls[i % len(urls)]
            delta = -1 if (i // len(urls)) % 2 else 1
            (await http.post(url, json={"delta": delta})).raise_for_status()

        await _paced(cfg.latency_rate, 2.0, send)  # warm-up
        await asyncio.sleep(1.0)
        await clients.reset()
        cpu0, inv0, started = _cpu(fan_out.process), _cpu(inventory.process), time.perf_counter()
        await _paced(cfg.latency_rate, cfg.latency_duration, send)
        await asyncio.sleep(1.0)  # let what is in flight arrive
        elapsed = time.perf_counter() - started
        cpu, inv = _cpu(fan_out.process) - cpu0, _cpu(inventory.process) - inv0
        frames, bins = await clients.report()
    return frames, elapsed, cpu, inv, bins


async def _slow_clients(
    database_url: str, redis_url: str, cfg: Settings
) -> dict[str, dict[str, _SlowRun]]:
    """The slow-client measurement (see the module docstring), both client kinds."""
    prefix = f"bench-{secrets.token_hex(4)}"
    product = "slow"
    runs: dict[str, dict[str, _SlowRun]] = {}
    async with (
        _hub_server(database_url, redis_url, prefix) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http,
    ):
        # Rows updated round-robin: a row changes 4 times a second at 40 updates/s, so a
        # hub that keeps up has nothing to coalesce (each row's message is full state).
        urls = []
        for n in range(WAREHOUSES):
            warehouse = f"bench-{secrets.token_hex(3)}-{n}"
            answer = await http.put(
                f"/v1/warehouses/{warehouse}", json={"name": "b", "status": "active"}
            )
            answer.raise_for_status()
            urls.append(f"/v1/products/{product}/stock/{warehouse}/adjustments")
            (await http.post(urls[-1], json={"delta": 1000})).raise_for_status()
        for kind in ("raw", "library"):
            frames, elapsed, cpu, _, bins = await _slow_phase(
                server, server, http, urls, kind, cfg, product
            )
            async with _bare_server(redis_url, prefix) as bare:
                b_frames, b_elapsed, b_cpu, feed_cpu, b_bins = await _slow_phase(
                    bare, server, http, urls, kind, cfg, product
                )
            # The hub's process also served the HTTP updates and ran the relay: that
            # part, measured in the bare phase at the same load, is not fan-out.
            hub_cpu = max(0.0, cpu - feed_cpu * elapsed / b_elapsed)
            runs[kind] = {
                "hub": _SlowRun(
                    frames / elapsed, hub_cpu / max(frames, 1) * 1e6, **_bin_percentiles(bins)
                ),
                "bare": _SlowRun(
                    b_frames / b_elapsed,
                    b_cpu / max(b_frames, 1) * 1e6,
                    **_bin_percentiles(b_bins),
                ),
            }
    return runs


@dataclass(frozen=True)
class Settings:
    clients: int = 1000
    rate: float = 200.0  # offered updates/s for the flat-out throughput run
    steady_rate: float = 20.0  # one both servers keep up with: CPU per delivery at ease
    duration: float = 10.0
    latency_rate: float = 40.0
    latency_duration: float = 15.0
    idle_connections: int = 2000
    idle_products: int = 10
    repeats: int = 3
    slow_processes: int = 2  # client processes of the slow-client measurement


@dataclass(frozen=True)
class _Run:
    deliveries_per_s: float
    cpu_us_per_delivery: float
    steady_cpu_us_per_delivery: float
    p50_ms: float
    p99_ms: float
    kib_per_connection: float


def _idle_topics(server: _Server, cfg: Settings) -> list[list[str]] | None:
    """The idle connections' subscriptions (hub only): 100 products, ``idle_products``
    distinct ones per connection."""
    if not server.hub:
        return None
    products = [f"idle-{i}" for i in range(100)]
    return [
        [products[(i + 7 * k) % 100] for k in range(cfg.idle_products)]
        for i in range(cfg.idle_connections)
    ]


async def _measure(server: _Server, redis: aioredis.Redis, prefix: str, cfg: Settings) -> _Run:
    """All three measurements on one fresh server process. Memory first, so that its RSS
    growth is not hidden by heap the other phases left behind; throughput last, because
    the bare server (no backpressure) is left with a backlog after it."""
    memory = await _memory(server, cfg.idle_connections, _idle_topics(server, cfg))
    latency = await _latency(
        server,
        _Publisher(redis, prefix, "lat"),
        cfg.clients,
        cfg.latency_rate,
        cfg.latency_duration,
    )
    topics = [["fan"]] * cfg.clients if server.hub else None
    publisher = _Publisher(redis, prefix, "fan")
    steady = await _throughput(
        server, publisher, cfg.clients, cfg.steady_rate, cfg.duration, topics
    )
    throughput = await _throughput(server, publisher, cfg.clients, cfg.rate, cfg.duration, topics)
    return _Run(
        throughput.deliveries_per_s,
        throughput.cpu_us_per_delivery,
        steady.cpu_us_per_delivery,
        latency["p50_ms"],
        latency["p99_ms"],
        memory,
    )


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    return {
        "cpu": cpu,
        "cores": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "uvicorn": version("uvicorn"),
        "websockets": version("websockets"),
    }


async def _memory_only(server: _Server, cfg: Settings) -> _Run:
    """The memory measurement alone (the ``memory`` scenario); other fields are NaN."""
    nan = float("nan")
    return _Run(
        nan,
        nan,
        nan,
        nan,
        nan,
        await _memory(server, cfg.idle_connections, _idle_topics(server, cfg)),
    )


async def run_fanout_bench(
    settings: Settings | None = None, scenarios: Sequence[str] = ("default", "slow")
) -> dict[str, Any]:
    """Run the measurements (see the module docstring); returns medians and ratios.

    ``scenarios``: ``default`` (throughput, latency and memory with raw clients),
    ``memory`` (only the memory measurement of ``default``) and/or ``slow`` (slow
    clients, both kinds)."""
    cfg = settings or Settings()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 2 * max(cfg.clients, cfg.idle_connections) + 200
    if hard < needed:
        raise RuntimeError(f"needs {needed} open files, the hard limit is {hard}")
    load_start = os.getloadavg()[0]
    runs: dict[str, list[_Run]] = {"hub": [], "bare": []}
    slow: list[dict[str, dict[str, _SlowRun]]] = []
    with backing_servers() as backing:
        async with scratch_databases(backing.pg_url) as databases:
            redis = aioredis.Redis.from_url(backing.redis_url)
            try:
                for _ in range(cfg.repeats):
                    if "default" in scenarios or "memory" in scenarios:
                        measure = _memory_only if "default" not in scenarios else None
                        prefix = f"bench-{secrets.token_hex(4)}"
                        async with _hub_server(databases.http, backing.redis_url, prefix) as hub:
                            runs["hub"].append(
                                await (
                                    measure(hub, cfg)
                                    if measure
                                    else _measure(hub, redis, prefix, cfg)
                                )
                            )
                        async with _bare_server(backing.redis_url, prefix) as bare:
                            runs["bare"].append(
                                await (
                                    measure(bare, cfg)
                                    if measure
                                    else _measure(bare, redis, prefix, cfg)
                                )
                            )
                    if "slow" in scenarios:
                        slow.append(await _slow_clients(databases.http, backing.redis_url, cfg))
            finally:
                await redis.aclose()
    result: dict[str, Any] = {
        "machine": {**_machine(), "load_start": load_start, "load_end": os.getloadavg()[0]},
        "settings": vars(cfg),
    }
    if runs["hub"]:
        medians = {
            kind: {f: _median([getattr(r, f) for r in rs]) for f in _Run.__dataclass_fields__}
            for kind, rs in runs.items()
        }
        result.update(
            hub=medians["hub"],
            bare=medians["bare"],
            ratio={f: medians["hub"][f] / medians["bare"][f] for f in medians["hub"]},
            runs={kind: [vars(r) for r in rs] for kind, rs in runs.items()},
        )
    if slow:
        summary: dict[str, Any] = {}
        for kind in slow[0]:
            medians = {
                server: {
                    f: _median([getattr(run[kind][server], f) for run in slow])
                    for f in _SlowRun.__dataclass_fields__
                }
                for server in ("hub", "bare")
            }
            summary[kind] = {
                **medians,
                "ratio": {f: medians["hub"][f] / medians["bare"][f] for f in medians["hub"]},
            }
        result["slow"] = summary
        result["slow_runs"] = [
            {k: {srv: vars(r) for srv, r in v.items()} for k, v in run.items()} for run in slow
        ]
    return result


def _report_default(result: dict[str, Any]) -> list[str]:
    cfg = result["settings"]
    hub, bare, ratio = result["hub"], result["bare"], result["ratio"]
    rows = [
        (f"deliveries/s (offered {cfg['rate'] * cfg['clients']:.0f}/s)", "deliveries_per_s", ".0f"),
        ("  server CPU us/delivery, flat out", "cpu_us_per_delivery", ".1f"),
        (
            f"  server CPU us/delivery @ {cfg['steady_rate'] * cfg['clients']:.0f}/s",
            "steady_cpu_us_per_delivery",
            ".1f",
        ),
        (f"latency p50 ms @ {cfg['latency_rate']:g} updates/s", "p50_ms", ".1f"),
        ("latency p99 ms", "p99_ms", ".1f"),
        (f"KiB per idle connection ({cfg['idle_connections']})", "kib_per_connection", ".1f"),
    ]
    lines = [
        f"medians of {cfg['repeats']} runs; {cfg['clients']} subscribers of one product",
        "",
        f"{'measure':<44}{'hub':>10}{'bare ws':>10}{'ratio':>8}",
        *(
            f"{label:<44}{hub[key]:>10{fmt}}{bare[key]:>10{fmt}}{ratio[key]:>8.2f}"
            for label, key, fmt in rows
        ),
        "",
        *(
            [
                "the hub delivered everything offered: its deliveries/s and ratio are lower bounds"
                " (raise --rate).",
            ]
            if hub["deliveries_per_s"] >= 0.97 * cfg["rate"] * cfg["clients"]
            else []
        ),
        "server CPU: the server process only, its idle baseline subtracted; flat out, the hub's",
        "includes offers conflated away (the bare server never drops, it queues without bound).",
        "hub latency: commit -> client (HTTP adjustment, outbox relay, Redis, hub); bare:",
        f"publish -> client. Hub idle connections hold {cfg['idle_products']} subscriptions each.",
    ]
    return lines


def _report_slow(result: dict[str, Any]) -> list[str]:
    cfg = result["settings"]
    rows = [
        ("deliveries/s", "deliveries_per_s", ".0f"),
        ("  server CPU us/delivery", "cpu_us_per_delivery", ".1f"),
        ("  commit -> client p50 ms", "p50_ms", ".1f"),
        ("  commit -> client p99 ms", "p99_ms", ".1f"),
    ]
    lines = [
        f"slow clients: {cfg['clients']} subscribers in {cfg['slow_processes']} client"
        f" processes, updates through HTTP at {cfg['latency_rate']:g}/s"
        f" (offered {cfg['latency_rate'] * cfg['clients']:.0f} deliveries/s)",
        f"{'measure':<44}{'hub':>10}{'bare ws':>10}{'ratio':>8}",
    ]
    for kind, label in (("raw", "raw clients"), ("library", "websockets-library clients")):
        data = result["slow"][kind]
        lines.append(f"{label}:")
        lines += [
            f"  {name:<42}{data['hub'][key]:>10{fmt}}{data['bare'][key]:>10{fmt}}"
            f"{data['ratio'][key]:>8.2f}"
            for name, key, fmt in rows
        ]
    lines.append(
        "hub CPU: the server's HTTP and relay CPU at the same load (measured in the bare"
        " phase) is subtracted."
    )
    return lines


def _report(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, Python"
        f" {m['python']}, uvicorn {m['uvicorn']}, websockets {m['websockets']}",
    ]
    if "hub" in result:
        lines += _report_default(result)
    if "slow" in result:
        lines += ["", *_report_slow(result)]
    lines.append(
        f"load average (1 min) at start / end: {m['load_start']:.1f} / {m['load_end']:.1f}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import uvloop

    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout", description="WebSocket fan-out benchmark"
    )
    sub = parser.add_subparsers(dest="command")
    bare = sub.add_parser("bare-server", help="internal: run the bare broadcast server")
    bare.add_argument("port", type=int)
    bare.add_argument("redis_url")
    bare.add_argument("prefix")
    clients = sub.add_parser("clients", help="internal: run one slow-client process")
    clients.add_argument("port", type=int)
    clients.add_argument("count", type=int)
    clients.add_argument("product")
    clients.add_argument("kind", choices=("raw", "library"))
    clients.add_argument("--hub", action="store_true")
    defaults = Settings()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument(
        "--scenario",
        choices=("all", "default", "memory", "slow"),
        default="all",
        help="default: raw-client throughput, latency, memory; memory: memory only;"
        " slow: slow clients",
    )
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.command == "bare-server":
        uvloop.run(serve_bare(args.port, args.redis_url, args.prefix))
        return 0
    if args.command == "clients":
        uvloop.run(_client_process(args.port, args.count, args.product, args.hub, args.kind))
        return 0
    cfg = Settings(**{name: getattr(args, name) for name in vars(defaults)})
    scenarios = ("default", "slow") if args.scenario == "all" else (args.scenario,)
    result = uvloop.run(run_fanout_bench(cfg, scenarios))
    print(_report(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
