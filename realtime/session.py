"""One WebSocket connection's outbound side: a single writer task and bounded queues.

Policy (backpressure and limits):

* Exactly one task writes to the socket, so frames are never interleaved and a slow
  client never blocks the hub: the hub only :meth:`Session.offer`\\ s updates into the
  connection's :class:`~realtime.conflation.ConflationBuffer` (bounded, newest state per
  row) and wakes the writer.
* Control messages (snapshot, subscribed, unsubscribed, pong, error) go through a small
  FIFO of ``control_capacity`` messages that is always sent before stock updates. They are
  answers to the client's own requests, so when the FIFO is full the *reader* waits
  (:meth:`Session.send_control`): a client that sends without reading is throttled
  instead of growing a queue.
* A send that has not completed after ``send_timeout`` seconds means the client has not
  read for that long (the transport only blocks when its buffer is full). The hub's reaper
  then closes it with :data:`SLOW_CONSUMER_CLOSE` and, because a blocked socket cannot
  take a close frame either, aborts the transport if the close does not go out within
  ``close_timeout``. Timing a send with a per-send timer would cost more than the send
  itself on the fan-out path, hence the periodic reaper reading :attr:`blocked_since`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from realtime.conflation import ConflationBuffer, Offer

__all__ = [
    "SLOW_CONSUMER_CLOSE",
    "HubStats",
    "Session",
    "SessionClosed",
    "SessionOwner",
    "SessionSettings",
    "Transport",
    "TransportClosed",
]

log = logging.getLogger("realtime.session")

SLOW_CONSUMER_CLOSE = 4008


class TransportClosed(Exception):
    """The peer is gone; raised by :class:`Transport` methods."""


class SessionClosed(Exception):
    """The session has been closed; nothing more can be queued."""


class Transport(Protocol):
    """The socket as the session sees it (adapted from Starlette in :mod:`realtime.ws`)."""

    async def send_text(self, text: str) -> None: ...

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
    messages: int = 0  # updates received from Redis
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
    """Outbound state and writer task of one connection."""

    __slots__ = (
        "_closed",
        "_control",
        "_idle",
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
        self.buffer = ConflationBuffer(settings.buffer_capacity)
        # Plain lists and on-demand futures rather than deques and Events: every idle
        # connection carries these, and the control FIFO holds a handful of messages.
        self._control: list[str] = []
        self._idle: asyncio.Future[None] | None = None  # awaited by the writer when idle
        self._room: asyncio.Future[None] | None = None  # awaited by the reader when full
        self._closed = False
        self.blocked_since: float | None = None  # loop time a pending send started
        self._writer: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="realtime-session-writer")

    def offer(self, product_id: str, warehouse_id: str, version: int, message: str) -> None:
        """Hand an update to this connection (never blocks, never grows past capacity)."""
        outcome = self.buffer.offer(product_id, warehouse_id, version, message)
        if outcome is Offer.QUEUED:
            self.wake()
        elif outcome is Offer.CONFLATED:
            self._stats.conflated += 1
        elif outcome is Offer.OVERFLOW:
            self._stats.overflows += 1
            self.wake()

    def wake(self) -> None:
        """Let the writer look for work again."""
        _resolve(self._idle)

    async def send_control(self, message: str) -> None:
        """Queue a control message, waiting while the control FIFO is full."""
        while len(self._control) >= self._settings.control_capacity and not self._closed:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        if self._closed:
            raise SessionClosed
        self._control.append(message)
        self.wake()

    async def close(self, code: int, reason: str) -> None:
        """Stop writing and close the socket; aborts it when the close frame cannot go out."""
        if self._closed:
            return
        self._mark_closed()
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
        try:
            async with asyncio.timeout(self._settings.close_timeout):
                await self._transport.close(code, reason)
        except TimeoutError:
            self._transport.abort()
        except TransportClosed:
            pass

    def _mark_closed(self) -> None:
        if not self._closed:
            self._closed = True
            _resolve(self._room)
            self._owner.detach(self)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        control = self._control
        buffer = self.buffer
        stats = self._stats
        send = self._transport.send_text
        try:
            while True:
                if control:
                    message = control.pop(0)
                    _resolve(self._room)
                else:
                    update = buffer.pop()
                    if update is None:
                        overflowed = buffer.take_overflow()
                        if overflowed:
                            self._owner.resync(overflowed)
                        self._idle = loop.create_future()
                        await self._idle
                        continue
                    message = update
                    stats.deliveries += 1
                self.blocked_since = loop.time()
                await send(message)
                self.blocked_since = None
        except TransportClosed:
            self._mark_closed()
        except Exception:
            log.exception("websocket writer failed")
            self._mark_closed()
            self._transport.abort()
