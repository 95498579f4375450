"""The ``flash-sale`` scenario: many buyers, bots and retriers on one limited product.

``python -m bench.flash_sale [--buyers 10000] [--clients 128] [--rounds 1]``

Per round, against one ``inventory serve`` on scratch databases:

1. *flash sale*: ``buyers`` buyers on product ``flash`` (1,000 units, ``max_per_customer``
   2): most are ordinary customers asking 1-2 units once; some are *retriers* sending
   the same request with an ``Idempotency-Key`` two or three times; some are *bots*: 50
   customer ids spread over many requests trying to exceed the limit. A buyer refused
   for stock joins the waitlist (one unit) with probability ``--waitlist-share``.
2. *returns*: 10 % of the winning reservations are released; the time from the first
   release until the queue holds all of it (every unit reserved again, or nobody left
   waiting) is the offer latency (an upper bound: it includes the releases themselves,
   sent over 16 connections, and the 20 ms polling).
3. *hot ceiling*: the same number of requests as plain 1-line reservations of product
   ``hot`` (stock never runs out), same connections: the ratio is flash / hot
   requests per second, both measured in the same run.

Then ``inventory check`` (limits, offers, kits, the ledger) must hold: zero oversell and
zero limit breaches are verified, not assumed. The kit comparison (``--kits``) reserves
one kit of 3 components against the same 3 lines written explicitly.
Figures are indicative on a shared machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from bench.loadgen import Client
from bench.stack import ServerProcess, backing_servers, scratch_databases
from inventory.ops.check import check_database

__all__ = ["main", "run_round"]

UNITS = 1000
LIMIT = 2
BOTS = 50


def _pct(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _call(
    client: Client, method: str, path: str, body: Any = None, headers: bytes = b""
) -> tuple[int, Any, float]:
    raw = msgspec.json.encode(body) if body is not None else b""
    began = time.perf_counter()
    status, answer = await client.request(method.encode(), path.encode(), raw, headers)
    took = time.perf_counter() - began
    return status, (msgspec.json.decode(answer) if answer else None), took


async def _seed(host: str, port: int) -> None:
    c = Client(host, port)
    try:
        await _call(c, "PUT", "/v1/warehouses/wh-1", {"name": "bench", "status": "active"})
        for product, quantity in (("flash", UNITS), ("hot", 10**9), ("c1", 10**8), ("c2", 10**8),
                                  ("c3", 10**8)):  # fmt: skip
            status, body, _ = await _call(
                c, "PUT", f"/v1/products/{product}/stock/wh-1", {"quantity": quantity}
            )
            assert status == 200, body
        status, body, _ = await _call(c, "PUT", "/v1/products/flash", {"max_per_customer": LIMIT})
        assert status in (200, 201), body
        comps = [{"product_id": p, "quantity": 1} for p in ("c1", "c2", "c3")]
        status, body, _ = await _call(c, "PUT", "/v1/products/kit3", {"components": comps})
        assert status in (200, 201), body
    finally:
        c.close()


async def _drive(host: str, port: int, clients: int, jobs: list[Any], work: Any) -> float:
    """Run ``work(client, job)`` for every job over ``clients`` connections; seconds."""
    queue = iter(jobs)

    async def worker() -> None:
        c = Client(host, port)
        try:
            for job in queue:
                await work(c, job)
        finally:
            c.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - began


async def run_round(host: str, port: int, buyers: int, clients: int, waitlist_share: float,
                    kits: bool) -> dict[str, Any]:  # fmt: skip
    """One round of the scenario (see the module doc); returns its figures."""
    rnd = random.Random(42)
    latencies: list[float] = []
    requests = 0
    won: list[tuple[str, str, int]] = []  # (reservation id, customer, units)
    entries: list[str] = []
    statuses: dict[int, int] = {}

    jobs = []
    for i in range(buyers):
        kind = rnd.choices(["buyer", "retrier", "bot"], [0.8, 0.1, 0.1])[0]
        customer = f"bot-{rnd.randrange(BOTS)}" if kind == "bot" else f"cust-{i}"
        jobs.append((i, kind, customer, rnd.randint(1, 2)))

    async def buy(c: Client, job: tuple[int, str, str, int]) -> None:
        nonlocal requests
        i, kind, customer, units = job
        body = {"lines": [{"product_id": "flash", "quantity": units}], "customer_id": customer}
        tries = rnd.randint(2, 3) if kind == "retrier" else 1
        headers = b"Idempotency-Key: buy-%d\r\n" % i if kind == "retrier" else b""
        for _ in range(tries):
            status, answer, took = await _call(c, "POST", "/v1/reservations", body, headers)
            requests += 1
            latencies.append(took)
            statuses[status] = statuses.get(status, 0) + 1
        if status == 201:  # a retrier's repeats replay the same reservation
            won.append((answer["id"], customer, units))
        elif answer["error"]["code"] == "insufficient_stock" and rnd.random() < waitlist_share:
            s, e, _ = await _call(c, "POST", "/v1/products/flash/waitlist",
                                  {"customer_id": customer, "quantity": 1})  # fmt: skip
            if s == 201:
                entries.append(e["id"])

    flash_seconds = await _drive(host, port, clients, jobs, buy)
    flash_rate = requests / flash_seconds

    # Returns: release 10 % of the winners; time until the queue holds that stock.
    c = Client(host, port)
    try:
        returned = won[: max(1, len(won) // 10)]
        released_units = 0

        async def release(c: Client, item: tuple[str, str, int]) -> None:
            nonlocal released_units
            status, _, _ = await _call(c, "POST", f"/v1/reservations/{item[0]}/release")
            released_units += item[2] if status == 200 else 0

        began = time.perf_counter()
        await _drive(host, port, 16, returned, release)  # the returns arrive together
        # Done when the queue holds everything returned: all units reserved again, or
        # nobody left waiting (heads over their limit are cancelled, not served).
        offer_seconds = None
        while time.perf_counter() - began < 10:
            _, stock, _ = await _call(c, "GET", "/v1/products/flash/stock")
            _, queue, _ = await _call(c, "GET", "/v1/products/flash/waitlist?limit=1")
            if stock["reserved"] >= UNITS or not queue["entries"]:
                offer_seconds = time.perf_counter() - began
                break
            await asyncio.sleep(0.02)
        offered = 0
        for entry_id in entries:
            _, e, _ = await _call(c, "GET", f"/v1/waitlist/{entry_id}")
            offered += e["status"] == "offered"
        _, flash_stock, _ = await _call(c, "GET", "/v1/products/flash/stock")
    finally:
        c.close()

    # The plain hot-SKU ceiling, same requests and connections.
    hot_requests = 0

    async def hot(c: Client, _: int) -> None:
        nonlocal hot_requests
        await _call(
            c, "POST", "/v1/reservations", {"lines": [{"product_id": "hot", "quantity": 1}]}
        )
        hot_requests += 1

    hot_seconds = await _drive(host, port, clients, list(range(requests)), hot)
    result: dict[str, Any] = {
        "buyers": buyers,
        "requests": requests,
        "statuses": statuses,
        "flash_rps": round(flash_rate),
        "hot_rps": round(hot_requests / hot_seconds),
        "ratio": round(flash_rate / (hot_requests / hot_seconds), 3),
        "p50_ms": round(_pct(latencies, 0.5) * 1000, 1),
        "p99_ms": round(_pct(latencies, 0.99) * 1000, 1),
        "units_sold": sum(u for _, _, u in won),
        "waitlist_entries": len(entries),
        "released_units": released_units,
        "offers_made": offered,
        "offer_seconds": None if offer_seconds is None else round(offer_seconds, 3),
        "flash_reserved": flash_stock["reserved"],
    }
    if kits:
        result.update(await _kit_round(host, port, clients, requests))
    return result


async def _kit_round(host: str, port: int, clients: int, n: int) -> dict[str, Any]:
    """One kit of 3 components against the same 3 lines written explicitly, interleaved
    (explicit, kit, explicit, kit) so neither always runs first."""
    kit = {"lines": [{"product_id": "kit3", "quantity": 1}]}
    explicit = {"lines": [{"product_id": p, "quantity": 1} for p in ("c1", "c2", "c3")]}
    seconds = {"kit": 0.0, "explicit": 0.0}
    for name, body in (("explicit", explicit), ("kit", kit)) * 2:

        async def one(c: Client, _: int, body: Any = body) -> None:
            status, answer, _took = await _call(c, "POST", "/v1/reservations", body)
            assert status == 201, answer

        seconds[name] += await _drive(host, port, clients, list(range(n // 2)), one)
    rates = {name: 2 * (n // 2) / took for name, took in seconds.items()}
    return {"kit_rps": round(rates["kit"]), "explicit_3_lines_rps": round(rates["explicit"]),
            "kit_ratio": round(rates["kit"] / rates["explicit"], 3)}  # fmt: skip


async def _main(args: argparse.Namespace) -> int:
    results = []
    with backing_servers() as backing:
        for _ in range(args.rounds):
            async with scratch_databases(backing.pg_url) as dbs:
                env = {**os.environ, "INVENTORY_DATABASE_URL": dbs.http,
                       "INVENTORY_REDIS_URL": backing.redis_url,
                       "INVENTORY_REDIS_PREFIX": f"bench-{os.getpid()}-{time.time_ns()}",
                       "INVENTORY_LOG_LEVEL": "warning"}  # fmt: skip
                server = ServerProcess.inventory(env, args.workers)
                await asyncio.to_thread(server.start)
                try:
                    await _seed("127.0.0.1", server.port)
                    result = await run_round("127.0.0.1", server.port, args.buyers, args.clients,
                                             args.waitlist_share, args.kits)  # fmt: skip
                finally:
                    server.stop()
                violations = {k: v for k, v in (await check_database(dbs.http)).items() if v}
                result["invariant_violations"] = violations
                results.append(result)
                print(json.dumps(result), file=sys.stderr)
    summary = {
        "rounds": results,
        "median_ratio": statistics.median(r["ratio"] for r in results),
        "median_p99_ms": statistics.median(r["p99_ms"] for r in results),
    }
    print(json.dumps(summary, indent=2))
    ok = all(not r["invariant_violations"] and r["flash_reserved"] <= UNITS for r in results)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buyers", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--waitlist-share", type=float, default=0.05)
    parser.add_argument("--kits", action="store_true", help="also the kit vs 3 lines comparison")
    args = parser.parse_args(argv)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
