"""What the harness measures, started by the harness: databases, Redis, server processes.

PostgreSQL and Redis are the ones named by ``INVENTORY_DATABASE_URL`` /
``INVENTORY_REDIS_URL``, or embedded servers started in a temporary directory. Either way
the run works in two scratch databases created for it and dropped after it: one for the
HTTP server and one for the pgbench ceilings (so the server's outbox relay and sweeper
never see pgbench's writes, and each database's invariants can be checked on its own).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from inventory.ops.embedded import EmbeddedPostgres, EmbeddedValkey, free_port
from inventory.store.migrate import migrate

__all__ = [
    "ROOT",
    "Backing",
    "CpuMeter",
    "Databases",
    "ServerProcess",
    "backing_servers",
    "scratch_databases",
]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Backing:
    """URLs of the PostgreSQL server (an admin database) and the Redis server to use."""

    pg_url: str
    redis_url: str


@contextlib.contextmanager
def backing_servers() -> Iterator[Backing]:
    """The configured servers, or embedded ones in a temporary directory (removed after)."""
    pg_url = os.environ.get("INVENTORY_DATABASE_URL") or None
    redis_url = os.environ.get("INVENTORY_REDIS_URL") or None
    with tempfile.TemporaryDirectory(prefix="inventory-bench-") as tmp:
        pg = vk = None
        try:
            if pg_url is None:
                pg = EmbeddedPostgres(Path(tmp) / "postgres")
                pg_url = pg.start()
            if redis_url is None:
                vk = EmbeddedValkey(Path(tmp) / "valkey")
                redis_url = vk.start()
            yield Backing(pg_url, redis_url)
        finally:
            if vk is not None:
                vk.stop()
            if pg is not None:
                pg.stop()


def with_database(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name``."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str, prefix: str) -> AsyncIterator[str]:
    """A new migrated database ``<prefix>_<random>`` on the server of ``admin_url``,
    dropped on exit (tests and benchmarks both use it)."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_url, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(admin_url, name)
    try:
        await migrate(url)
        yield url
    finally:
        admin = await asyncpg.connect(admin_url, timeout=10)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_env(database_url: str, redis_url: str, **settings: str) -> dict[str, str]:
    """A benchmark server's environment: this process's, the URLs, a fresh Redis prefix,
    no tokens, warnings only; ``settings`` adds or replaces ``INVENTORY_*`` variables."""
    return {
        **os.environ,
        "INVENTORY_DATABASE_URL": database_url,
        "INVENTORY_REDIS_URL": redis_url,
        "INVENTORY_REDIS_PREFIX": f"bench-{secrets.token_hex(4)}",
        "INVENTORY_TOKENS": "",
        "INVENTORY_LOG_LEVEL": "warning",
        **settings,
    }


@dataclass(frozen=True)
class Databases:
    """The scratch databases of one run: ``http`` for the server, ``pgbench`` for ceilings."""

    http: str
    pgbench: str


@contextlib.asynccontextmanager
async def scratch_databases(admin_url: str) -> AsyncIterator[Databases]:
    """Migrated ``bench_<random>`` and ``bench_pgbench_<random>``; dropped after."""
    async with (
        scratch_database(admin_url, "bench") as http,
        scratch_database(admin_url, "bench_pgbench") as pgbench,
    ):
        yield Databases(http, pgbench)


@dataclass
class ServerProcess:
    """An HTTP server run as a subprocess on a free port (``inventory serve`` or uvicorn)."""

    argv: list[str]
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))

    @classmethod
    def inventory(cls, env: dict[str, str], workers: int) -> ServerProcess:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "inventory.ops.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        return cls(argv, env, port)

    @classmethod
    def bare(cls, workers: int) -> ServerProcess:
        """The ceiling app with the uvicorn settings ``inventory serve`` uses."""
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        return cls(argv, dict(os.environ), port)

    def start(self, timeout: float = 60) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.tail()}")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url, timeout=1) as answer,
            ):
                if answer.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready within {timeout:.0f}s: {self.tail()}")

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def processes(self) -> list[psutil.Process]:
        """The server and its worker processes."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.log.unlink(missing_ok=True)


class CpuMeter:
    """CPU used by some processes and by the whole machine between two points in time."""

    def __init__(self, processes: list[psutil.Process]) -> None:
        self.processes = processes
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        own = 0.0
        for p in self.processes:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                own += t.user + t.system
        machine = psutil.cpu_times()
        return own, time.monotonic(), machine.idle + getattr(machine, "iowait", 0.0)

    def stop(self) -> tuple[float, float]:
        """(CPU of the processes in cores, machine busy share 0..1) since construction."""
        own0, t0, idle0 = self._start
        own1, t1, idle1 = self._read()
        wall = max(t1 - t0, 1e-9)
        cores = psutil.cpu_count() or 1
        busy = 1 - (idle1 - idle0) / (wall * cores)
        return (own1 - own0) / wall, min(max(busy, 0.0), 1.0)
