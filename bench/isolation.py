"""Isolation: what one product's row, locked by a foreign session, costs everybody else.

``python -m bench.isolation [--seconds S] [--rounds R] [--products N] [--json PATH]``

One ``inventory serve`` process (``--workers``, default 1) on a scratch database with N
products (default 1,000) in one warehouse, 1,000,000 units each (seeded through the HTTP
API by :func:`bench.scenarios.seed`). One product, ``sku-1``, is the *locked* product;
the *others* are every other product, split by whether their reservation lane
(:func:`inventory.service.engine.lane_of`, the server's lane count per process) is the
locked product's (``same_lane``: with the default 4 lanes about a quarter of the
catalogue) or not (``other_lane``). Per round, two phases of ``--clients`` (64)
closed-loop clients sending 1-line reservations spread uniformly over the others, for S
seconds (default 10) after a 1 s warm-up (:func:`bench.loadgen.run_load`):

1. *baseline*: nothing else;
2. *locked*: a separate asyncpg session holds ``SELECT ... FOR UPDATE`` on the locked
   product's stock row from before the warm-up until the load has finished, and a
   trickle of 1-line reservations for the locked product itself (``--trickle`` per
   second, each on its own connection) runs while it is held.

Reported per phase: the rate of 201 answers, p50/p99 latency of every answer (all
statuses: a 503 is an answer too), p99 per lane group, and the non-201 answers by status;
the locked/baseline ratios of rate and p99. For the locked product's requests: how many
were answered 201 only after the lock was released (they waited for it, as they must),
how many 201 *before* the release (would mean the lock was not held), and how many 503
and after how long (the bound is ``INVENTORY_DB_TIMEOUT``). After each round
``inventory check``'s invariants (:func:`inventory.ops.check.check_database`) must hold.

The goal (issue 13) is absolute: others keep p99 < 100 ms and get no 503 while the row is
held; the baseline of the same round shows what the machine does without the lock.
Medians over the rounds are printed (and written with ``--json``). Exit status 1 when an
invariant breaks or the lock was not effective.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from bench.loadgen import Client, HttpError, LoadResult, Session, run_load
from bench.scenarios import WAREHOUSE, seed
from bench.stack import ServerProcess, backing_servers, scratch_databases, server_env
from inventory.config import Settings
from inventory.ops.check import check_database
from inventory.service.engine import lane_of

__all__ = ["LOCKED", "main"]

LOCKED = "sku-1"
_RESERVE = b"/v1/reservations"
_HOST = "127.0.0.1"


def _body(product: str) -> bytes:
    return b'{"lines":[{"product_id":"%s","quantity":1}]}' % product.encode()


def _others_session(products: int, lanes: int) -> Session:
    """Spread 1-line reservations over every product but :data:`LOCKED`, labelled by
    whether the product shares the locked product's lane."""
    locked_lane = lane_of(LOCKED, lanes)
    choices = [
        (_body(p), "same_lane" if lane_of(p, lanes) == locked_lane else "other_lane")
        for p in (f"sku-{n}" for n in range(1, products + 1))
        if p != LOCKED
    ]

    async def session(client: Client, index: int) -> None:
        body, label = random.choice(choices)
        await client.request(b"POST", _RESERVE, body, label=label)

    return session


def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _phase(result: LoadResult) -> dict[str, Any]:
    everything = result.values()
    statuses: Counter[int] = Counter()
    for (_, status), values in result.latencies.items():
        if status != 201:
            statuses[status] += len(values)
    return {
        "rate": result.rate(status=201),
        "answers": len(everything),
        "p50_ms": _ms(everything, 0.5),
        "p99_ms": _ms(everything, 0.99),
        "same_lane_p99_ms": _ms(result.values("same_lane"), 0.99),
        "other_lane_p99_ms": _ms(result.values("other_lane"), 0.99),
        "non_201": {str(status): n for status, n in sorted(statuses.items())},
        "status_503": statuses[503],
        "connection_errors": result.errors,
    }


@dataclasses.dataclass
class _Trickle:
    """Requests for the locked product: (sent, answered, status), monotonic seconds."""

    port: int
    answers: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)
    failures: int = 0

    async def run(self, per_second: float, stop: asyncio.Event) -> None:
        pending: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            task = asyncio.create_task(self._one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1 / per_second)
        if pending:
            await asyncio.gather(*pending)

    async def _one(self) -> None:
        client = Client(_HOST, self.port)
        sent = time.monotonic()
        try:
            status, _ = await client.request(b"POST", _RESERVE, _body(LOCKED))
        except (HttpError, OSError):
            self.failures += 1
            return
        finally:
            client.close()
        self.answers.append((sent, time.monotonic(), status))

    def summary(self, locked: float, released: float) -> dict[str, Any]:
        """What became of the requests; times in ``requests`` are seconds since the row
        was locked ([sent, answered, status]), as is ``released_at_s``."""
        after = [a - released for s, a, st in self.answers if st == 201 and a >= released]
        early = [s for s, a, st in self.answers if st == 201 and a < released]
        refused = [a - s for s, a, st in self.answers if st == 503]
        other = Counter(st for _, _, st in self.answers if st not in (201, 503))
        return {
            "sent": len(self.answers) + self.failures,
            "created_after_release": len(after),
            "max_ms_after_release": 1000 * max(after) if after else None,
            "created_before_release": len(early),
            "status_503": len(refused),
            "wait_before_503_s": [round(w, 2) for w in sorted(refused)],
            "other_statuses": {str(k): v for k, v in sorted(other.items())},
            "connection_errors": self.failures,
            "released_at_s": round(released - locked, 3),
            "requests": [
                [round(s - locked, 3), round(a - locked, 3), st] for s, a, st in self.answers
            ],
        }


async def _locked_phase(
    url: str, port: int, args: argparse.Namespace, session: Session
) -> tuple[LoadResult, dict[str, Any]]:
    foreign = await asyncpg.connect(url)
    trickle = _Trickle(port)
    stop = asyncio.Event()
    try:
        await foreign.execute("BEGIN")
        held = await foreign.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM stock_levels WHERE product_id = $1"
            " AND warehouse_id = $2 FOR UPDATE) s",
            LOCKED,
            WAREHOUSE,
        )
        if held != 1:
            raise RuntimeError(f"expected one stock row of {LOCKED}, locked {held}")
        locked = time.monotonic()
        trickler = asyncio.create_task(trickle.run(args.trickle, stop))
        result = await run_load(_HOST, port, args.clients, args.seconds, session)
        stop.set()
        await foreign.execute("ROLLBACK")
        released = time.monotonic()
        await trickler
    finally:
        stop.set()
        await foreign.close()
    return result, trickle.summary(locked, released)


async def _round(
    dbs_url: str, port: int, args: argparse.Namespace, session: Session
) -> dict[str, Any]:
    baseline = _phase(await run_load(_HOST, port, args.clients, args.seconds, session))
    result, locked_product = await _locked_phase(dbs_url, port, args, session)
    locked = _phase(result)
    found = await check_database(dbs_url)
    broken = {name: rows[:5] for name, rows in found.items() if rows}
    return {
        "baseline": baseline,
        "locked": locked,
        "rate_ratio": locked["rate"] / baseline["rate"] if baseline["rate"] else None,
        "p99_ratio": (
            locked["p99_ms"] / baseline["p99_ms"]
            if locked["p99_ms"] is not None and baseline["p99_ms"]
            else None
        ),
        "locked_product": locked_product,
        "invariants_ok": not broken,
        "violations": {name: [str(r) for r in rows] for name, rows in broken.items()},
    }


def _median(rounds: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for r in rounds:
        v: Any = r
        for key in path:
            v = v[key]
        if v is not None:
            values.append(float(v))
    return statistics.median(values) if values else None


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in ("baseline", "locked"):
        out[phase] = {
            key: _median(rounds, phase, key)
            for key in ("rate", "p50_ms", "p99_ms", "same_lane_p99_ms", "other_lane_p99_ms")
        }
        out[phase]["status_503_total"] = sum(r[phase]["status_503"] for r in rounds)
        out[phase]["non_201_total"] = sum(sum(r[phase]["non_201"].values()) for r in rounds)
    out["rate_ratio"] = _median(rounds, "rate_ratio")
    out["p99_ratio"] = _median(rounds, "p99_ratio")
    return out


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _line(name: str, phase: dict[str, Any]) -> str:
    return (
        f"  {name:8} {_fmt(phase['rate'], ',.0f')}/s  p50 {_fmt(phase['p50_ms'])} ms"
        f"  p99 {_fmt(phase['p99_ms'])} ms (same lane {_fmt(phase['same_lane_p99_ms'])},"
        f" other lanes {_fmt(phase['other_lane_p99_ms'])})  non-201 {phase['non_201']}"
        f"  conn errors {phase['connection_errors']}"
    )


async def _main(args: argparse.Namespace) -> int:
    with backing_servers() as backing:
        async with scratch_databases(backing.pg_url) as dbs:
            env = server_env(dbs.http, backing.redis_url)
            settings = Settings.from_env(env).with_overrides(workers=args.workers)
            lanes = settings.process_lanes
            server = ServerProcess.inventory(env, workers=args.workers)
            await asyncio.to_thread(server.start)
            try:
                await seed(_HOST, server.port, args.products)
                session = _others_session(args.products, lanes)
                same = sum(
                    lane_of(f"sku-{n}", lanes) == lane_of(LOCKED, lanes)
                    for n in range(2, args.products + 1)
                )
                print(
                    f"{args.products} products, locked {LOCKED} shares its lane with {same}"
                    f" ({lanes} lanes per process, {args.workers} worker(s)); "
                    f"INVENTORY_DB_TIMEOUT {settings.db_timeout:g} s",
                    flush=True,
                )
                rounds = []
                for n in range(args.rounds):
                    r = await _round(dbs.http, server.port, args, session)
                    rounds.append(r)
                    print(f"round {n + 1}:", flush=True)
                    print(_line("baseline", r["baseline"]), flush=True)
                    print(_line("locked", r["locked"]), flush=True)
                    print(
                        f"  ratio locked/baseline: rate {_fmt(r['rate_ratio'], '.2f')}x,"
                        f" p99 {_fmt(r['p99_ratio'], '.2f')}x; locked product:"
                        f" { {k: v for k, v in r['locked_product'].items() if k != 'requests'} };"
                        f" invariants ok: {r['invariants_ok']}",
                        flush=True,
                    )
            finally:
                await asyncio.to_thread(server.stop)
    medians = _medians(rounds)
    ok = all(r["invariants_ok"] for r in rounds)
    effective = all(r["locked_product"]["created_before_release"] == 0 for r in rounds)
    goal = (
        medians["locked"]["p99_ms"] is not None
        and medians["locked"]["p99_ms"] < 100
        and medians["locked"]["status_503_total"] == 0
    )
    print(
        f"median of {args.rounds}: baseline {_fmt(medians['baseline']['rate'], ',.0f')}/s"
        f" p99 {_fmt(medians['baseline']['p99_ms'])} ms; locked"
        f" {_fmt(medians['locked']['rate'], ',.0f')}/s p99 {_fmt(medians['locked']['p99_ms'])}"
        f" ms (same lane {_fmt(medians['locked']['same_lane_p99_ms'])} ms); ratio rate"
        f" {_fmt(medians['rate_ratio'], '.2f')}x p99 {_fmt(medians['p99_ratio'], '.2f')}x;"
        f" 503s to others while locked: {medians['locked']['status_503_total']}"
        f" (goal p99 < 100 ms, no 503: {'met' if goal else 'not met'}); invariants ok: {ok}"
    )
    if args.json:
        report = {
            "products": args.products,
            "clients": args.clients,
            "seconds": args.seconds,
            "workers": args.workers,
            "lanes_per_process": lanes,
            "db_timeout_s": settings.db_timeout,
            "locked_product": LOCKED,
            "rounds": rounds,
            "medians": medians,
            "goal_met": goal,
            "invariants_ok": ok,
        }
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            await asyncio.to_thread(Path(args.json).write_text, text + "\n")
    return 0 if ok and effective else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.isolation", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per phase")
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--trickle", type=float, default=1.0, help="locked-product requests/s")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.products < 2 or args.clients < 1 or args.trickle <= 0:
        parser.error("--rounds, --clients >= 1, --products >= 2, --trickle > 0")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
