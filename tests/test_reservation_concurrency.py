"""Concurrency against real ``inventory serve`` processes, for both reserve strategies.

Two server processes share the session database; requests alternate between them.
Every test ends with stock the invariant checker accepts (``inventory.ops.check``), since
that checker looks at the whole shared database.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from inventory.ops.check import check_database

from .conftest import ServerProcess
from .conftest import wait_until as wait_for

pytestmark = pytest.mark.asyncio

MakeStock = Callable[..., Awaitable[tuple[str, list[str]]]]
NewId = Callable[[str], str]

STRATEGIES = ["optimistic", "lock"]


ROOT = Path(__file__).resolve().parent.parent


# --- fixtures -------------------------------------------------------------------------------


def server_env(
    database_url: str, redis_url: str, redis_prefix: str, strategy: str
) -> dict[str, str]:
    return {
        **os.environ,
        "INVENTORY_DATABASE_URL": database_url,
        "INVENTORY_REDIS_URL": redis_url,
        "INVENTORY_REDIS_PREFIX": redis_prefix,
        "INVENTORY_SWEEP_INTERVAL": "0.1",
        "INVENTORY_TOKENS": "",
        "INVENTORY_RESERVE_STRATEGY": strategy,
    }


@dataclass
class Cluster:
    """Two server processes of one strategy on the session database."""

    strategy: str
    servers: list[ServerProcess]

    def url(self, i: int, path: str) -> str:
        return self.servers[i % len(self.servers)].base_url + path


@pytest.fixture(scope="module", params=STRATEGIES)
async def cluster(
    request: pytest.FixtureRequest, database_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[Cluster]:
    """Started once per strategy for the whole module (a start costs about a second)."""
    strategy: str = request.param
    if strategy == "lock":
        pytest.importorskip("locks", reason="the lock strategy needs the locks package")
    env = server_env(database_url, redis_url, redis_prefix, strategy)
    servers = [ServerProcess(env), ServerProcess(env)]
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers))
        yield Cluster(strategy, servers)
    finally:
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in servers))
        logs = [s.log.read_text(errors="replace") for s in servers]
        for s in servers:
            s.log.unlink(missing_ok=True)
    # Load must never make a server fail a request internally.
    for log in logs:
        assert "Traceback" not in log, log[-5000:]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them,
    # so a request never goes out on a connection the server is closing.
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000, keepalive_expiry=2)
    async with httpx.AsyncClient(limits=limits, timeout=60) as c:
        yield c


# --- helpers --------------------------------------------------------------------------------


@dataclass
class Tally:
    """Answers seen, by (what, status)."""

    seen: Counter[tuple[str, int]] = field(default_factory=Counter)
    busy: int = 0  # 503 answers retried
    lost: int = 0  # connections lost before the answer, retried

    def add(self, what: str, r: httpx.Response) -> None:
        self.seen[(what, r.status_code)] += 1

    def unexpected(self, allowed: dict[str, set[int]]) -> dict[tuple[str, int], int]:
        return {k: n for k, n in self.seen.items() if k[1] not in allowed.get(k[0], set())}


async def decided(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    tally: Tally | None = None,
    timeout: float = 60,
    **kwargs: Any,
) -> httpx.Response:
    """Send until the answer is not 503 (contention); 503 must carry Retry-After.

    Only used for requests that are safe to repeat: reservations carry an
    Idempotency-Key, commit/release/extend are idempotent for an unchanged target. So a
    connection lost before the answer (seen rarely on an overloaded machine) is
    retried too, at most a few times.
    """
    deadline = time.monotonic() + timeout
    lost = 0
    while True:
        try:
            r = await http.request(method, url, **kwargs)
        except (httpx.NetworkError, httpx.RemoteProtocolError):
            lost += 1
            if tally is not None:
                tally.lost += 1
            if lost > 3:
                raise
            continue
        if r.status_code != 503:
            return r
        assert r.json()["error"]["code"] in ("contention", "unavailable"), r.text
        retry_after = r.headers.get("retry-after", "")
        assert retry_after.isdigit(), r.headers
        assert int(retry_after) >= 1
        if tally is not None:
            tally.busy += 1
        if time.monotonic() > deadline:
            pytest.fail(f"{method} {url} still answered 503 after {timeout}s")
        # Full jitter within the advised pause, capped so the test stays quick.
        await asyncio.sleep(random.uniform(0, min(float(retry_after), 0.5)))


async def reserve(
    http: httpx.AsyncClient,
    url: str,
    lines: list[dict[str, Any]],
    *,
    tally: Tally | None = None,
    **extra: Any,
) -> httpx.Response:
    key = uuid.uuid4().hex
    return await decided(
        http,
        "POST",
        url,
        tally=tally,
        json={"lines": lines, **extra},
        headers={"Idempotency-Key": key},
    )


def line(pid: str, quantity: int, wid: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"product_id": pid, "quantity": quantity}
    if wid is not None:
        out["warehouse_id"] = wid
    return out


async def rows(db: asyncpg.Pool | asyncpg.Connection, pid: str) -> dict[str, asyncpg.Record]:
    found = await db.fetch(
        "SELECT warehouse_id, quantity, reserved, version FROM stock_levels WHERE product_id = $1",
        pid,
    )
    return {r["warehouse_id"]: r for r in found}


async def ledger_count(db: asyncpg.Pool, pid: str) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM movements WHERE product_id = $1", pid)
    return n


async def assert_invariants(database_url: str) -> None:
    violations = await check_database(database_url)
    assert violations, "the checker ran no checks"
    assert {k: v for k, v in violations.items() if v} == {}


async def due_unswept(db: asyncpg.Pool, products: list[str]) -> int:
    """Active reservations of these products whose deadline has passed."""
    n: int = await db.fetchval(
        """SELECT count(DISTINCT r.id) FROM reservations r
           JOIN reservation_lines l ON l.reservation_id = r.id
           WHERE l.product_id = ANY($1::text[]) AND r.status = 'active'
             AND r.expires_at <= clock_timestamp()""",
        products,
    )
    return n


# --- no oversell ----------------------------------------------------------------------------


async def test_no_oversell(
    cluster: Cluster,
    http: httpx.AsyncClient,
    make_stock: MakeStock,
    db_pool: asyncpg.Pool,
    new_id: NewId,
) -> None:
    pid, [wid] = await make_stock(100)
    ref = new_id("ref")
    tally = Tally()
    url = cluster.url
    answers = await asyncio.gather(
        *(
            reserve(http, url(i, "/v1/reservations"), [line(pid, 1)], reference=ref, tally=tally)
            for i in range(500)
        )
    )
    statuses = Counter(r.status_code for r in answers)
    assert statuses == {201: 100, 409: 400}, (statuses, tally.busy)
    for r in answers:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "insufficient_stock"
    row = (await rows(db_pool, pid))[wid]
    assert (row["quantity"], row["reserved"], row["version"]) == (100, 100, 101)
    assert await ledger_count(db_pool, pid) == 101
    held = await db_pool.fetchval(
        "SELECT count(*) FROM reservations WHERE reference = $1 AND status = 'active'", ref
    )
    assert held == 100
    # Through ``decided``: a pooled keep-alive connection is closed under the client now
    # and then (about one run in a dozen after the lock-strategy burst); an idempotent GET
    # may be retried on a new connection (RFC 9112, 9.3.1).
    stock = (await decided(http, "GET", cluster.url(0, f"/v1/products/{pid}/stock"))).json()
    assert (stock["reserved"], stock["available"]) == (100, 0)


# --- mixed load -----------------------------------------------------------------------------

ALLOWED = {
    "reserve": {201, 409},
    "commit": {200, 409},
    "release": {200, 409},
    "extend": {200, 409},
    "adjust": {200, 409},
}


async def test_mixed_load_keeps_invariants(
    cluster: Cluster,
    http: httpx.AsyncClient,
    make_stock: MakeStock,
    db_pool: asyncpg.Pool,
    database_url: str,
) -> None:
    rng = random.Random(f"mixed-{cluster.strategy}")
    products: dict[str, list[str]] = {}
    for _ in range(3):
        pid, whs = await make_stock(30, 20, 10)
        products[pid] = whs
    initial = {
        (p, w): q for p, whs in products.items() for w, q in zip(whs, (30, 20, 10), strict=True)
    }
    adjusted: Counter[tuple[str, str]] = Counter()
    committed: Counter[tuple[str, str]] = Counter()
    outcome: dict[str, str] = {}
    tally = Tally()
    stop_at = time.monotonic() + 4

    def some_lines() -> list[dict[str, Any]]:
        out = []
        for pid in rng.sample(sorted(products), rng.randint(1, 3)):
            pinned = rng.choice(products[pid]) if rng.random() < 0.3 else None
            out.append(line(pid, rng.randint(1, 4), pinned))
        return out

    async def finish(i: int, res: dict[str, Any]) -> None:
        rid = res["id"]
        roll = rng.random()
        if roll < 0.4:
            # Two commits racing through both servers: both answer alike.
            path = f"/v1/reservations/{rid}/commit"
            a, b = await asyncio.gather(
                decided(http, "POST", cluster.url(i, path), tally=tally),
                decided(http, "POST", cluster.url(i + 1, path), tally=tally),
            )
            tally.add("commit", a)
            tally.add("commit", b)
            assert a.status_code == b.status_code, (a.text, b.text)
            if a.status_code == 200:
                assert a.json() == b.json()
                outcome[rid] = "committed"
                for x in res["lines"]:
                    committed[(x["product_id"], x["warehouse_id"])] += x["quantity"]
            else:
                assert a.json()["error"]["details"] == {"status": "expired"}
        elif roll < 0.7:
            r = await decided(
                http, "POST", cluster.url(i, f"/v1/reservations/{rid}/release"), tally=tally
            )
            tally.add("release", r)
            if r.status_code == 200:
                outcome[rid] = "released"
            else:
                assert r.json()["error"]["details"] == {"status": "expired"}
        elif roll < 0.9:
            r = await decided(
                http,
                "POST",
                cluster.url(i, f"/v1/reservations/{rid}/extend"),
                tally=tally,
                json={"ttl_seconds": rng.choice([1, 2, 600])},
            )
            tally.add("extend", r)
        # else: left alone to expire (or to stay active).

    async def worker(i: int) -> None:
        while time.monotonic() < stop_at:
            roll = rng.random()
            if roll < 0.8:
                r = await reserve(
                    http,
                    cluster.url(i, "/v1/reservations"),
                    some_lines(),
                    tally=tally,
                    ttl_seconds=rng.choice([1, 1, 2, 600]),
                )
                tally.add("reserve", r)
                if r.status_code == 201:
                    outcome[r.json()["id"]] = "unknown"
                    await finish(i, r.json())
                else:
                    assert r.json()["error"]["code"] == "insufficient_stock", r.text
            else:
                pid = rng.choice(sorted(products))
                wid = rng.choice(products[pid])
                delta = rng.choice([-2, -1, 3, 5])
                r = await http.post(
                    cluster.url(i, f"/v1/products/{pid}/stock/{wid}/adjustments"),
                    json={"delta": delta},
                )
                tally.add("adjust", r)
                if r.status_code == 200:
                    adjusted[(pid, wid)] += delta
                else:
                    assert r.json()["error"]["code"] == "insufficient_stock", r.text

    await asyncio.gather(*(worker(i) for i in range(24)))
    assert tally.unexpected(ALLOWED) == {}
    assert tally.seen[("reserve", 201)] >= 10, tally
    assert tally.seen[("commit", 200)] >= 1, tally

    # Every reservation that fell due is expired by the sweepers within 2 s.
    async def all_swept() -> bool:
        return await due_unswept(db_pool, sorted(products)) == 0

    await wait_for(all_swept, 3.5, "the sweepers to expire every due reservation")
    await assert_invariants(database_url)
    for pid, whs in products.items():
        found = await rows(db_pool, pid)
        for wid in whs:
            key = (pid, wid)
            assert found[wid]["quantity"] == initial[key] + adjusted[key] - committed[key], key
    stored = {
        str(r["id"]): r["status"]
        for r in await db_pool.fetch(
            "SELECT id, status FROM reservations WHERE id = ANY($1::uuid[])",
            [uuid.UUID(x) for x in outcome],
        )
    }
    assert set(stored) == set(outcome)
    for rid, known in outcome.items():
        if known != "unknown":
            assert stored[rid] == known, rid


# --- idempotency race -----------------------------------------------------------------------


async def test_idempotency_key_race(
    cluster: Cluster,
    http: httpx.AsyncClient,
    make_stock: MakeStock,
    db_pool: asyncpg.Pool,
    new_id: NewId,
) -> None:
    pid, [wid] = await make_stock(50)
    key, ref = new_id("key"), new_id("ref")
    body = {"lines": [line(pid, 3)], "reference": ref}
    answers = await asyncio.gather(
        *(
            http.post(
                cluster.url(i, "/v1/reservations"), json=body, headers={"Idempotency-Key": key}
            )
            for i in range(20)
        )
    )
    assert {(r.status_code, r.content) for r in answers} == {(201, answers[0].content)}
    assert (
        await db_pool.fetchval("SELECT count(*) FROM reservations WHERE reference = $1", ref) == 1
    )
    row = (await rows(db_pool, pid))[wid]
    assert (row["reserved"], row["version"]) == (3, 2)
    # A racing different body under the same key is refused, the original stays.
    other = await asyncio.gather(
        *(
            http.post(
                cluster.url(i, "/v1/reservations"),
                json={**body, "ttl_seconds": 60},
                headers={"Idempotency-Key": key},
            )
            for i in range(6)
        )
    )
    assert {r.status_code for r in other} == {422}
    assert {r.json()["error"]["code"] for r in other} == {"idempotency_key_reused"}
    assert (await rows(db_pool, pid))[wid]["reserved"] == 3


# --- expiry ---------------------------------------------------------------------------------


async def test_expiry_without_traffic(
    cluster: Cluster,
    http: httpx.AsyncClient,
    make_stock: MakeStock,
    db_pool: asyncpg.Pool,
) -> None:
    pid, [wid] = await make_stock(8)
    r = await reserve(http, cluster.url(0, "/v1/reservations"), [line(pid, 5)], ttl_seconds=1)
    assert r.status_code == 201, r.text
    rid = uuid.UUID(r.json()["id"])
    expires_at: datetime = datetime.fromisoformat(r.json()["expires_at"])

    # Only the database is watched from here on: no request touches the reservation.
    async def returned() -> bool:
        return bool((await rows(db_pool, pid))[wid]["reserved"] == 0)

    await wait_for(returned, 5, "the stock to return")
    seen_at: datetime = await db_pool.fetchval("SELECT clock_timestamp()")
    assert (seen_at - expires_at).total_seconds() <= 2.1
    move = await db_pool.fetchrow(
        "SELECT kind, reserved_delta, created_at FROM movements "
        "WHERE reservation_id = $1 AND kind <> 'reserved'",
        rid,
    )
    assert move is not None
    assert (move["kind"], move["reserved_delta"]) == ("expired", -5)
    assert 0 <= (move["created_at"] - expires_at).total_seconds() <= 2
    status = await db_pool.fetchval("SELECT status FROM reservations WHERE id = $1", rid)
    assert status == "expired"


async def test_expiry_after_restart(
    cluster: Cluster,
    http: httpx.AsyncClient,
    scratch_database: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    """Stopped before the deadline; the next server to start expires the reservation."""
    env = server_env(scratch_database, redis_url, f"{redis_prefix}-restart", cluster.strategy)
    first = ServerProcess(env)
    second = ServerProcess(env)
    db = await asyncpg.connect(scratch_database)
    try:
        await asyncio.to_thread(first.start)
        wid, pid = "wh-restart", "sku-restart"
        r = await http.put(
            f"{first.base_url}/v1/warehouses/{wid}", json={"name": wid, "status": "active"}
        )
        assert r.status_code == 201
        r = await http.put(f"{first.base_url}/v1/products/{pid}/stock/{wid}", json={"quantity": 4})
        assert r.status_code == 200
        r = await http.post(
            f"{first.base_url}/v1/reservations", json={"lines": [line(pid, 3)], "ttl_seconds": 2}
        )
        assert r.status_code == 201, r.text
        rid = uuid.UUID(r.json()["id"])
        assert await asyncio.to_thread(first.stop) == 0
        assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", rid) == "active"

        # With no server running nothing returns the stock, even past the deadline.
        async def overdue() -> bool:
            late: bool = await db.fetchval(
                "SELECT expires_at + interval '0.3 s' < clock_timestamp() FROM reservations "
                "WHERE id = $1",
                rid,
            )
            return late

        await wait_for(overdue, 5, "the deadline to pass")
        assert await db.fetchval("SELECT status FROM reservations WHERE id = $1", rid) == "active"
        assert (await rows(db, pid))[wid]["reserved"] == 3

        await asyncio.to_thread(second.start)
        ready = time.monotonic()

        async def expired() -> bool:
            status = await db.fetchval("SELECT status FROM reservations WHERE id = $1", rid)
            return bool(status == "expired")

        await wait_for(expired, 5, "the restarted server to expire the reservation")
        assert time.monotonic() - ready <= 2
        row = (await rows(db, pid))[wid]
        assert (row["quantity"], row["reserved"], row["version"]) == (4, 0, 3)
        kinds = [r["kind"] for r in await db.fetch("SELECT kind FROM movements ORDER BY id")]
        assert kinds == ["adjusted", "reserved", "expired"]
        await assert_invariants(scratch_database)
    finally:
        await db.close()
        await asyncio.gather(asyncio.to_thread(first.stop), asyncio.to_thread(second.stop))
        first.log.unlink(missing_ok=True)
        second.log.unlink(missing_ok=True)


async def test_commit_racing_expiry(
    cluster: Cluster,
    http: httpx.AsyncClient,
    make_stock: MakeStock,
    db_pool: asyncpg.Pool,
    database_url: str,
) -> None:
    pid, [wid] = await make_stock(100)
    made = []
    for i in range(12):
        r = await reserve(http, cluster.url(i, "/v1/reservations"), [line(pid, 2)], ttl_seconds=1)
        assert r.status_code == 201, r.text
        made.append(r.json())
    offsets = [-0.25 + 0.5 * i / (len(made) - 1) for i in range(len(made))]

    async def commit_at(i: int, res: dict[str, Any], offset: float) -> list[httpx.Response]:
        at = datetime.fromisoformat(res["expires_at"]).timestamp() + offset
        await asyncio.sleep(max(0.0, at - time.time()))
        path = f"/v1/reservations/{res['id']}/commit"
        return list(
            await asyncio.gather(
                decided(http, "POST", cluster.url(i, path)),
                decided(http, "POST", cluster.url(i + 1, path)),
            )
        )

    results = await asyncio.gather(
        *(commit_at(i, res, off) for i, (res, off) in enumerate(zip(made, offsets, strict=True)))
    )

    async def settled() -> bool:
        return await due_unswept(db_pool, [pid]) == 0

    await wait_for(settled, 3, "the sweeper to expire the reservations that lost")
    wins = 0
    for res, (a, b) in zip(made, results, strict=True):
        assert a.status_code == b.status_code, (a.text, b.text)
        rid = uuid.UUID(res["id"])
        status = await db_pool.fetchval("SELECT status FROM reservations WHERE id = $1", rid)
        kinds = [
            r["kind"]
            for r in await db_pool.fetch(
                "SELECT kind FROM movements WHERE reservation_id = $1 ORDER BY id", rid
            )
        ]
        if a.status_code == 200:
            wins += 1
            assert a.json()["status"] == b.json()["status"] == "committed"
            assert status == "committed"
            assert kinds == ["reserved", "committed"]
        else:
            assert a.status_code == 409, a.text
            for r in (a, b):
                assert r.json()["error"] == {
                    **r.json()["error"],
                    "code": "invalid_state",
                    "details": {"status": "expired"},
                }
            assert status == "expired"
            assert kinds == ["reserved", "expired"]
    row = (await rows(db_pool, pid))[wid]
    assert (row["quantity"], row["reserved"]) == (100 - 2 * wins, 0)
    await assert_invariants(database_url)


# --- multi-line requests --------------------------------------------------------------------


async def test_multi_line_orders_and_short_lines(
    cluster: Cluster,
    http: httpx.AsyncClient,
    make_stock: MakeStock,
    db_pool: asyncpg.Pool,
) -> None:
    a, [wa] = await make_stock(1000)
    b, [wb] = await make_stock(1000)
    c, [wc] = await make_stock(3)
    tally = Tally()

    async def ordered(i: int) -> httpx.Response:
        lines = [line(a, 1), line(b, 1)] if i % 2 else [line(b, 1), line(a, 1)]
        r = await reserve(http, cluster.url(i, "/v1/reservations"), lines, tally=tally)
        tally.add("ordered", r)
        return r

    async def short(i: int) -> httpx.Response:
        lines = [line(a, 1), line(c, 5)] if i % 2 else [line(c, 5), line(b, 1)]
        r = await reserve(http, cluster.url(i, "/v1/reservations"), lines, tally=tally)
        tally.add("short", r)
        return r

    answers = await asyncio.gather(
        *(ordered(i) for i in range(100)), *(short(i) for i in range(50))
    )
    assert tally.unexpected({"ordered": {201}, "short": {409}}) == {}, tally
    for r in answers[100:]:
        assert r.json()["error"] == {
            **r.json()["error"],
            "code": "insufficient_stock",
            "details": [{"product_id": c, "requested": 5, "available": 3}],
        }
    for pid, wid in ((a, wa), (b, wb)):
        row = (await rows(db_pool, pid))[wid]
        assert (row["reserved"], row["version"]) == (100, 101)
        assert await ledger_count(db_pool, pid) == 101
    row = (await rows(db_pool, c))[wc]
    assert (row["reserved"], row["version"]) == (0, 1)
    assert await ledger_count(db_pool, c) == 1


# --- adjustments ----------------------------------------------------------------------------


async def test_concurrent_adjustments_with_one_expected_version(
    cluster: Cluster,
    http: httpx.AsyncClient,
    make_stock: MakeStock,
    db_pool: asyncpg.Pool,
    database_url: str,
) -> None:
    pid, [wid] = await make_stock(10)
    version = (await rows(db_pool, pid))[wid]["version"]
    answers = await asyncio.gather(
        *(
            http.post(
                cluster.url(i, f"/v1/products/{pid}/stock/{wid}/adjustments"),
                json={"delta": 1 + i % 3, "expected_version": version},
            )
            for i in range(50)
        )
    )
    statuses = Counter(r.status_code for r in answers)
    assert statuses == {200: 1, 409: 49}, statuses
    [winner] = [r for r in answers if r.status_code == 200]
    assert winner.json()["version"] == version + 1
    for r in answers:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "version_conflict"
            assert r.json()["error"]["details"] == {"current_version": version + 1}
    row = (await rows(db_pool, pid))[wid]
    assert row["version"] == version + 1
    assert winner.json()["quantity"] - 10 in (1, 2, 3)
    assert row["quantity"] == winner.json()["quantity"]
    assert await ledger_count(db_pool, pid) == 2
    await assert_invariants(database_url)
