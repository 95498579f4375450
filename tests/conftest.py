"""Shared fixtures: real PostgreSQL and Redis, a fresh database per session, the app.

Servers: ``INVENTORY_DATABASE_URL`` / ``INVENTORY_REDIS_URL`` when set, otherwise an
embedded PostgreSQL and Valkey started in a temporary directory for the session. Each
session works in its own new database (random name, dropped at the end) and its own
Redis key/channel prefix, so runs never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
import httpx
import pytest

from bench.stack import scratch_database, stop_process
from inventory.config import Settings
from inventory.ops.app import create_app
from inventory.ops.embedded import EmbeddedPostgres, EmbeddedValkey, free_port
from inventory.store.migrate import migrate

if TYPE_CHECKING:
    from tests.cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
SERVE = [sys.executable, "-m", "inventory.ops.cli", "serve"]


@pytest.fixture(scope="session")
def server_urls() -> Iterator[tuple[str, str]]:
    """(PostgreSQL admin URL, Redis URL) of real servers for this session.

    Embedded servers live in a private temporary directory, not under pytest's basetemp,
    which other pytest sessions on the machine may prune while this one runs.
    """
    pg_url = os.environ.get("INVENTORY_DATABASE_URL")
    redis_url = os.environ.get("INVENTORY_REDIS_URL")
    base = Path(tempfile.mkdtemp(prefix="inventory-test-servers-"))
    pg = vk = None
    try:
        if not pg_url:
            pg = EmbeddedPostgres(base / "postgres")
            pg_url = pg.start()
        if not redis_url:
            vk = EmbeddedValkey(base / "valkey")
            redis_url = vk.start()
        yield pg_url, redis_url
    finally:
        if vk is not None:
            vk.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)


new_database = scratch_database  # a migrated database, dropped on exit


@pytest.fixture(scope="session")
async def database_url(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A fresh, migrated database for this test session."""
    async with new_database(server_urls[0], "inventory_test") as url:
        yield url


@pytest.fixture
async def scratch_database(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A migrated database of the test's own: safe to corrupt, and no other test's
    server sweeps it."""
    async with new_database(server_urls[0], "inventory_scratch") as url:
        yield url


@dataclass
class PrivatePostgres:
    """An embedded PostgreSQL of one test's own (``private_postgres``), which the test
    may stop and start again: same data directory, same port, so ``url`` (its
    ``postgres`` database, migrated) stays valid across restarts."""

    server: EmbeddedPostgres
    url: str

    async def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Shut it down: ``fast`` as a clean restart does, ``immediate`` as a crash."""
        await asyncio.to_thread(self.server.stop, mode)

    async def start(self) -> None:
        """Start it again (a no-op while it runs)."""
        await asyncio.to_thread(self.server.start)


@pytest.fixture
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    """A PostgreSQL server for this test alone, whatever ``INVENTORY_DATABASE_URL`` says:
    restarting the session's (or the machine's) server would break every other test.
    Thrown away with its data at the end."""
    base = Path(tempfile.mkdtemp(prefix="inventory-test-private-pg-"))
    server = EmbeddedPostgres(base / "postgres", max_connections=100)
    try:
        url = await asyncio.to_thread(server.start)
        await migrate(url)
        yield PrivatePostgres(server, url)
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(server_urls: tuple[str, str]) -> str:
    return server_urls[1]


REQUIRE_CLUSTER = "INVENTORY_REQUIRE_CLUSTER"


def start_cluster() -> LocalCluster:
    """A running local 3-master Redis Cluster (``tests/cluster.py``; stop it after).

    Skips the test only when no server binary can run one, and with
    ``INVENTORY_REQUIRE_CLUSTER=1`` (set by ``.ci/run``) fails it instead: there the
    cluster suite must run, never be skipped unnoticed.
    """
    from tests.cluster import ClusterUnavailable, LocalCluster

    try:
        return LocalCluster(3).__enter__()
    except ClusterUnavailable as exc:
        if os.environ.get(REQUIRE_CLUSTER) == "1":
            pytest.fail(f"no Redis Cluster available although {REQUIRE_CLUSTER}=1: {exc}")
        pytest.skip(f"no Redis Cluster available: {exc}")


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """``redis+cluster://`` URL of a local Redis Cluster started for the session
    (:func:`start_cluster`)."""
    cluster = start_cluster()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
async def private_cluster() -> AsyncIterator[LocalCluster]:
    """A local Redis Cluster of this test's own (:func:`start_cluster`), which it may
    reshard without disturbing other tests."""
    cluster = await asyncio.to_thread(start_cluster)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


@pytest.fixture(params=["single", "cluster"])
def any_redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """Parametrizes a test over single-node Redis and the local Redis Cluster."""
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
    return redis_url


@pytest.fixture
def server_redis_url(redis_url: str) -> str:
    """The Redis URL ``server_factory`` gives its servers; a module that overrides it
    with ``any_redis_url`` runs its server tests on single-node Redis and on a cluster."""
    return redis_url


@pytest.fixture(scope="session")
def redis_prefix() -> str:
    return f"inventory-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=5)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str, redis_prefix: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        sweep_interval=0.1,
    )


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process ASGI client of the app (lifespan already running)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
        yield c


# --- factories ------------------------------------------------------------------------


@pytest.fixture
def new_id() -> Callable[[str], str]:
    """Unique ids, so tests sharing the session database never collide."""

    def make(prefix: str = "p") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:10]}"

    return make


@pytest.fixture
def make_warehouse(
    client: httpx.AsyncClient, new_id: Callable[[str], str]
) -> Callable[..., Awaitable[str]]:
    async def make(status: str = "active", warehouse_id: str | None = None) -> str:
        wid = warehouse_id or new_id("wh")
        r = await client.put(f"/v1/warehouses/{wid}", json={"name": wid, "status": status})
        assert r.status_code in (200, 201), r.text
        return wid

    return make


@pytest.fixture
def make_stock(
    client: httpx.AsyncClient,
    new_id: Callable[[str], str],
    make_warehouse: Callable[..., Awaitable[str]],
) -> Callable[..., Awaitable[tuple[str, list[str]]]]:
    """``await make_stock(10, 5)``: a new product with 10 and 5 units in two new
    warehouses; returns (product_id, [warehouse ids])."""

    async def make(*quantities: int, product_id: str | None = None) -> tuple[str, list[str]]:
        pid = product_id or new_id("sku")
        whs = []
        for qty in quantities:
            wid = await make_warehouse()
            r = await client.put(f"/v1/products/{pid}/stock/{wid}", json={"quantity": qty})
            assert r.status_code == 200, r.text
            whs.append(wid)
        return pid, whs

    return make


# --- waiting on conditions ------------------------------------------------------------


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> float:
    """Poll ``predicate`` (sync or async) until it holds; returns the seconds it took.

    Fails the test after ``timeout`` seconds: waits in tests are conditions with a
    deadline, never a fixed sleep.
    """
    start = time.monotonic()
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(interval)


# --- real server processes ------------------------------------------------------------


@dataclass
class ServerProcess:
    """``inventory serve`` running as a subprocess on a free port."""

    env: dict[str, str]
    args: list[str] = field(default_factory=list)  # extra `inventory serve` options
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*SERVE, "--port", str(self.port), *self.args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return None
        stop_process(self.proc, timeout)
        return self.proc.returncode


ServerFactory = Callable[..., Awaitable[ServerProcess]]


@pytest.fixture
async def server_factory(
    database_url: str, redis_url: str, server_redis_url: str, redis_prefix: str
) -> AsyncIterator[ServerFactory]:
    """``await server_factory(env={...})`` starts a server; all are stopped at test end."""
    started: list[ServerProcess] = []
    # The relay lease is per database and prefix: servers on another Redis (the cluster)
    # take their own prefix, or the session app's relay would lead and publish elsewhere.
    prefix = redis_prefix if server_redis_url == redis_url else f"{redis_prefix}-other"

    async def start(
        env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> ServerProcess:
        full = {
            **os.environ,
            "INVENTORY_DATABASE_URL": database_url,
            "INVENTORY_REDIS_URL": server_redis_url,
            "INVENTORY_REDIS_PREFIX": prefix,
            "INVENTORY_SWEEP_INTERVAL": "0.1",
            "INVENTORY_TOKENS": "",
            **(env or {}),
        }
        server = ServerProcess(full, list(args or ()))
        started.append(server)
        await asyncio.to_thread(server.start)
        return server

    yield start
    await asyncio.gather(*(asyncio.to_thread(s.stop) for s in started))
    for s in started:
        s.log.unlink(missing_ok=True)
