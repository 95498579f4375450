"""A lean closed-loop HTTP/1.1 load generator on asyncio (uvloop when available).

Why not an existing tool: the scenarios need per-request bodies (random product ids),
dependent requests (reserve, then commit the id it returned), per-status latency
(201/409/503 counted apart) and the generator's own CPU cost, measured in the same
process. ``wrk`` does the first but not the second (its Lua ``response()`` cannot tell
which connection a response belongs to); a general-purpose client costs far more CPU
per request (httpx's AsyncClient measured here: about 100 req/s and 6.5 ms of CPU per
request at 64 connections, against ~30 us for this module), CPU the server under test
would otherwise have on a 2-core machine. ``BENCHMARKS.md`` has the measured comparison
with ``wrk``, which this module matches on the bare endpoint.

Model: ``clients`` keep-alive connections, each running one *session* coroutine that
sends a request, waits for the whole response, and sends the next (closed loop, like
``pgbench -c``). Only requests that both start after the warm-up and complete before the
end of the window are recorded; throughput is recorded requests / window.

The parser handles exactly what uvicorn sends: a status line, headers with
``content-length`` and a body. Anything else (chunked bodies, a closed connection) is
counted as an error and the session reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

__all__ = ["Client", "HttpError", "LoadResult", "Recorder", "Session", "run_load"]


class HttpError(Exception):
    """The connection broke or sent something this client does not parse."""


class _Protocol(asyncio.Protocol):
    """One connection: at most one request in flight, response parsed incrementally."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it
        self.transport = cast(asyncio.WriteTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        start = buf.find(b"content-length:", 0, end)
        if start < 0:
            start = bytes(buf[:end]).lower().find(b"content-length:")
            if start < 0:
                self._fail("response without content-length")
                return
        start += 15
        stop = buf.find(b"\r\n", start)
        total = end + 4 + int(buf[start:stop])
        if len(buf) < total:
            return
        status = int(buf[9:12])
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def _fail(self, reason: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpError(reason))
        if self.transport is not None:
            self.transport.close()


@dataclass
class Recorder:
    """Latencies (seconds) per (label, status) inside the measurement window."""

    start: float
    end: float
    latencies: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    errors: int = 0

    def record(self, label: str, status: int, began: float, done: float) -> None:
        if began >= self.start and done <= self.end:
            bucket = self.latencies.get((label, status))
            if bucket is None:
                bucket = self.latencies[(label, status)] = []
            bucket.append(done - began)

    @property
    def open(self) -> bool:
        return time.perf_counter() < self.end


class Client:
    """One keep-alive connection a session sends requests on."""

    def __init__(self, host: str, port: int, recorder: Recorder | None = None) -> None:
        self.host = host
        self.port = port
        self.recorder = recorder
        self._head = f"HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        self._proto: _Protocol | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(_Protocol, self.host, self.port)
        return proto

    async def request(
        self,
        method: bytes,
        path: bytes,
        body: bytes = b"",
        headers: bytes = b"",
        *,
        label: str = "",
    ) -> tuple[int, bytes]:
        """Send one request and return (status, body); records its latency under ``label``.

        ``headers`` is raw ``Name: value\\r\\n`` lines. A broken connection raises
        :class:`HttpError` (counted) and the next request reconnects.
        """
        proto = self._proto
        if proto is None or proto.closed:
            proto = self._proto = await self._connect()
        if body:
            headers += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        waiter = asyncio.get_running_loop().create_future()
        proto.waiter = waiter
        began = time.perf_counter()
        assert proto.transport is not None
        proto.transport.write(b"%s %s %s%s\r\n%s" % (method, path, self._head, headers, body))
        try:
            status, payload = await waiter
        except HttpError:
            self._proto = None
            if self.recorder is not None:
                self.recorder.errors += 1
            raise
        if self.recorder is not None:
            self.recorder.record(label, status, began, time.perf_counter())
        return status, payload

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.close()


Session = Callable[[Client, int], Awaitable[None]]
"""One client's loop body: sends one unit of work (one or more requests) per call;
the second argument is the client's index."""


@dataclass(frozen=True)
class LoadResult:
    """What one run measured: latencies by (label, status), errors, CPU of this process."""

    duration: float
    latencies: dict[tuple[str, int], list[float]]
    errors: int
    cpu_seconds: float
    late: int = 0  # paced runs: units started more than 5 ms after their slot

    def count(self, label: str | None = None, status: int | None = None) -> int:
        return sum(
            len(v)
            for (lbl, st), v in self.latencies.items()
            if (label is None or lbl == label) and (status is None or st == status)
        )

    def rate(self, label: str | None = None, status: int | None = None) -> float:
        return self.count(label, status) / self.duration

    def values(self, label: str | None = None, status: int | None = None) -> list[float]:
        out: list[float] = []
        for (lbl, st), v in self.latencies.items():
            if (label is None or lbl == label) and (status is None or st == status):
                out.extend(v)
        return out

    @property
    def cpu_share(self) -> float:
        """This process's CPU time over the window, as a fraction of one core."""
        return self.cpu_seconds / self.duration


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(
    host: str,
    port: int,
    clients: int,
    duration: float,
    session: Session,
    *,
    warmup: float = 1.0,
    rate: float | None = None,
    on_window: Callable[[bool], None] | None = None,
) -> LoadResult:
    """Run ``clients`` sessions for ``warmup + duration`` seconds.

    Closed loop by default: each client starts its next unit of work when the last one
    is answered, so the offered load is whatever the server sustains and latency grows
    with the queue (Little's law: clients / rate). With ``rate`` (units per second over
    all clients) the load is paced: client ``i`` starts unit ``k`` at
    ``(k * clients + i) / rate`` seconds, a steady open-loop arrival rate a server that
    keeps up answers without queueing. A unit is never started before the previous one on
    the same connection is answered; one that starts more than 5 ms after its slot is
    counted in ``late`` (then the generator or the server is behind and the latencies
    understate the queue).

    ``on_window(True)`` / ``on_window(False)`` are called as the measurement window opens
    and closes (the harness measures the server's CPU over exactly that window).
    """
    now = time.perf_counter()
    recorder = Recorder(now + warmup, now + warmup + duration)
    late = 0

    async def one(index: int) -> None:
        nonlocal late
        client = Client(host, port, recorder)
        slot = now + index / rate if rate else 0.0
        try:
            while recorder.open:
                if rate:
                    wait = slot - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    elif wait < -0.005 and recorder.start <= slot < recorder.end:
                        late += 1
                    slot += clients / rate
                try:
                    await session(client, index)
                except (HttpError, OSError):
                    await asyncio.sleep(0.01)
        finally:
            client.close()

    tasks = [asyncio.create_task(one(i)) for i in range(clients)]
    await asyncio.sleep(max(0.0, recorder.start - time.perf_counter()))
    cpu0 = _cpu()
    if on_window is not None:
        on_window(True)
    await asyncio.sleep(max(0.0, recorder.end - time.perf_counter()))
    cpu1 = _cpu()
    if on_window is not None:
        on_window(False)
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
    except TimeoutError:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
    return LoadResult(duration, recorder.latencies, recorder.errors, cpu1 - cpu0, late)
