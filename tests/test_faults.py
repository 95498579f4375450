"""Fault injection against real ``inventory serve`` processes.

- PostgreSQL behind :class:`tests.faultproxy.FaultProxy`: connections dropped, stalled and
  reset in the middle of a reservation load. Every request gets one clear answer in
  time (201/200/409, or 503 with a JSON error and ``Retry-After``; never a 500, never a
  hang), ``/ready`` follows the database, the server recovers by itself, and the
  invariants hold afterwards.
- Redis behind the proxy, dropped or stalled: the optimistic strategy does not need Redis
  to reserve; the lock strategy answers 503 while Redis is away (within the lock wait
  even when Redis is silent) and recovers after.
- ``kill -9`` of a server under load: nothing half-written, and the reservations it left
  behind are expired on time by the next process.
- SIGTERM under load: requests already received are answered, the process exits 0.

Waits are conditions with deadlines (:func:`until`); loads stop on an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from inventory.ops.check import check_database
from tests.faultproxy import FaultProxy

from .conftest import wait_until as until

pytestmark = pytest.mark.asyncio

MakeStock = Callable[..., Awaitable[tuple[str, list[str]]]]
NewId = Callable[[str], str]

# The longest any request may take while a dependency misbehaves. With
# INVENTORY_DB_TIMEOUT=1 every database wait is bounded by about a second, so an answer
# later than this is a hang, not slowness.
ANSWER_DEADLINE = 8.0
# How long the PostgreSQL partition is held (well past the 1 s database timeout and the
# 2 s /ready probe).
STALL_HOLD = 3.0
# The client gives up later than that, so a slow answer is measured rather than cut off.
CLIENT_TIMEOUT = 20.0


def with_netloc(url: str, address: str) -> str:
    """``url`` pointing at ``address`` (host:port), keeping user, database and query."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{address}" if user else address))


def target_of(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def answer_problem(r: httpx.Response, allowed: set[int]) -> str | None:
    """Why ``r`` is not a clear answer (None when it is one)."""
    if r.status_code not in allowed:
        return f"status {r.status_code} not in {sorted(allowed)}: {r.text[:300]}"
    try:
        body = r.json()
    except ValueError:
        return f"status {r.status_code} with a non-JSON body: {r.text[:300]!r}"
    if r.status_code < 400:
        return None if isinstance(body, dict) else f"unexpected body {body!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"code", "message", "details"}:
        return f"status {r.status_code} without the error shape: {r.text[:300]}"
    if r.status_code == 503:
        if error["code"] not in ("unavailable", "contention"):
            return f"503 with code {error['code']!r}"
        retry_after = r.headers.get("retry-after", "")
        if not retry_after.isdigit() or int(retry_after) < 1:
            return f"503 without a valid Retry-After: {retry_after!r}"
    return None


# --- load ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    what: str
    phase: str
    started: float
    elapsed: float
    status: int | None  # None: no HTTP answer at all
    problem: str | None
    code: str | None = None  # the error code of a 4xx/5xx answer


ALLOWED = {"reserve": {201, 409, 503}, "commit": {200, 409, 503}, "release": {200, 409, 503}}


@dataclass
class Load:
    """Concurrent single- and multi-line reservations, commits and releases."""

    http: httpx.AsyncClient
    base_url: str
    products: Sequence[tuple[str, list[str]]]
    ttls: Sequence[int] = (900,)
    phase: str = "warmup"
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(self, what: str, method: str, path: str, **kw: Any) -> httpx.Response | None:
        phase, started = self.phase, time.monotonic()
        try:
            r = await self.http.request(method, self.base_url + path, timeout=CLIENT_TIMEOUT, **kw)
        except httpx.HTTPError as exc:
            elapsed = time.monotonic() - started
            self.outcomes.append(
                Outcome(what, phase, started, elapsed, None, f"{type(exc).__name__}: {exc!r}")
            )
            return None
        elapsed = time.monotonic() - started
        problem = answer_problem(r, ALLOWED[what])
        if problem is None and elapsed > ANSWER_DEADLINE:
            problem = f"answered after {elapsed:.1f}s"
        code = None
        if r.status_code >= 400 and problem is None:
            code = r.json()["error"]["code"]
            if r.status_code == 503:
                code += ": " + r.json()["error"]["message"]
        self.outcomes.append(Outcome(what, phase, started, elapsed, r.status_code, problem, code))
        return r

    def lines(self, rng: random.Random) -> list[dict[str, Any]]:
        if rng.random() < 0.5:
            pid, _ = rng.choice(self.products)
            return [{"product_id": pid, "quantity": rng.randint(1, 3)}]
        chosen = rng.sample(list(self.products), k=min(len(self.products), rng.randint(2, 3)))
        lines = []
        for pid, whs in chosen:
            line: dict[str, Any] = {"product_id": pid, "quantity": rng.randint(1, 2)}
            if rng.random() < 0.3:
                line["warehouse_id"] = rng.choice(whs)
            lines.append(line)
        return lines

    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            body = {"lines": self.lines(rng), "ttl_seconds": rng.choice(self.ttls)}
            r = await self.call("reserve", "POST", "/v1/reservations", json=body)
            if r is None or r.status_code != 201:
                if r is None or r.status_code == 503:
                    await asyncio.sleep(rng.uniform(0, 0.05))  # a client's jittered pause
                continue
            rid = r.json()["id"]
            choice = rng.random()
            if choice < 0.4:
                await self.call("commit", "POST", f"/v1/reservations/{rid}/commit")
            elif choice < 0.8:
                await self.call("release", "POST", f"/v1/reservations/{rid}/release")

    @contextlib.asynccontextmanager
    async def running(self, workers: int) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self.worker(i)) for i in range(workers)]
        try:
            yield self
        finally:
            self.stop.set()
            done, pending = await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT + 5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert not pending, "load workers did not stop"
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error

    def count(self, *, phase: str | None = None, status: int | None = None) -> int:
        return sum(
            1
            for o in self.outcomes
            if (phase is None or o.phase == phase) and (status is None or o.status == status)
        )

    def problems(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.problem is not None]

    def summary(self) -> dict[tuple[str, str, int | None, str | None], int]:
        seen: dict[tuple[str, str, int | None, str | None], int] = {}
        for o in self.outcomes:
            key = (o.phase, o.what, o.status, o.code)
            seen[key] = seen.get(key, 0) + 1
        return dict(sorted(seen.items(), key=str))

    def slowest(self) -> dict[str, float]:
        worst: dict[str, float] = {}
        for o in self.outcomes:
            worst[o.phase] = round(max(worst.get(o.phase, 0.0), o.elapsed), 2)
        return worst


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them.
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=2)
    async with httpx.AsyncClient(limits=limits, timeout=CLIENT_TIMEOUT) as c:
        yield c


async def ready_status(http: httpx.AsyncClient, base_url: str) -> int:
    started = time.monotonic()
    r = await http.get(f"{base_url}/ready", timeout=CLIENT_TIMEOUT)
    assert time.monotonic() - started < ANSWER_DEADLINE, "/ready answered too late"
    assert r.status_code in (200, 503), r.text
    return r.status_code


async def wait_ready(http: httpx.AsyncClient, base_url: str, status: int, timeout: float) -> None:
    async def check() -> bool:
        return await ready_status(http, base_url) == status

    await until(check, timeout, f"/ready answering {status}")


def no_violations(found: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {name: rows for name, rows in found.items() if rows}


async def seed(
    http: httpx.AsyncClient, base_url: str, new_id: NewId, n: int, quantity: int
) -> list[tuple[str, list[str]]]:
    warehouses = [new_id("wh"), new_id("wh")]
    for wid in warehouses:
        r = await http.put(
            f"{base_url}/v1/warehouses/{wid}", json={"name": wid, "status": "active"}
        )
        assert r.status_code == 201, r.text
    products = []
    for _ in range(n):
        pid = new_id("sku")
        for wid in warehouses:
            r = await http.put(
                f"{base_url}/v1/products/{pid}/stock/{wid}", json={"quantity": quantity}
            )
            assert r.status_code == 200, r.text
        products.append((pid, warehouses))
    return products


# --- the proxy itself ---------------------------------------------------------------------


async def test_fault_proxy_drop_stall_reset() -> None:
    """The proxy's own contract, against a local echo server."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with FaultProxy("127.0.0.1", port) as proxy:

            async def roundtrip() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
                return reader, writer

            reader, writer = await roundtrip()

            proxy.stall()
            writer.write(b"held")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.readexactly(4), 0.3)
            proxy.unstall()
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"

            await proxy.reset()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.readexactly(1), 5)
            writer.close()
            reader, writer = await roundtrip()  # still accepting after a reset

            await proxy.drop()
            assert await asyncio.wait_for(reader.read(1), 5) == b""
            writer.close()
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", proxy.port)
            await proxy.restore()
            reader, writer = await roundtrip()
            writer.close()

            # A stalled proxy can still be dropped: nothing waits for the stall to end.
            reader, writer = await roundtrip()
            proxy.stall()
            await asyncio.wait_for(proxy.drop(), 2)
            assert proxy.connections == 0
            writer.close()
            await proxy.restore()
    finally:
        server.close()
        await server.wait_closed()


# --- PostgreSQL faults --------------------------------------------------------------------


@pytest.fixture
async def pg_proxy(database_url: str) -> AsyncIterator[FaultProxy]:
    """In front of the session's PostgreSQL server."""
    async with FaultProxy(*target_of(database_url)) as proxy:
        yield proxy


async def test_postgres_drop_stall_reset_under_load(
    server_factory: Any,
    pg_proxy: FaultProxy,
    scratch_database: str,
    new_id: NewId,
    http: httpx.AsyncClient,
) -> None:
    """The server reaches its database (a scratch one on the session's PostgreSQL, so
    that its own sweeper is the only one: the test can tell the sweeper survived) only
    through the proxy. Some reservations have a 1 s TTL, so expiry runs through the
    faults as well."""
    server = await server_factory(
        env={
            "INVENTORY_DATABASE_URL": with_netloc(scratch_database, pg_proxy.address),
            "INVENTORY_DB_TIMEOUT": "1",
        }
    )
    products = await seed(http, server.base_url, new_id, 6, 100_000)
    load = Load(http, server.base_url, products, ttls=(1, 900, 900))

    async def answered(phase: str, status: int, n: int, timeout: float) -> None:
        await until(
            lambda: load.count(phase=phase, status=status) >= n,
            timeout,
            f"{n} answers {status} in phase {phase!r} ({load.summary()})",
        )

    try:
        async with load.running(workers=24):
            await answered("warmup", 201, 30, 15)

            load.phase = "dropped"
            await pg_proxy.drop()
            await wait_ready(http, server.base_url, 503, 5)
            await answered("dropped", 503, 20, 10)
            load.phase = "after-drop"
            await pg_proxy.restore()
            await wait_ready(http, server.base_url, 200, 15)
            await answered("after-drop", 201, 30, 15)

            load.phase = "stalled"
            pg_proxy.stall()
            stalled_at = time.monotonic()
            await wait_ready(http, server.base_url, 503, 5)
            await answered("stalled", 503, 20, 10)
            # Hold the partition past every timeout: answers must keep coming.
            await until(lambda: time.monotonic() - stalled_at > STALL_HOLD, 10, "stall held")
            await answered("stalled", 503, 40, 10)
            load.phase = "after-stall"
            pg_proxy.unstall()
            await wait_ready(http, server.base_url, 200, 15)
            await answered("after-stall", 201, 30, 15)

            for i in range(3):
                load.phase = f"reset-{i}"
                await pg_proxy.reset()
                await answered(f"reset-{i}", 201, 20, 15)
            load.phase = "end"
    finally:
        # Shown when the test fails.
        for key, n in load.summary().items():
            print(n, *key)
        print("slowest answer by phase:", load.slowest())

    problems = load.problems()
    assert not problems, problems[:10]
    assert await ready_status(http, server.base_url) == 200

    # Recovered by itself: a fresh reservation goes through and can be committed.
    pid, _ = products[0]
    r = await http.post(
        f"{server.base_url}/v1/reservations", json={"lines": [{"product_id": pid, "quantity": 1}]}
    )
    assert r.status_code == 201, r.text
    r = await http.post(f"{server.base_url}/v1/reservations/{r.json()['id']}/commit")
    assert r.status_code == 200, r.text

    # The sweeper survived the faults: nothing stays active for long past its deadline.
    db = await asyncpg.connect(scratch_database)
    try:

        async def swept() -> bool:
            overdue = await db.fetchval(
                """SELECT count(*) FROM reservations WHERE status = 'active'
                   AND expires_at < clock_timestamp() - interval '2 seconds'"""
            )
            return overdue == 0

        await until(swept, 10, "overdue reservations expired by the sweeper")
        expired = await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'expired'")
        assert expired > 0
    finally:
        await db.close()
    assert no_violations(await check_database(scratch_database)) == {}


async def test_pg_terminate_backend_under_load(
    server_factory: Any, scratch_database: str, new_id: NewId, http: httpx.AsyncClient
) -> None:
    """The issue's case: terminating the server's backends in the middle of commands left
    connections answering asyncpg's InternalClientError ("cannot switch to state ...;
    another operation is in progress"), 3-10 requests per fault answered 500. Every
    request must get 201/200/409, or 503 ``unavailable`` with Retry-After."""
    server = await server_factory(env={"INVENTORY_DATABASE_URL": scratch_database})
    products = await seed(http, server.base_url, new_id, 6, 100_000)
    load = Load(http, server.base_url, products)
    name = urlsplit(scratch_database).path.lstrip("/")
    admin = await asyncpg.connect(scratch_database)
    try:
        async with load.running(workers=24):
            await until(lambda: load.count(status=201) >= 30, 15, "reservations before faults")
            for i in range(5):
                load.phase = f"terminated-{i}"
                killed = await admin.fetchval(
                    """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                       WHERE datname = $1 AND pid <> pg_backend_pid()""",
                    name,
                )
                assert killed > 0
                await until(
                    lambda i=i: load.count(phase=f"terminated-{i}", status=201) >= 20,
                    15,
                    f"reservations after termination {i} ({load.summary()})",
                )
            load.phase = "end"
    finally:
        await admin.close()
        for key, n in load.summary().items():
            print(n, *key)
    problems = load.problems()
    assert not problems, problems[:10]
    assert load.count(status=500) == 0
    assert no_violations(await check_database(scratch_database)) == {}


# --- Redis faults -------------------------------------------------------------------------


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(*target_of(redis_url)) as proxy:
        yield proxy


async def reserve_batch(
    http: httpx.AsyncClient,
    base_url: str,
    bodies: Sequence[dict[str, Any]],
    deadline: float = ANSWER_DEADLINE,
) -> list[tuple[float, httpx.Response]]:
    """Send reservations concurrently; (seconds taken, response) each, every one
    answered within ``deadline``."""

    async def one(body: dict[str, Any]) -> tuple[float, httpx.Response]:
        started = time.monotonic()
        try:
            r = await http.post(f"{base_url}/v1/reservations", json=body, timeout=deadline)
        except httpx.TimeoutException:
            pytest.fail(f"no answer within {deadline}s to {body}")
        return time.monotonic() - started, r

    return list(await asyncio.gather(*(one(b) for b in bodies)))


def reservation_bodies(
    products: Sequence[tuple[str, list[str]]], n: int, seed: int
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        chosen = rng.sample(list(products), k=2) if i % 2 else [rng.choice(products)]
        bodies.append({"lines": [{"product_id": p, "quantity": 1} for p, _ in chosen]})
    return bodies


@pytest.mark.parametrize(
    ("strategy", "fault"),
    [
        ("optimistic", "drop"),
        ("optimistic", "stall"),
        ("lock", "drop"),
        ("lock", "stall"),
    ],
)
async def test_redis_outage(
    strategy: str,
    fault: str,
    server_factory: Any,
    redis_proxy: FaultProxy,
    redis_url: str,
    database_url: str,
    make_stock: MakeStock,
    http: httpx.AsyncClient,
) -> None:
    """Optimistic: reservations go on without Redis. Lock: 503 while it is away (refused
    or silent), then back by itself. ``/ready`` reports Redis either way."""
    products = [await make_stock(1000, 1000) for _ in range(4)]
    server = await server_factory(
        env={
            "INVENTORY_REDIS_URL": with_netloc(redis_url, redis_proxy.address),
            "INVENTORY_RESERVE_STRATEGY": strategy,
            "INVENTORY_LOCK_WAIT": "1",
        }
    )
    # With the lock strategy the lock wait (1 s) should bound the answer, with margin.
    deadline = 4.0 if strategy == "lock" else ANSWER_DEADLINE
    base = server.base_url
    before = await reserve_batch(http, base, reservation_bodies(products, 8, 1))
    for _, r in before:
        assert r.status_code == 201, r.text

    if fault == "drop":
        await redis_proxy.drop()
    else:
        redis_proxy.stall()
    await wait_ready(http, base, 503, 5)
    bodies = reservation_bodies(products, 16, 2)
    answers = await reserve_batch(http, base, bodies, deadline)
    for _, r in answers:
        assert answer_problem(r, {201, 503}) is None, r.text
    if strategy == "optimistic":
        assert [r.status_code for _, r in answers] == [201] * len(answers), [
            r.text for _, r in answers
        ]
    else:
        multi = [r for (_, r), b in zip(answers, bodies, strict=True) if len(b["lines"]) > 1]
        assert [r.status_code for r in multi] == [503] * len(multi), [r.text for r in multi]
    # Reservations already made can be finished without Redis in both strategies.
    for _, r in before + answers:
        if r.status_code == 201:
            started = time.monotonic()
            done = await http.post(f"{base}/v1/reservations/{r.json()['id']}/release")
            assert done.status_code == 200, done.text
            assert time.monotonic() - started < ANSWER_DEADLINE

    await redis_proxy.restore()
    await wait_ready(http, base, 200, 15)

    async def recovered() -> bool:
        answers = await reserve_batch(http, base, reservation_bodies(products, 4, 3))
        for _, r in answers:
            assert answer_problem(r, {201, 503}) is None, r.text
        return all(r.status_code == 201 for _, r in answers)

    await until(recovered, 15, "multi-line reservations succeeding again")
    assert no_violations(await check_database(database_url)) == {}


# --- kill -9 ------------------------------------------------------------------------------


async def test_kill_9_under_load_then_restart_expires_stranded_reservations(
    server_factory: Any,
    scratch_database: str,
    new_id: NewId,
    http: httpx.AsyncClient,
) -> None:
    """A crashed process leaves nothing half-written; the next process expires its
    short-lived reservations within 2 s of their deadline (or of its own start)."""
    env = {"INVENTORY_DATABASE_URL": scratch_database}
    first = await server_factory(env=env)
    products = await seed(http, first.base_url, new_id, 6, 10_000)
    load = Load(http, first.base_url, products, ttls=(2,))
    async with load.running(workers=16):
        await until(lambda: load.count(status=201) >= 60, 15, "60 reservations")
        killed_at = time.monotonic()
        await asyncio.to_thread(first.kill)  # SIGKILL mid-flight
        load.phase = "killed"
    # Before the kill every request got a clear answer; in flight at the kill, the
    # connection simply breaks (no HTTP answer, never a wrong one).
    wrong = [o for o in load.outcomes if o.status is not None and o.problem]
    assert wrong == [], wrong[:5]
    early = [o for o in load.outcomes if o.status is None and o.started + o.elapsed < killed_at]
    assert early == [], early[:5]
    assert no_violations(await check_database(scratch_database)) == {}

    db = await asyncpg.connect(scratch_database)
    try:
        stranded = await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'active'")
        assert stranded > 0, "the load left no active reservation to expire"

        second = await server_factory(env=env)
        started: datetime = await db.fetchval("SELECT clock_timestamp()")

        async def none_left() -> bool:
            n = await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'active'")
            return n == 0

        await until(none_left, 10, "every stranded reservation expired")

        # Each expired within 2 s of max(its deadline, the new process being up).
        late = await db.fetch(
            """SELECT r.id, r.expires_at, min(m.created_at) AS expired_at
               FROM reservations r JOIN movements m
                 ON m.reservation_id = r.id AND m.kind = 'expired'
               WHERE r.status = 'expired'
               GROUP BY r.id, r.expires_at
               HAVING min(m.created_at) > greatest(r.expires_at, $1) + interval '2 seconds'""",
            started,
        )
        assert late == [], late
        # Every expired reservation has its ledger rows; every unit came back.
        unbooked = await db.fetch(
            """SELECT l.reservation_id FROM reservation_lines l
               JOIN reservations r ON r.id = l.reservation_id AND r.status = 'expired'
               LEFT JOIN movements m ON m.reservation_id = l.reservation_id
                 AND m.kind = 'expired' AND m.product_id = l.product_id
                 AND m.warehouse_id = l.warehouse_id
               WHERE m.id IS NULL"""
        )
        assert unbooked == [], unbooked
        held = await db.fetchval("SELECT coalesce(sum(reserved), 0) FROM stock_levels")
        assert held == 0
        expired = await db.fetchval("SELECT count(*) FROM reservations WHERE status = 'expired'")
        assert expired >= stranded
    finally:
        await db.close()
    assert no_violations(await check_database(scratch_database)) == {}
    r = await http.get(f"{second.base_url}/ready")
    assert r.status_code == 200


# --- SIGTERM ------------------------------------------------------------------------------


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


async def test_sigterm_finishes_in_flight_requests_and_exits_0(
    server_factory: Any,
    database_url: str,
    make_stock: MakeStock,
    http: httpx.AsyncClient,
) -> None:
    """Requests the server has already received are answered after SIGTERM.

    To know they are in flight, the test holds the row locks of their products: each
    request is then visibly waiting inside PostgreSQL (``pg_stat_activity``) when the
    signal is sent, and is released only once the server has stopped accepting.
    """
    singles = [await make_stock(100) for _ in range(5)]
    pairs = [(await make_stock(100), await make_stock(100)) for _ in range(5)]
    background = [await make_stock(100_000, 100_000) for _ in range(4)]
    server = await server_factory(
        env={"INVENTORY_DB_POOL_MAX": "20", "INVENTORY_RESERVE_LANES": "4"}
    )
    held = [p for p, _ in singles] + [p for pair in pairs for p, _ in pair]
    wave_bodies = [{"lines": [{"product_id": p, "quantity": 1}]} for p, _ in singles] + [
        {"lines": [{"product_id": a, "quantity": 1}, {"product_id": b, "quantity": 2}]}
        for (a, _), (b, _) in pairs
    ]

    load = Load(http, server.base_url, background)
    blocker = await asyncpg.connect(database_url)
    monitor = await asyncpg.connect(database_url)
    blocker_pid = blocker.get_server_pid()
    try:
        async with load.running(workers=8):
            await until(lambda: load.count(status=201) >= 20, 15, "background load running")
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(
                "SELECT 1 FROM stock_levels WHERE product_id = ANY($1::text[]) FOR UPDATE", held
            )
            wave = [
                asyncio.create_task(
                    http.post(f"{server.base_url}/v1/reservations", json=b, timeout=30)
                )
                for b in wave_bodies
            ]

            # Lane batches skip the held rows; each request of the wave then waits for
            # them in a waiting batch of its own product set (the background load's rows
            # are never blocked).
            waiting = len(pairs) + len(singles)

            async def all_waiting() -> bool:
                # A connection of its own: inside a transaction the activity view is a
                # snapshot that would not change.
                n = await monitor.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                    blocker_pid,
                )
                return n == waiting

            await until(all_waiting, 10, "every request of the wave waiting in PostgreSQL")
            signalled = time.monotonic()
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            await until(lambda: refuses_connections(server.port), 5, "listener closed")
            await tx.rollback()
            answers = await asyncio.gather(*wave, return_exceptions=True)
            load.phase = "terminated"
        exit_code = await asyncio.to_thread(server.proc.wait, 15)
    finally:
        await blocker.close()
        await monitor.close()

    failures = [a for a in answers if not isinstance(a, httpx.Response)]
    assert failures == [], failures
    for r in answers:
        assert isinstance(r, httpx.Response)
        assert r.status_code == 201, r.text
    assert exit_code == 0
    assert time.monotonic() - signalled < 12, "shutdown took longer than the grace period"
    # The background load: whatever was answered was a clear answer; requests sent
    # after the signal may find the listener closed (not an answer, not a wrong one).
    answered = [o for o in load.outcomes if o.status is not None]
    assert [o for o in answered if o.problem] == []
    lost = [o for o in load.outcomes if o.status is None and o.started < signalled - 0.5]
    assert lost == [], lost
    assert no_violations(await check_database(database_url)) == {}
