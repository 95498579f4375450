"""One WebSocket connection's outbound side: direct writes, a writer task only under
backpressure, bounded queues.

Policy (backpressure and limits):

* The hub never waits for a client. It :meth:`Session.offer`\\ s updates into the
  connection's :class:`~realtime.conflation.ConflationBuffer` (bounded, newest state per
  row). When no writer task exists and the socket takes data without blocking
  (:meth:`Transport.ready`), what is queued is written at once, on the hub's own call, as
  pre-encoded frames: one ``write`` per connection per burst, however many rows of the
  product changed. That is the normal case, and it costs no task and no task switch per
  delivery (waking a writer task per connection per update, plus the ASGI send layers,
  cost about as much again as the socket write itself).
* Only when the socket pushes back (its transport paused writing: the client reads
  slower than updates arrive) or the transport cannot write directly (another ASGI
  server, SSE) does the session start a writer task. While it exists it is the only
  writer, so frames are never interleaved or reordered; it waits for the socket
  (:meth:`Transport.wait_ready`), writes what is queued as direct batches again, and ends
  when the queues are empty. Nothing is taken out of the buffer while it waits, so the
  updates arriving meanwhile conflate with the pending ones: a slow reader costs an
  offer per update and one batched write per drain, and gets the newest state next.
  An idle connection has no task of its own.
  One direct write carries at most about :data:`WRITE_BATCH` bytes before readiness is
  checked again, so a client that stops reading holds at most the transport's high-water
  mark plus one batch in its write buffer, besides the bounded queues.
* Control messages (snapshot, subscribed, unsubscribed, pong, error) go through a small
  FIFO of ``control_capacity`` messages that is always sent before stock updates. They are
  answers to the client's own requests, so when the FIFO is full the *reader* waits
  (:meth:`Session.send_control`): a client that sends without reading is throttled
  instead of growing a queue.
* A writer send that has not completed after ``send_timeout`` seconds means the client
  has not read for that long (a send only waits while the transport is paused). The
  hub's reaper then closes it with :data:`SLOW_CONSUMER_CLOSE` and, because a blocked
  socket cannot take a close frame either, aborts the transport if the close does not go
  out within ``close_timeout``. Timing a send with a per-send timer would cost more than
  the send itself, hence the periodic reaper reading :attr:`blocked_since`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from realtime.conflation import ConflationBuffer, Offer
from realtime.protocol import Outgoing, text_frame
from realtime.tasks import cancel_and_wait

__all__ = [
    "SLOW_CONSUMER_CLOSE",
    "WRITE_BATCH",
    "HubStats",
    "Session",
    "SessionClosed",
    "SessionOwner",
    "SessionSettings",
    "Transport",
    "TransportClosed",
    "Update",
]

log = logging.getLogger("realtime.session")

SLOW_CONSUMER_CLOSE = 4008
WRITE_BATCH = 64 * 1024  # bytes per direct write, about (one frame may exceed it)

Update = tuple[str, int, Outgoing]
"""(warehouse_id, version, message): one row's new state, as offered to sessions."""


class TransportClosed(Exception):
    """The peer is gone; raised by :class:`Transport` methods."""


class SessionClosed(Exception):
    """The session has been closed; nothing more can be queued."""


class Transport(Protocol):
    """The socket as the session sees it (adapted from ASGI in :mod:`realtime.ws`)."""

    def ready(self) -> bool:
        """Whether :meth:`write` may be called now: the connection is open and its socket
        is not pushing back. Always false for a transport without direct writes."""
        ...

    def write(self, frames: bytes) -> None:
        """Write complete pre-encoded frames at once, without waiting (only when ready)."""
        ...

    async def wait_ready(self) -> bool:
        """Wait while the socket pushes back; true when :meth:`write` may be called now,
        false for a transport without direct writes (use :meth:`send_text`)."""
        ...

    async def send_text(self, text: str) -> None:
        """Send one text message, waiting while the socket pushes back."""
        ...

    async def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None:
        """Drop the connection without a closing handshake (best effort)."""
        ...


@dataclass(slots=True)
class HubStats:
    """Counters for the metrics exporter (monotonic unless marked as a gauge)."""

    connections: int = 0  # gauge: open sessions
    connections_total: int = 0
    subscriptions: int = 0  # gauge: (connection, product) pairs
    topics: int = 0  # gauge: products with a Redis subscription
    deliveries: int = 0  # stock messages handed to sockets
    coalesced: int = 0  # updates replaced by a newer one of the same burst, at the hub
    conflated: int = 0  # pending states replaced by a newer one before being sent
    stale: int = 0  # updates dropped at the hub as not newer than already forwarded
    overflows: int = 0  # updates dropped for a full buffer (and resynced later)
    slow_disconnects: int = 0
    redis_reconnects: int = 0
    gaps: int = 0  # version gaps detected on the stream
    resyncs: int = 0  # products re-read from the database


class SessionOwner(Protocol):
    """What a session needs from its hub."""

    stats: HubStats

    def resync(self, product_ids: Iterable[str]) -> None: ...

    def detach(self, session: Session) -> None: ...


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """Per-connection limits (built from :class:`realtime.hub.HubSettings`)."""

    buffer_capacity: int
    control_capacity: int
    close_timeout: float


def _resolve(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class Session:
    """Outbound state of one connection; writes directly or through its writer task."""

    __slots__ = (
        "_closed",
        "_control",
        "_owner",
        "_room",
        "_settings",
        "_stats",
        "_transport",
        "_writer",
        "blocked_since",
        "buffer",
    )

    def __init__(
        self, transport: Transport, owner: SessionOwner, settings: SessionSettings
    ) -> None:
        self._transport = transport
        self._owner = owner
        self._stats = owner.stats
        self._settings = settings
        self.buffer: ConflationBuffer[Outgoing] = ConflationBuffer(settings.buffer_capacity)
        # A plain list and an on-demand future rather than a deque and an Event: every
        # idle connection carries these, and the control FIFO holds a handful of messages.
        self._control: list[str] = []
        self._room: asyncio.Future[None] | None = None  # awaited by the reader when full
        self._closed = False
        self.blocked_since: float | None = None  # loop time a pending send started
        self._writer: asyncio.Task[None] | None = None  # exists only while backpressured

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, product_id: str, updates: Sequence[Update]) -> None:
        """Hand new states of rows of one product to this connection: written now when the
        socket takes them, else kept (conflated) for the writer. Never blocks, never grows
        past capacity.

        A single update for an idle, writable connection skips the buffer (the same
        stale check and version bookkeeping, no pending entry to add and pop, no batch
        to join): that is most deliveries."""
        buffer = self.buffer
        stats = self._stats
        if (
            len(updates) == 1  # the usual case: one row changed, socket writable, idle
            and self._writer is None
            and not self._control
            and not buffer.sendable
            and not self._closed
            and self._transport.ready()
        ):
            warehouse_id, version, message = updates[0]
            fresh = buffer.hand_out(product_id, warehouse_id, version)
            if fresh is not None:
                if fresh:
                    self._transport.write(message.frame)
                    stats.deliveries += 1
                return
        queued = False
        for warehouse_id, version, message in updates:
            outcome = buffer.offer(product_id, warehouse_id, version, message)
            if outcome is Offer.QUEUED:
                queued = True
            elif outcome is Offer.CONFLATED:
                stats.conflated += 1
            elif outcome is Offer.OVERFLOW:
                stats.overflows += 1
                queued = True
        if queued and self._writer is None:
            self._pump()

    def wake(self) -> None:
        """Send what became sendable (a product's held updates, after its snapshot)."""
        if self._writer is None:
            self._pump()

    async def send_control(self, message: str) -> None:
        """Queue a control message, waiting while the control FIFO is full."""
        while len(self._control) >= self._settings.control_capacity and not self._closed:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        if self._closed:
            raise SessionClosed
        self._control.append(message)
        if self._writer is None:
            self._pump()

    async def close(self, code: int, reason: str) -> None:
        """Stop writing and close the socket; aborts it when the close frame cannot go out."""
        if self._closed:
            return
        self._mark_closed()
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            await cancel_and_wait(writer)
        try:
            async with asyncio.timeout(self._settings.close_timeout):
                await self._transport.close(code, reason)
        except TimeoutError:
            self._transport.abort()
        except TransportClosed:
            pass

    def lost(self) -> None:
        """The connection ended under the session (the peer closed or vanished, seen by a
        transport that reads the socket itself): release it now, without writing."""
        self._mark_closed()
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()

    def _mark_closed(self) -> None:
        if not self._closed:
            self._closed = True
            _resolve(self._room)
            self._owner.detach(self)

    def _pump(self) -> None:
        """Write what is queued while the socket takes it; leave the rest to a writer task.

        Called only while no writer exists, and never awaits, so nothing can write in
        between. Runs on the hub's call: it must not raise and must not detach the
        session (a broken socket is found by the reader, or by the writer it starts).
        """
        if self._closed:
            return
        transport = self._transport
        buffer = self.buffer
        while self._control or buffer.sendable:
            if not transport.ready():
                self._writer = asyncio.get_running_loop().create_task(
                    self._write_loop(), name="realtime-session-writer"
                )
                return
            transport.write(self._take_frames())
        self._drained()

    def _take_frames(self) -> bytes:
        """Queued messages as frames, control messages first, about :data:`WRITE_BATCH`
        bytes at most (something must be queued)."""
        frames: list[bytes] = []
        size = 0
        control = self._control
        if control:
            while control and size < WRITE_BATCH:
                frame = text_frame(control.pop(0).encode())
                frames.append(frame)
                size += len(frame)
            _resolve(self._room)
        pop = self.buffer.pop
        count = 0
        while size < WRITE_BATCH and (message := pop()) is not None:
            frames.append(message.frame)
            size += len(message.frame)
            count += 1
        self._stats.deliveries += count
        return frames[0] if len(frames) == 1 else b"".join(frames)

    def _take_text(self) -> str:
        """The next queued message as text, control messages first (something is queued)."""
        if self._control:
            text = self._control.pop(0)
            _resolve(self._room)
            return text
        message = self.buffer.pop()
        assert message is not None
        self._stats.deliveries += 1
        return message.text

    def _drained(self) -> None:
        """Nothing is sendable: products that overflowed meanwhile are re-read (resync)."""
        if self.buffer.overflowed:
            self._owner.resync(self.buffer.take_overflow())

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        transport = self._transport
        buffer = self.buffer
        try:
            while self._control or buffer.sendable:
                if transport.ready():
                    transport.write(self._take_frames())
                    continue
                self.blocked_since = loop.time()
                if not await transport.wait_ready():
                    await transport.send_text(self._take_text())
                self.blocked_since = None
        except TransportClosed:
            self._mark_closed()
        except Exception:
            log.exception("websocket writer failed")
            self._mark_closed()
            self._transport.abort()
        else:
            self._drained()
        finally:
            self._writer = None
