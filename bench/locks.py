"""Benchmark of :mod:`locks` against a raw-command ceiling and redis-py's own lock.

``python -m bench.locks --redis-url redis://127.0.0.1:6379/0 [--seconds 3] [--repeats 3]``

Every figure is the median over ``repeats`` rounds; within a round the variants run
back to back against the same server and client.

* uncontended: one task doing ``async with Lock(...)`` (construct, acquire, release)
  on one key, versus the ceiling for the same protocol without the library: a raw
  ``SET NX PX`` plus an ``EVALSHA`` token-checked delete on the same client. The two
  alternate in batches of 25 pairs, so load changes on the machine hit both alike.
* contended: 32 tasks on one key, each looping acquire (timeout 5 s), a one-command
  critical section (``INCR``), release. Throughput is acquisitions / wall time until
  every task finished; "wait" is the time spent inside acquire. The same loop runs
  with ``redis.asyncio.lock.Lock`` (blocking, default 0.1 s sleep).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
from redis.asyncio import Redis

from locks import Lock

__all__ = ["run_lock_bench"]

TASKS = 32
ACQUIRE_TIMEOUT = 5.0
TTL = 10.0
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


async def _interleaved_rates(
    seconds: float, *variants: Callable[[], Awaitable[None]]
) -> list[float]:
    """Pairs/s of each variant, run in alternating batches so all see the same load."""
    batch = 25
    done = 0
    spent = [0.0] * len(variants)
    while sum(spent) < seconds * len(variants):
        for i, pair in enumerate(variants):
            start = time.perf_counter()
            for _ in range(batch):
                await pair()
            spent[i] += time.perf_counter() - start
        done += batch
    return [done / t for t in spent]


async def _uncontended(client: Redis, seconds: float) -> tuple[float, float]:
    key = f"bench:lock:{secrets.token_hex(8)}"
    release_sha = await client.script_load(_RELEASE)

    async def ours() -> None:
        async with Lock(client, key, TTL, fence_key=f"{key}:fence"):
            pass

    async def ceiling() -> None:
        token = secrets.token_hex(16)
        if not await client.set(key, token, nx=True, px=int(TTL * 1000)):
            raise RuntimeError("uncontended SET NX failed")
        await client.evalsha(release_sha, 1, key, token)

    await _interleaved_rates(0.2, ours, ceiling)  # warm up connections and script cache
    ours_rate, ceiling_rate = await _interleaved_rates(seconds, ours, ceiling)
    await client.delete(key, f"{key}:fence")
    return ours_rate, ceiling_rate


async def _contended(
    client: Redis, seconds: float, make: Callable[[str], Any], *, redis_py: bool
) -> dict[str, float]:
    """Run TASKS workers on one fresh key; ``make(key)`` builds one lock per worker."""
    key = f"bench:lock:{secrets.token_hex(8)}"
    counter = f"{key}:n"
    waits: list[float] = []
    timeouts = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> None:
        nonlocal timeouts
        lock = make(key)
        while loop.time() < end:
            t0 = time.perf_counter()
            if redis_py:
                got = await lock.acquire(blocking_timeout=ACQUIRE_TIMEOUT)
            else:
                try:
                    await lock.acquire(timeout=ACQUIRE_TIMEOUT)
                    got = True
                except Exception:
                    got = False
            if not got:
                timeouts += 1
                continue
            waits.append(time.perf_counter() - t0)
            await client.incr(counter)
            await lock.release()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(TASKS)))
    elapsed = time.perf_counter() - start
    count = int(await client.get(counter) or 0)
    await client.delete(key, counter, f"{key}:fence")
    if count != len(waits):
        raise RuntimeError(f"critical sections {count} != acquisitions {len(waits)}")
    cuts = statistics.quantiles(waits, n=100, method="inclusive")
    return {
        "acq_per_s": count / elapsed,
        "wait_mean_ms": statistics.fmean(waits) * 1000,
        "wait_p50_ms": cuts[49] * 1000,
        "wait_p99_ms": cuts[98] * 1000,
        "wait_max_ms": max(waits) * 1000,
        "timeouts": float(timeouts),
    }


async def run_lock_bench(
    redis_url: str, *, seconds: float = 3.0, repeats: int = 3
) -> dict[str, Any]:
    """Run every scenario ``repeats`` times; return machine facts and medians."""
    client = Redis.from_url(redis_url)
    try:
        info = await client.info("server")
        rounds: list[dict[str, float]] = []
        for _ in range(repeats):
            ours, ceiling = await _uncontended(client, seconds)
            row = {"uncontended_pairs_per_s": ours, "ceiling_pairs_per_s": ceiling}
            contended = await _contended(
                client,
                seconds,
                lambda k: Lock(client, k, TTL, fence_key=f"{k}:fence"),
                redis_py=False,
            )
            baseline = await _contended(
                client, seconds, lambda k: client.lock(k, timeout=TTL), redis_py=True
            )
            row |= {f"contended_{name}": value for name, value in contended.items()}
            row |= {f"redis_py_{name}": value for name, value in baseline.items()}
            rounds.append(row)
    finally:
        await client.aclose()
    medians = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    medians["uncontended_ratio"] = statistics.median(
        r["uncontended_pairs_per_s"] / r["ceiling_pairs_per_s"] for r in rounds
    )
    return {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "redis_py": redis.__version__,
            "server": info.get("server_name", "redis"),
            "server_version": info.get("valkey_version", info.get("redis_version")),
            "event_loop": type(asyncio.get_running_loop()).__module__,
        },
        "seconds": seconds,
        "repeats": repeats,
        "tasks": TASKS,
        "medians": medians,
        "rounds": rounds,
    }


def _table(result: dict[str, Any]) -> str:
    m = result["medians"]
    machine = result["machine"]
    lines = [
        f"cores={machine['cpu_count']} python={machine['python']} redis-py={machine['redis_py']}"
        f" server={machine['server']} {machine['server_version']} loop={machine['event_loop']}"
        f" ({result['repeats']} x {result['seconds']}s, medians)",
        "",
        "uncontended (acquire+release pairs/s)",
        f"  locks.Lock            {m['uncontended_pairs_per_s']:10.0f}",
        f"  raw SET NX + EVALSHA  {m['ceiling_pairs_per_s']:10.0f}",
        f"  ratio                 {m['uncontended_ratio']:10.2f}x  (goal >= 0.80x)",
        "",
        f"contended ({result['tasks']} tasks, one key)"
        "    acq/s  wait ms: mean      p50      p99      max  timeouts",
    ]
    for label, prefix in (("locks.Lock", "contended"), ("redis-py Lock", "redis_py")):
        lines.append(
            f"  {label:<15}{m[f'{prefix}_acq_per_s']:26.0f}{m[f'{prefix}_wait_mean_ms']:15.1f}"
            f"{m[f'{prefix}_wait_p50_ms']:9.1f}{m[f'{prefix}_wait_p99_ms']:9.1f}"
            f"{m[f'{prefix}_wait_max_ms']:9.1f}{m[f'{prefix}_timeouts']:10.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio")
    args = parser.parse_args()
    bench = run_lock_bench(args.redis_url, seconds=args.seconds, repeats=args.repeats)
    if args.uvloop:
        import uvloop

        result = uvloop.run(bench)
    else:
        result = asyncio.run(bench)
    print(_table(result))


if __name__ == "__main__":
    main()
