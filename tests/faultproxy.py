"""A TCP proxy that injects network faults between a server process and PostgreSQL or Redis.

In the spirit of asyncpg's test proxy (``asyncpg/_testbase/fuzzer.py``): it listens on a
free 127.0.0.1 port, forwards every accepted connection to ``target``, and can be told to

- :meth:`FaultProxy.drop`: close every connection and refuse new ones (the listening
  socket is closed, so a connect gets ``ECONNREFUSED``) until :meth:`~FaultProxy.restore`;
- :meth:`FaultProxy.stall`: stop forwarding bytes while keeping every socket open (a
  network partition or a frozen peer: the client sees no error, only silence), until
  :meth:`~FaultProxy.unstall`; connections accepted meanwhile are stalled too;
- :meth:`FaultProxy.reset`: abort the current connections with a TCP RST (``SO_LINGER``
  0) on both sides, and keep accepting new ones.

It runs in the caller's event loop (the test's): ``async with FaultProxy(host, port) as p``
or ``await p.start()`` / ``await p.close()``. Closing aborts whatever is still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType

__all__ = ["FaultProxy"]

_CHUNK = 64 * 1024


def _abort(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the accepted client socket and the upstream socket."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.pumps: asyncio.Future[list[None]] | None = None
        self.dead = False

    def abort(self, *, rst: bool) -> None:
        self.dead = True
        _abort(self.client, rst=rst)
        if self.upstream is not None:
            _abort(self.upstream, rst=rst)
        if self.pumps is not None:
            self.pumps.cancel()  # also wakes pumps waiting for a stall to end


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._closed = False
        self.accepted = 0  # connections accepted so far (all time)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        await self._listen()
        return self

    async def close(self) -> None:
        self._closed = True
        await self._stop_listening()
        self._flowing.set()
        await self._abort_all(rst=False)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def address(self) -> str:
        """``host:port`` to put into a URL instead of the target's."""
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._links)

    # --- faults ---------------------------------------------------------------------

    async def drop(self) -> None:
        """Close every connection and refuse new ones until :meth:`restore`."""
        await self._stop_listening()
        await self._abort_all(rst=False)

    async def restore(self) -> None:
        """Undo :meth:`drop` and :meth:`stall`: listen again (same port) and forward."""
        self._flowing.set()
        if self._server is None and not self._closed:
            await self._listen()

    def stall(self) -> None:
        """Stop forwarding bytes in both directions; sockets stay open."""
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    async def reset(self) -> None:
        """Abort the current connections with RST (both sides); keep accepting."""
        await self._abort_all(rst=True)

    # --- internals ------------------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True, backlog=512
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            # Server.wait_closed() would wait for the accepted connections too (3.12+);
            # those are ours to abort, so only the listening socket is waited for here.
            await asyncio.sleep(0)

    async def _abort_all(self, *, rst: bool) -> None:
        links = list(self._links)
        for link in links:
            link.abort(rst=rst)
        tasks = [link.task for link in links if link.task is not None]
        if tasks:
            # The pumps end on the aborted sockets; give them a bounded moment.
            await asyncio.wait(tasks, timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # dropped between the kernel's accept and this callback
            _abort(writer, rst=False)
            return
        self.accepted += 1
        link = _Link(writer)
        link.task = asyncio.current_task()
        self._links.add(link)
        try:
            try:
                async with asyncio.timeout(5):
                    up_reader, up_writer = await asyncio.open_connection(*self.target)
            except (OSError, TimeoutError):
                _abort(writer, rst=False)
                return
            link.upstream = up_writer
            if link.dead:  # aborted while connecting
                _abort(up_writer, rst=False)
                return
            link.pumps = asyncio.gather(
                self._pump(reader, up_writer, link),
                self._pump(up_reader, writer, link),
            )
            with contextlib.suppress(asyncio.CancelledError):
                await link.pumps
        finally:
            self._links.discard(link)
            link.abort(rst=False)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                await self._flowing.wait()
                if not data or link.dead:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):
            pass
        # One direction ended (EOF or error): end the whole link, like a socket close.
        self._links.discard(link)
        link.abort(rst=False)
