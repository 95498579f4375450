"""Redis Cluster fan-out: 3 shards against 1 shard, two server processes, 10,000 products.

Per round and shard count, a fresh local cluster (``tests/cluster.py``: 1 or 3 masters,
the same sharded code path either way) and two ``inventory serve`` processes on it and on
one database. Each process gets ``clients`` raw WebSocket clients (``bench.fanout``'s),
client ``i`` subscribed to products ``i*per .. i*per+per-1``, so both processes subscribe
to every one of the ``products`` products (one channel each, spread over the shards).

* **Cross-node delivery**: a real change made through process A's HTTP API
  (``POST .../adjustments``: commit, relay, ``SPUBLISH``) must reach a client of process
  B; its commit -> client time is reported.
* **Throughput**: synthetic stock messages ``SPUBLISH``-ed round-robin over all products
  at ``rate`` per second for ``duration`` seconds (pipelines of ``batch``), as the relay
  would. Reported: deliveries/s summed over both processes' clients (each message is due
  twice, once per process), the share of due deliveries made, and server CPU per delivery
  (both processes, psutil).

The ratio compares the median of ``repeats`` rounds, 3 shards over 1 shard, in one run.

Run: ``python -m bench.cluster_fanout [--repeats 3] [--rate 20000] [--json out.json]``;
it needs ``INVENTORY_DATABASE_URL`` (or starts an embedded PostgreSQL) and a
``redis-server`` or the embedded Valkey binary for the clusters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import uvloop
from redis.asyncio.cluster import RedisCluster

from bench.fanout import _clients, _cpu, _hub_server, _stock_payload
from bench.stack import backing_servers, scratch_databases
from realtime.keys import RedisKeys
from realtime.sharded import publish_sharded, redis_from_url
from tests.cluster import LocalCluster

__all__ = ["Settings", "run_cluster_bench"]


@dataclass(frozen=True)
class Settings:
    products: int = 10_000
    clients: int = 100  # per server process
    rate: float = 20_000.0  # messages/s offered (each due on both processes)
    duration: float = 5.0
    batch: int = 200
    repeats: int = 3


@dataclass(frozen=True)
class Round:
    shards: int
    cross_node_ms: float
    deliveries_per_s: float
    delivered_share: float
    cpu_us_per_delivery: float
    clients_without_updates: int


async def _cross_node(a_url: str, b_port: int) -> float:
    """Adjust through A, wait for B's client; returns commit -> client milliseconds."""
    product, warehouse = f"x-{secrets.token_hex(4)}", f"w-{secrets.token_hex(4)}"
    async with httpx.AsyncClient(base_url=a_url, timeout=10) as http:
        r = await http.put(f"/v1/warehouses/{warehouse}", json={"name": "w", "status": "active"})
        r.raise_for_status()
        r = await http.put(f"/v1/products/{product}/stock/{warehouse}", json={"quantity": 1})
        r.raise_for_status()
        async with _clients(b_port, 1, subscribe=[[product]]) as (client,):
            started = time.perf_counter()
            path = f"/v1/products/{product}/stock/{warehouse}/adjustments"
            (await http.post(path, json={"delta": 1})).raise_for_status()
            deadline = started + 10
            while client.frames == 0:
                if time.perf_counter() > deadline:
                    raise RuntimeError("cross-node delivery failed: nothing in 10 s")
                await asyncio.sleep(0.001)
            return (time.perf_counter() - started) * 1000


async def _round(database_url: str, shards: int, cfg: Settings) -> Round:
    prefix = f"bench-{secrets.token_hex(4)}"
    keys = RedisKeys(prefix)
    products = [f"p{i}" for i in range(cfg.products)]
    per = cfg.products // cfg.clients
    topics = [products[i * per : (i + 1) * per] for i in range(cfg.clients)]
    with LocalCluster(shards) as cluster:
        async with (
            _hub_server(database_url, cluster.url, prefix) as a,
            _hub_server(database_url, cluster.url, prefix) as b,
            _clients(a.port, cfg.clients, subscribe=topics) as on_a,
            _clients(b.port, cfg.clients, subscribe=topics) as on_b,
        ):
            cross = await _cross_node(f"http://127.0.0.1:{a.port}", b.port)
            redis = redis_from_url(cluster.url)
            assert isinstance(redis, RedisCluster)
            try:
                conns = on_a + on_b
                channels = [keys.stock_channel(p) for p in products]
                sent = 0

                async def publish(seconds: float) -> int:
                    nonlocal sent
                    start, n = time.perf_counter(), 0
                    while (elapsed := time.perf_counter() - start) < seconds:
                        due = int(elapsed * cfg.rate)
                        while n < due:
                            batch = [
                                (channels[(sent + k) % len(channels)],
                                 _stock_payload(sent + k, time.time()))
                                for k in range(min(cfg.batch, due - n))
                            ]  # fmt: skip
                            await publish_sharded(redis, batch)
                            n += len(batch)
                            sent += len(batch)
                        await asyncio.sleep(0.001)
                    return n

                await publish(1.0)  # warm-up
                await asyncio.sleep(0.5)
                frames0 = sum(c.frames for c in conns)
                cpu0 = _cpu(a.process) + _cpu(b.process)
                started = time.perf_counter()
                n = await publish(cfg.duration)
                await asyncio.sleep(0.5)  # let the tail arrive
                elapsed = time.perf_counter() - started
                frames = sum(c.frames for c in conns) - frames0
                cpu = _cpu(a.process) + _cpu(b.process) - cpu0
                silent = sum(1 for c in conns if c.frames == 0)
            finally:
                await redis.aclose()
    return Round(
        shards=shards,
        cross_node_ms=cross,
        deliveries_per_s=frames / elapsed,
        delivered_share=frames / (2 * n),
        cpu_us_per_delivery=cpu / max(frames, 1) * 1e6,
        clients_without_updates=silent,
    )


async def run_cluster_bench(cfg: Settings | None = None) -> dict[str, Any]:
    cfg = cfg or Settings()
    rounds: list[Round] = []
    with backing_servers() as backing:
        async with scratch_databases(backing.pg_url) as databases:
            for _ in range(cfg.repeats):
                for shards in (1, 3):  # interleaved, so drift hits both alike
                    rounds.append(await _round(databases.http, shards, cfg))
    result: dict[str, Any] = {"settings": asdict(cfg), "rounds": [asdict(r) for r in rounds]}
    for shards in (1, 3):
        mine = [r for r in rounds if r.shards == shards]
        result[f"{shards}_shards"] = {
            field: statistics.median(getattr(r, field) for r in mine)
            for field in ("deliveries_per_s", "delivered_share", "cpu_us_per_delivery",
                          "cross_node_ms")
        }  # fmt: skip
    result["ratio_3_over_1"] = (
        result["3_shards"]["deliveries_per_s"] / result["1_shards"]["deliveries_per_s"]
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=Settings.repeats)
    parser.add_argument("--rate", type=float, default=Settings.rate)
    parser.add_argument("--duration", type=float, default=Settings.duration)
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = Settings(repeats=args.repeats, rate=args.rate, duration=args.duration)
    result = uvloop.run(run_cluster_bench(cfg))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text)


if __name__ == "__main__":
    main()
