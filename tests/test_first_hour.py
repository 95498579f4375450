"""A new user's first hour: a plain install works, replays say so, errors name their cause.

The fresh-venv test installs the project with a plain ``pip install .`` (no extras), so a
dependency that only the ``test`` extra brings (as ``httpx`` once was) fails here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
import venv
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from inventory.client import AsyncClient

from .conftest import ROOT, ServerFactory, wait_until

CLI = [sys.executable, "-m", "inventory.ops.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_plain_install_runs_the_readme_commands(tmp_path: Path) -> None:
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # A copy of the sources: building in place would leave build/ and *.egg-info behind.
    src = tmp_path / "src"
    src.mkdir()
    parts = ("pyproject.toml", "README.md", "LICENSE", "inventory", "realtime", "locks",
             "bench", "loadtest")  # fmt: skip
    subprocess.run(["cp", "-r", *[str(ROOT / p) for p in parts], str(src)], check=True)
    install = subprocess.run(
        [str(bin_dir / "pip"), "install", "--quiet", str(src)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=840,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    for args in (["inventory", "demo", "--help"], ["inventory", "--version"]):
        done = subprocess.run(
            [str(bin_dir / args[0]), *args[1:]],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    version = subprocess.run(
        [str(bin_dir / "inventory"), "--version"], capture_output=True, text=True, env=env
    )
    assert re.fullmatch(r"inventory \d+\.\d+\.\d+\S*\n", version.stdout)
    imported = subprocess.run(
        [str(bin_dir / "python"), "-c",
         "import inventory.client, inventory.ops.transfer; "
         "print(inventory.client.Client.__name__)"],
        capture_output=True, text=True, env=env, cwd="/", timeout=60,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "Client"


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("inventory ")


def test_tokens_new_prints_a_token_and_its_digest() -> None:
    done = run_cli("tokens", "new", "--scopes", "read,reserve")
    assert done.returncode == 0, done.stderr
    fields = dict(line.split(None, 1) for line in done.stdout.splitlines()[:2])
    token, key = fields["token:"], fields["key:"]
    assert key == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    line = done.stdout.splitlines()[2]
    assert line.startswith("INVENTORY_TOKENS=")
    assert json.loads(line.split("=", 1)[1].strip("'")) == {key: ["read", "reserve"]}
    bad = run_cli("tokens", "new", "--scopes", "read,root")
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1
    assert "root" in bad.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"INVENTORY_DATABASE_URL": "postgresql://alice:pw1@127.0.0.1:1/x"},
            "cannot reach PostgreSQL at 127.0.0.1:1: connection refused",
        ),
        (
            {"INVENTORY_REDIS_URL": "redis://:pw1@127.0.0.1:1/0"},
            "cannot reach Redis at 127.0.0.1:1: connection refused",
        ),
    ],
)
def test_startup_errors_name_the_server_without_credentials(
    env: dict[str, str], expected: str, database_url: str, redis_url: str
) -> None:
    full = {"INVENTORY_DATABASE_URL": database_url, "INVENTORY_REDIS_URL": redis_url, **env}
    done = run_cli("serve", "--port", "0", env=full)
    assert done.returncode == 1
    assert done.stderr.strip().endswith(expected), done.stderr
    assert "Traceback" not in done.stderr
    assert "pw1" not in done.stderr
    assert "alice" not in done.stderr


def test_unusable_data_directory_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {"INVENTORY_DATABASE_URL": "", "INVENTORY_REDIS_URL": ""}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    done = subprocess.run(
        [*CLI, "migrate", "--data-dir", str(blocker / "data")],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**clean, **env},
    )  # fmt: skip
    assert done.returncode == 1
    assert f"cannot use the data directory {blocker / 'data'}" in done.stderr
    assert "Traceback" not in done.stderr


async def test_replayed_reservation_says_so(
    client: httpx.AsyncClient, make_stock: Callable[..., object], new_id: Callable[[str], str]
) -> None:
    product, _ = await make_stock(2)  # type: ignore[misc]
    key = new_id("key")
    body = {"lines": [{"product_id": product, "quantity": 3}]}
    first = await client.post("/v1/reservations", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 409
    assert "idempotent-replayed" not in first.headers
    again = await client.post("/v1/reservations", json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 409
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    ok_key = new_id("key")
    fits = {"lines": [{"product_id": product, "quantity": 1}]}
    made = await client.post("/v1/reservations", json=fits, headers={"Idempotency-Key": ok_key})
    assert made.status_code == 201
    assert "idempotent-replayed" not in made.headers
    replay = await client.post("/v1/reservations", json=fits, headers={"Idempotency-Key": ok_key})
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == made.json()


async def test_access_log_is_off_by_default_and_redacts_nothing_it_should_not_log(
    server_factory: ServerFactory,
) -> None:
    quiet = await server_factory()
    loud = await server_factory(args=["--access-log"])
    async with httpx.AsyncClient() as http:
        for server in (quiet, loud):
            r = await http.get(f"{server.base_url}/v1/warehouses?marker=zz-access")
            assert r.status_code == 200

    def logged() -> bool:
        return "zz-access" in loud.log.read_text()

    await wait_until(logged, 10, "the access log line")
    line = next(x for x in loud.log.read_text().splitlines() if "zz-access" in x)
    entry = json.loads(line)  # the normal JSON log format, not uvicorn's own
    assert entry["logger"] == "uvicorn.access"
    assert entry["ts"].endswith("Z")
    assert "zz-access" not in quiet.log.read_text()


async def test_access_log_redacts_credentials(server_factory: ServerFactory) -> None:
    """With authentication on, the token sent in ``Authorization`` never reaches the log,
    nor one put in a URL (refused), nor a stream ticket in ``?ticket=``: their access
    lines show ``[redacted]`` in its place."""
    token = "tok-" + uuid.uuid4().hex
    server = await server_factory(
        env={"INVENTORY_TOKENS": json.dumps({token: ["read"]})}, args=["--access-log"]
    )
    async with AsyncClient(server.base_url, token) as c:
        await c.list_warehouses()
        ticket = (await c.create_stream_ticket()).ticket
    async with httpx.AsyncClient(base_url=server.base_url) as http:  # no Authorization
        stream = {"product_ids": "zz-ticket"}
        async with http.stream("GET", "/v1/stream", params={**stream, "ticket": ticket}) as r:
            assert r.status_code == 200  # the ticket was good: this is its own access line
        r = await http.get("/v1/stream", params={**stream, "token": token})
        assert r.status_code == 401  # a token in a URL is refused, and not logged either
        r = await http.get("/v1/warehouses", params={"marker": "zz-done"})
        assert r.status_code == 401

    await wait_until(lambda: "zz-done" in server.log.read_text(), 10, "the last access line")
    text = server.log.read_text()
    assert token not in text
    assert ticket not in text
    entries = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
    access = [x["msg"] for x in entries if x["logger"] == "uvicorn.access"]
    assert any('"GET /v1/warehouses HTTP/1.1" 200' in x for x in access), access
    streams = [x for x in access if "zz-ticket" in x]
    assert len(streams) == 2, streams
    assert "ticket=[redacted]" in streams[0]
    assert streams[0].endswith(" 200")
    assert "token=[redacted]" in streams[1]
    assert streams[1].endswith(" 401")
