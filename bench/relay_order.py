"""The relay's commit-ticket order: what it costs writers, and latency past foreign transactions.

``python -m bench.relay_order [--seconds S] [--rounds R]``

1. Writer cost. 16 concurrent sessions commit transactions that each write one stock
   row and its ledger row (the shape of every ledger write), for S seconds, with the
   commit-ticket trigger, with the alternative it was chosen over (an "xid marker": a
   statement trigger taking a shared advisory lock, the relay's horizon read from
   pg_locks), and with neither (the ceiling), interleaved, R rounds each. Reported:
   transactions/s, the ratio to the ceiling (medians), and the mean time of the relay's
   own statement (the fence, or the pg_locks horizon query) run beside the writers.
2. Latency past foreign transactions. The relay runs in-process; 40 changes/s are
   committed for S seconds while (a) nothing else, (b) a transaction in another
   database of the same server, (c) a transaction in this database writing only an
   unrelated table, stays open with an xid. Reported: commit -> Redis message latency
   p50/p99 per case, from sending the write (so including its commit; at most 1,000
   writes per case) to the message (the goal: p99 < 100 ms with a foreign transaction
   open).
3. The same cases end to end (``--to-client``): an ``inventory serve`` process on the
   database, 40 adjustments/s through its HTTP API, a ``websockets`` library client
   subscribed to the products; latency from sending the adjustment to the client
   receiving its ``stock`` message (matched by product and version), with the foreign
   transaction open for the whole case (S seconds; the issue's probe: 60).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from bench.loadgen import Client
from bench.stack import ServerProcess, backing_servers, scratch_databases
from inventory.store.feed import PgOutbox
from realtime.feed import StockData, decode
from realtime.keys import RedisKeys
from realtime.relay import Relay

_WRITE = """
WITH s AS (
    UPDATE stock_levels SET quantity = quantity + 1, version = version + 1
    WHERE product_id = $1 AND warehouse_id = 'w'
    RETURNING product_id, warehouse_id, quantity, reserved, version)
INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                       quantity, reserved, version)
SELECT product_id, warehouse_id, 'adjusted', 1, 0, quantity, reserved, version FROM s
"""

_SEED = """
INSERT INTO warehouses (id, name, status) VALUES ('w', 'w', 'active');
INSERT INTO stock_levels (product_id, warehouse_id, quantity, version)
SELECT 'p' || g, 'w', 0, 1 FROM generate_series(0, 999) g;
INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                       quantity, reserved, version)
SELECT 'p' || g, 'w', 'adjusted', 0, 0, 0, 0, 1 FROM generate_series(0, 999) g;
"""


async def _writers(
    url: str, seconds: float, probe: str | None = None, sessions: int = 16
) -> tuple[float, float]:
    """Ledger writers for ``seconds``: (transactions/s, mean ms of the relay-side
    ``probe`` statement run back to back beside them, or nan)."""
    pool = await asyncpg.create_pool(url, min_size=sessions, max_size=sessions)
    done = 0
    probes: list[float] = []
    stop = time.monotonic() + seconds

    async def loop(n: int) -> None:
        nonlocal done
        i = n
        async with pool.acquire() as conn:
            while time.monotonic() < stop:
                await conn.execute(_WRITE, f"p{(i * 7919) % 1000}")
                done += 1
                i += sessions

    async def probing() -> None:
        if probe is None:
            return
        conn = await asyncpg.connect(url)
        try:
            while time.monotonic() < stop:
                began = time.monotonic()
                await conn.fetchval(probe)
                probes.append(time.monotonic() - began)
                await asyncio.sleep(0.005)  # the relay's pace under load
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(probing(), *(loop(n) for n in range(sessions)))
    elapsed = time.monotonic() - started
    await pool.close()
    return done / elapsed, 1000 * statistics.mean(probes) if probes else float("nan")


# The alternative the commit ticket was chosen over: writers mark themselves with a shared
# advisory lock (a statement trigger, no sequence, no insert) and the relay publishes
# ledger rows below the oldest xid among the marked transactions of this database, found
# in pg_locks.
_MARKER = """
CREATE FUNCTION bench_ledger_marker() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_advisory_xact_lock_shared(24303, 2); RETURN NULL; END $$;
CREATE TRIGGER movements_writer_marker AFTER INSERT ON movements
FOR EACH STATEMENT EXECUTE FUNCTION bench_ledger_marker();
"""
_HORIZON = """
SELECT min(a.backend_xid::text::bigint)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid = 24303 AND l.objid = 2 AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
_FENCE = "SELECT ledger_commit_fence(0)"

# variant -> (triggers enabled, relay-side statement)
_VARIANTS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "none": ((), None),
    "commit ticket": (("movements_commit_ticket",), _FENCE),
    "xid marker": (("movements_writer_marker",), _HORIZON),
}


async def _writer_cost(url: str, seconds: float, rounds: int) -> dict[str, Any]:
    """Writers' transactions/s per variant (interleaved rounds, medians) and the mean time
    of the relay's statement beside them; ratios against no ordering aid at all."""
    admin = await asyncpg.connect(url)
    await admin.execute(_MARKER)
    triggers = ("movements_commit_ticket", "movements_writer_marker")
    tps: dict[str, list[float]] = {name: [] for name in _VARIANTS}
    probe_ms: dict[str, list[float]] = {name: [] for name in _VARIANTS}
    try:
        for _ in range(rounds):
            for name, (enabled, probe) in _VARIANTS.items():
                for trigger in triggers:
                    state = "ENABLE" if trigger in enabled else "DISABLE"
                    await admin.execute(f"ALTER TABLE movements {state} TRIGGER {trigger}")
                rate, ms = await _writers(url, seconds, probe)
                tps[name].append(rate)
                probe_ms[name].append(ms)
    finally:
        await admin.execute("ALTER TABLE movements ENABLE TRIGGER movements_commit_ticket")
        await admin.execute("DROP TRIGGER movements_writer_marker ON movements")
        await admin.close()
    return {
        name: {
            "tps": statistics.median(tps[name]),
            "ratio": statistics.median(a / b for a, b in zip(tps[name], tps["none"], strict=True)),
            "relay_statement_ms": statistics.median(probe_ms[name]),
        }
        for name in _VARIANTS
    }


@contextlib.asynccontextmanager
async def _open_transaction(url: str, sql: str | None) -> AsyncIterator[None]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("BEGIN")
        await conn.fetchval("SELECT pg_current_xact_id()")
        if sql:
            await conn.execute(sql)
        yield
        await conn.execute("ROLLBACK")
    finally:
        await conn.close()


async def _latency(url: str, redis_url: str, seconds: float, foreign: object) -> dict[str, float]:
    prefix = f"bench-{secrets.token_hex(4)}"
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    redis = aioredis.Redis.from_url(redis_url)
    relay = Relay(PgOutbox(pool), redis, prefix=prefix)
    pubsub = redis.pubsub(ignore_subscribe_messages=True)
    keys = RedisKeys(prefix)
    await pubsub.psubscribe(keys.stock_pattern)
    # product -> when its write was sent (each product is written once per case): the
    # message may arrive before the writer has read its own commit's reply.
    committed: dict[str, float] = {}
    lags: list[float] = []

    async def listen() -> None:
        async for message in pubsub.listen():
            product = keys.product_of_channel(message["channel"])
            data = decode(message["data"])
            sent = committed.get(product) if product and isinstance(data, StockData) else None
            if sent is not None:
                lags.append(time.monotonic() - sent)

    listener = asyncio.create_task(listen())
    await relay.start()
    writer = await asyncpg.connect(url)
    try:
        while not relay.leader:  # noqa: ASYNC110 - a plain attribute, no event to wait on
            await asyncio.sleep(0.01)
        assert isinstance(foreign, contextlib.AbstractAsyncContextManager)
        async with foreign:
            stop = time.monotonic() + seconds
            i = 0
            while time.monotonic() < stop and i < 1000:
                product = f"p{i}"
                committed[product] = time.monotonic()
                await writer.execute(_WRITE, product)
                i += 1
                await asyncio.sleep(1 / 40)
            await asyncio.sleep(0.5)
    finally:
        await writer.close()
        await relay.stop()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await pubsub.aclose()
        await redis.aclose()
        await pool.close()
    return {**_lag_summary(lags), "committed": len(committed)}


async def _to_client(port: int, seconds: float, foreign: object) -> dict[str, float]:
    """Adjustments through HTTP at 40/s while ``foreign`` is open; send -> WebSocket."""
    products = [f"p{i}" for i in range(500)]
    sent: dict[tuple[str, int], float] = {}  # (product, version it will get) -> sent at
    version: dict[str, int] = {}
    lags: list[float] = []
    async with connect(f"ws://127.0.0.1:{port}/v1/ws", max_size=2**20) as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "product_ids": products}).decode())
        while len(version) < len(products):
            message = orjson.loads(await ws.recv())
            if message["type"] == "snapshot":
                version[message["product_id"]] = message["levels"][0]["version"]

        async def listen() -> None:
            async for frame in ws:
                message = orjson.loads(frame)
                if message["type"] == "stock":
                    at = sent.get((message["product_id"], message["version"]))
                    if at is not None:
                        lags.append(time.monotonic() - at)

        listener = asyncio.create_task(listen())
        http = Client("127.0.0.1", port)
        body = orjson.dumps({"delta": 1})
        try:
            assert isinstance(foreign, contextlib.AbstractAsyncContextManager)
            async with foreign:
                stop, i = time.monotonic() + seconds, 0
                while time.monotonic() < stop:
                    product = products[i % len(products)]
                    version[product] += 1
                    sent[(product, version[product])] = time.monotonic()
                    path = f"/v1/products/{product}/stock/w/adjustments".encode()
                    status, _ = await http.request(b"POST", path, body)
                    assert status == 200, status
                    i += 1
                    await asyncio.sleep(1 / 40)
                await asyncio.sleep(0.5)  # the last messages, inside the foreign transaction
        finally:
            http.close()
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
    return {**_lag_summary(lags), "sent": len(sent)}


def _lag_summary(lags: list[float]) -> dict[str, float]:
    """Count, p50, p99 and max (ms) of latencies in seconds (nan when there are none)."""
    lags = sorted(lags)
    nan = float("nan")
    return {
        "messages": len(lags),
        "p50_ms": 1000 * lags[len(lags) // 2] if lags else nan,
        "p99_ms": 1000 * lags[int(len(lags) * 0.99)] if lags else nan,
        "max_ms": 1000 * lags[-1] if lags else nan,
    }


def _cases(dbs: Any) -> dict[str, contextlib.AbstractAsyncContextManager[None]]:
    return {
        "no foreign transaction": contextlib.nullcontext(),
        "open in another database": _open_transaction(dbs.pgbench, None),
        "open in this database, unrelated table": _open_transaction(
            dbs.http, "INSERT INTO unrelated_to_ledger VALUES (1)"
        ),
    }


async def _main(args: argparse.Namespace) -> int:
    with backing_servers() as backing:
        async with scratch_databases(backing.pg_url) as dbs:
            seed = await asyncpg.connect(dbs.http)
            await seed.execute(_SEED)
            await seed.execute("CREATE TABLE unrelated_to_ledger (x int)")
            await seed.close()
            if args.to_client:
                env = {**os.environ, "INVENTORY_DATABASE_URL": dbs.http,
                       "INVENTORY_REDIS_URL": backing.redis_url,
                       "INVENTORY_REDIS_PREFIX": f"bench-{secrets.token_hex(4)}",
                       "INVENTORY_LOG_LEVEL": "warning"}  # fmt: skip
                server = ServerProcess.inventory(env, 1)
                await asyncio.to_thread(server.start)
                try:
                    for name, foreign in _cases(dbs).items():
                        result = await _to_client(server.port, args.seconds, foreign)
                        print(f"to client, {name}: {result}", flush=True)
                finally:
                    server.stop()
                return 0
            cost = await _writer_cost(dbs.http, args.seconds, args.rounds)
            print(f"writer cost: {cost}", flush=True)
            for name, foreign in _cases(dbs).items():
                result = await _latency(dbs.http, backing.redis_url, args.seconds, foreign)
                print(f"{name}: {result}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_order", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--to-client", action="store_true", help="end to end through a server (case 3)"
    )
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
