"""The ``flash-sale`` scenario: many buyers, bots and retriers on one limited product.

``python -m bench.flash_sale [--buyers 10000] [--clients 128] [--rounds 1] [--kill-returns 30]``

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

4. *offers after kill -9* (``--kill-returns``, 0 skips it): two more server processes on
   the same databases and Redis; product ``crash`` has ``kill-returns`` units, each held
   by a 1-unit reservation, and as many 1-unit entries wait for it. A third of the
   reservations are released together through server A, which is killed with SIGKILL as
   soon as they are answered (its offers for them pending: in flight or not yet begun);
   the rest are released one by one through server B, 0.1 s apart. The k-th entry in
   queue order is served by the k-th returned unit, so its offer latency is the offer
   reservation's ``created_at`` (PostgreSQL's clock: the database must run on this
   machine) minus the time that unit's release was sent: p50, p99 and max over all of
   them, and the max over the units returned just before the kill.

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
from datetime import datetime
from typing import Any

import msgspec

from bench.loadgen import Client
from bench.stack import ServerProcess, backing_servers, scratch_databases
from inventory.ops.check import check_database

__all__ = ["main", "offers_after_kill", "run_round"]

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


async def _drive(
    host: str, port: int, clients: int, jobs: list[Any], work: Any, warm_up: int = 0
) -> float:
    """Run ``work(client, job)`` for every job over ``clients`` connections; seconds.

    The connections are opened (one ``GET /health`` each) before the clock starts, as the
    harness's warm-up does: otherwise the first request of each of them carries its TCP
    connect in a burst of ``clients``, which is 1 % of a 10,000-buyer round: the p99.
    ``warm_up`` untimed reservations of ``hot`` first bring the server to the state the
    hot-SKU ceiling runs in (its database pool grown to its working size: opening
    connections in the sale's first second cost ~60 ms each on the queued requests)."""
    queue = iter(jobs)
    conns = [Client(host, port) for _ in range(clients)]
    line = msgspec.json.encode({"lines": [{"product_id": "hot", "quantity": 1}]})
    warm = iter(range(warm_up))

    async def worker(c: Client) -> None:
        for job in queue:
            await work(c, job)

    async def warmer(c: Client) -> None:
        await c.request(b"GET", b"/health", b"")
        for _ in warm:
            await c.request(b"POST", b"/v1/reservations", line)

    try:
        await asyncio.gather(*(warmer(c) for c in conns))
        began = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        return time.perf_counter() - began
    finally:
        for c in conns:
            c.close()


async def run_round(host: str, port: int, buyers: int, clients: int, waitlist_share: float,
                    kits: bool) -> dict[str, Any]:  # fmt: skip
    """One round of the scenario (see the module doc); returns its figures."""
    rnd = random.Random(42)
    latencies: list[float] = []  # the buyers' reservation requests
    join_latencies: list[float] = []
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
            s, e, took = await _call(c, "POST", "/v1/products/flash/waitlist",
                                     {"customer_id": customer, "quantity": 1})  # fmt: skip
            join_latencies.append(took)
            if s == 201:
                entries.append(e["id"])

    flash_seconds = await _drive(host, port, clients, jobs, buy, warm_up=2_000)
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
    hot_latencies: list[float] = []

    async def hot(c: Client, _: int) -> None:
        nonlocal hot_requests
        _, _, took = await _call(
            c, "POST", "/v1/reservations", {"lines": [{"product_id": "hot", "quantity": 1}]}
        )
        hot_latencies.append(took)
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
        "hot_p99_ms": round(_pct(hot_latencies, 0.99) * 1000, 1),
        "join_p99_ms": round(_pct(join_latencies, 0.99) * 1000, 1),
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


async def offers_after_kill(env: dict[str, str], returns: int) -> dict[str, Any]:
    """Offer latency when a server process is killed with offers pending (module doc,
    step 4); the warehouse ``wh-1`` exists already."""
    servers = [ServerProcess.inventory(env, 1) for _ in range(2)]
    try:
        for server in servers:
            await asyncio.to_thread(server.start)
        a, b = servers
        c = Client("127.0.0.1", b.port)
        try:
            status, body, _ = await _call(
                c, "PUT", "/v1/products/crash/stock/wh-1", {"quantity": returns}
            )
            assert status == 200, body
            held, entries = [], []
            for _ in range(returns):
                line = {"lines": [{"product_id": "crash", "quantity": 1}], "ttl_seconds": 3600}
                status, body, _ = await _call(c, "POST", "/v1/reservations", line)
                assert status == 201, body
                held.append(body["id"])
            for i in range(returns):  # one by one: queue order is list order
                join = {"customer_id": f"crash-{i}", "quantity": 1}
                status, body, _ = await _call(c, "POST", "/v1/products/crash/waitlist", join)
                assert (status, body["status"]) == (201, "waiting"), body
                entries.append(body["id"])

            async def release(client: Client, reservation_id: str) -> None:
                path = f"/v1/reservations/{reservation_id}/release"
                status, body, _ = await _call(client, "POST", path)
                assert status == 200, body

            burst = max(1, returns // 3)
            sent_at = [time.time()] * burst  # the units returned just before the kill
            await _drive("127.0.0.1", a.port, burst, held[:burst], release)
            assert a.proc is not None
            a.proc.kill()  # SIGKILL: no cleanup, its pending offers die with it
            for reservation_id in held[burst:]:
                sent_at.append(time.time())
                await release(c, reservation_id)
                await asyncio.sleep(0.1)
            offered_at = await _offer_times(c, entries, deadline=time.monotonic() + 10)
        finally:
            c.close()
    finally:
        for server in servers:
            server.stop()
    latencies = [t - s for t, s in zip(offered_at, sent_at, strict=True) if t is not None]
    return {
        "kill_returns": returns,
        "kill_offers_made": len(latencies),
        "kill_offer_p50_s": round(_pct(latencies, 0.5), 3),
        "kill_offer_p99_s": round(_pct(latencies, 0.99), 3),
        "kill_offer_max_s": round(max(latencies, default=0.0), 3),
        "kill_pending_offer_max_s": round(max(latencies[:burst], default=0.0), 3),
    }


async def _offer_times(c: Client, entries: list[str], deadline: float) -> list[float | None]:
    """When each entry's offer reservation was made (Unix seconds), waiting for the
    offers until ``deadline`` (monotonic); None for an entry never offered."""
    times: list[float | None] = [None] * len(entries)
    while True:
        for i, entry_id in enumerate(entries):
            if times[i] is not None:
                continue
            _, entry, _ = await _call(c, "GET", f"/v1/waitlist/{entry_id}")
            if entry["status"] == "offered":
                path = f"/v1/reservations/{entry['reservation_id']}"
                _, offer, _ = await _call(c, "GET", path)
                times[i] = datetime.fromisoformat(offer["created_at"]).timestamp()
        if all(t is not None for t in times) or time.monotonic() > deadline:
            return times
        await asyncio.sleep(0.1)


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
                if args.kill_returns:
                    result.update(await offers_after_kill(env, args.kill_returns))
                violations = {k: v for k, v in (await check_database(dbs.http)).items() if v}
                result["invariant_violations"] = violations
                results.append(result)
                print(json.dumps(result), file=sys.stderr)
    summary = {
        "rounds": results,
        "median_ratio": statistics.median(r["ratio"] for r in results),
        "median_p99_ms": statistics.median(r["p99_ms"] for r in results),
    }
    if args.kill_returns:
        summary["median_kill_offer_p99_s"] = statistics.median(
            r["kill_offer_p99_s"] for r in results
        )
    print(json.dumps(summary, indent=2))
    ok = all(
        not r["invariant_violations"]
        and r["flash_reserved"] <= UNITS
        and r.get("kill_offers_made") == r.get("kill_returns")  # every waiter served
        for r in results
    )
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buyers", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--waitlist-share", type=float, default=0.05)
    parser.add_argument("--kits", action="store_true", help="also the kit vs 3 lines comparison")
    parser.add_argument(
        "--kill-returns", type=int, default=30,
        help="units returned around a kill -9 of one of two servers (0: skip that step)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    return asyncio.run(_main(args))


if __name__ == "__main__":
    raise SystemExit(main())
