"""The console script: help, errors as one line, migrations, and the embedded default."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from bench.stack import with_database
from inventory.ops.embedded import free_port
from inventory.store.migrate import apply_migrations, load_migrations

from .conftest import ROOT


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    return subprocess.run(
        [sys.executable, "-m", "inventory.ops.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_help_lists_every_command() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("serve", "migrate", "check", "bench", "demo"):
        assert command in r.stdout
    r = run_cli("serve", "--help")
    assert r.returncode == 0
    for option in ("--host", "--port", "--workers", "--data-dir"):
        assert option in r.stdout


@pytest.mark.parametrize(
    "args",
    [("serve", "--bogus"), ("serve", "--port", "x"), ("serve", "--port", "70000"), ("nope",)],
)
def test_bad_options_fail_without_traceback(args: tuple[str, ...]) -> None:
    r = run_cli(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("inventory")


def test_unreachable_database_is_one_line(redis_url: str) -> None:
    port = free_port()
    env = {"INVENTORY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/x",
           "INVENTORY_REDIS_URL": redis_url}  # fmt: skip
    for command in ("serve", "migrate", "check"):
        r = run_cli(command, env=env)
        assert r.returncode == 1, r.stderr
        lines = [x for x in r.stderr.splitlines() if x.startswith("inventory: error")]
        assert lines == [lines[0]]
        assert lines[0].endswith(f"cannot reach PostgreSQL at 127.0.0.1:{port}: connection refused")
        assert "Traceback" not in r.stderr


def test_bad_environment_is_one_line() -> None:
    r = run_cli("serve", env={"INVENTORY_RESERVE_STRATEGY": "pessimistic"})
    assert r.returncode == 1
    assert "INVENTORY_RESERVE_STRATEGY" in r.stderr
    assert "Traceback" not in r.stderr


def test_refuses_public_bind_without_tokens() -> None:
    r = run_cli("serve", "--host", "0.0.0.0")
    assert r.returncode == 1
    assert "INVENTORY_TOKENS" in r.stderr


@pytest.fixture
async def scratch_db(server_urls: tuple[str, str]) -> AsyncIterator[str]:
    name = f"inventory_scratch_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_urls[0])
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield with_database(server_urls[0], name)
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


async def test_migrate_command(scratch_db: str) -> None:
    env = {"INVENTORY_DATABASE_URL": scratch_db}
    r = await asyncio.to_thread(run_cli, "migrate", env=env)
    assert r.returncode == 0, r.stderr
    assert "0001_initial" in r.stdout
    r = await asyncio.to_thread(run_cli, "migrate", env=env)
    assert "up to date" in r.stdout


async def test_concurrent_migrations_apply_once(scratch_db: str) -> None:
    conns = [await asyncpg.connect(scratch_db) for _ in range(5)]
    try:
        applied = await asyncio.gather(*(apply_migrations(c) for c in conns))
        assert sorted(len(a) for a in applied) == [0, 0, 0, 0, len(load_migrations())]
        rows = await conns[0].fetch("SELECT version FROM schema_migrations")
        assert len(rows) == len(load_migrations())
    finally:
        for c in conns:
            await c.close()


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise AssertionError("server not ready")


def _serve(data_dir: Path, port: int) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    return subprocess.Popen(
        [sys.executable, "-m", "inventory.ops.cli", "serve", "--data-dir", str(data_dir),
         "--port", str(port)],
        env=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )  # fmt: skip


def test_embedded_default_survives_restart(tmp_path: Path) -> None:
    """Zero configuration: embedded servers start, stop on SIGTERM, keep the data."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(tmp_path, port)
    try:
        cold = _wait_ready(url, proc, 60)
        r = httpx.put(f"{url}/v1/warehouses/kept", json={"name": "Kept", "status": "active"})
        assert r.status_code == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()
    proc = _serve(tmp_path, port)
    try:
        warm = _wait_ready(url, proc, 60)
        assert httpx.get(f"{url}/v1/warehouses/kept").json()["name"] == "Kept"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    print(f"cold start to /ready: {cold:.2f}s, warm: {warm:.2f}s")
