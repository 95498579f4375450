"""An accepted WebSocket connection served without the ASGI server's per-connection objects.

Memory policy: an idle subscriber is what a server holds most of (SPEC: thousands per
process, mostly idle), so after the handshake a connection is one :class:`WsConnection`
(an ``asyncio.Protocol`` with slots) besides the event loop's socket transport and its
:class:`~realtime.session.Session`: no task, queue, event, scope, header list or parser
generator of its own while it is idle. A server's generic WebSocket protocol keeps all of
those for the connection's lifetime: measured with ``bench/fanout.py --scenario memory``
at 5,000 idle connections with 10 subscriptions each, 27.2 KiB per connection on
uvicorn's protocol, 8.0 KiB here. The handshake itself stays on the ASGI path
(authentication, origin guards, middleware, logging); :mod:`realtime.handoff` then moves
the socket here.

The object plays three roles:

* **Frame parser** for client frames (RFC 6455 section 5), in :meth:`data_received`:
  masking required, no RSV bits (no extension is ever negotiated), control frames final
  and at most 125 bytes, continuation frames only inside a fragmented message. A
  violation closes with 1002; a message over :data:`~realtime.protocol.MAX_FRAME_BYTES`
  closes with 1009, decided from the frame header before its payload is buffered; text
  that is not UTF-8 closes with 1007. Pings are answered at once, pongs end the
  keepalive deadline.
* **Reader**: complete messages go to an inbox run by a command task that exists only
  while there is something to run; commands of one connection are applied in order,
  each to completion (a subscribe awaits its snapshot) before the next. While the inbox
  is not empty the socket is not read, so a client that floods commands is throttled by
  TCP instead of queued (as uvicorn does for an ASGI application that is not reading).
  Bad messages are answered with an ``error`` message and the connection stays open.
* **Transport** of the session (:class:`~realtime.session.Transport`): whole frames are
  written straight to the socket while it takes them (:meth:`ready`); backpressure is
  the socket transport's ``pause_writing``/``resume_writing``.

Keepalive: a ping every ``ping_interval`` seconds, closed with 1011 when its pong has not
arrived ``ping_timeout`` seconds later (the server's configuration, uvicorn's defaults
20 s / 20 s): a peer that vanished without a FIN is dropped and its session released.

Closing: :meth:`close` sends the close frame and waits until the socket took it (the
session aborts a close that cannot go out within its ``close_timeout``) and closes the
socket when the peer's close arrives, or aborts it ``CLOSE_WAIT`` seconds later. A close
from the peer is answered with the same code and the socket dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from typing import TYPE_CHECKING

from websockets.exceptions import ProtocolError as FrameError
from websockets.frames import Close
from websockets.utils import apply_mask

from realtime.protocol import (
    MAX_FRAME_BYTES,
    ErrorCode,
    ProtocolError,
    encode_error,
    parse_command,
    text_frame,
)
from realtime.session import Session, SessionClosed, TransportClosed

if TYPE_CHECKING:
    from realtime.hub import Hub

__all__ = ["CLOSE_WAIT", "WsConnection"]

log = logging.getLogger("realtime.wsconn")

CLOSE_WAIT = 10.0  # seconds to wait for the peer's close frame after sending ours
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011  # also: keepalive ping timeout

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10
_BINARY = b""  # inbox marker: a binary message (its content is never needed)


def _frame(opcode: int, payload: bytes) -> bytes:
    """A final, unmasked server frame with a payload of at most 125 bytes (control)."""
    return bytes((0x80 | opcode, len(payload))) + payload


def _close_frame(code: int, reason: str) -> bytes:
    """A close frame; the reason is cut to fit a control frame (123 bytes)."""
    reason = reason.encode()[:123].decode(errors="ignore")
    return _frame(_OP_CLOSE, Close(code, reason).serialize())


class WsConnection(asyncio.Protocol):
    """One open WebSocket after the handshake (see the module docstring)."""

    __slots__ = (
        "_buffer",
        "_close_timer",
        "_closing",
        "_fragments",
        "_hub",
        "_inbox",
        "_lost",
        "_ping_interval",
        "_ping_payload",
        "_ping_timeout",
        "_ping_timer",
        "_reading_paused",
        "_runner",
        "_transport",
        "_writable",
        "_write_paused",
        "session",
    )

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self.session: Session | None = None  # set by the endpoint once admitted
        self._transport: asyncio.Transport | None = None  # set by attach()
        self._ping_interval: float | None = None
        self._ping_timeout: float | None = None
        self._buffer: bytes | bytearray = b""  # an incomplete frame
        self._fragments: list[bytes] | None = None  # data of a fragmented message so far
        self._inbox: deque[str | bytes] | None = None  # messages not run yet
        self._runner: asyncio.Task[None] | None = None  # exists while the inbox is not empty
        self._reading_paused = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None  # awaited while write-paused
        # A close frame was sent or received (or the socket is not attached yet): no more
        # data frames.
        self._closing = True
        self._lost = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None  # of the ping awaiting its pong

    # taking over the socket

    def attach(
        self,
        transport: asyncio.Transport,
        *,
        messages: list[str | bytes] = [],  # noqa: B006 (never mutated)
        pending: bytes = b"",
        ping_interval: float | None = None,
        ping_timeout: float | None = None,
    ) -> None:
        """Become the socket's protocol, just after the 101 response was written.

        ``messages``: complete messages the server had already read (text, or bytes for a
        binary message); ``pending``: bytes it had read but not parsed. A client may send
        neither before it has the 101 (RFC 6455 section 4.1); they are handled anyway.
        """
        self._transport = transport
        self._closing = False
        self._ping_interval, self._ping_timeout = ping_interval, ping_timeout
        transport.set_protocol(self)
        self._schedule_ping()
        for message in messages:
            self._on_message(message)
        if pending:
            self.data_received(pending)

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            self._buffer += data
            data = self._buffer  # type: ignore[assignment]
        size = len(data)
        pos = 0
        while size - pos >= 2:
            first, second = data[pos], data[pos + 1]
            if first & 0x70 or not second & 0x80:
                return self._fail(PROTOCOL_ERROR, "reserved bits set or frame not masked")
            opcode = first & 0x0F
            length = second & 0x7F
            header = 6  # 2 bytes, then the 4-byte mask
            if length == 126:
                header = 8
            elif length == 127:
                header = 14
            if size - pos < header:
                break
            if header == 8:
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            elif header == 14:
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
            if opcode >= _OP_CLOSE:
                if opcode > _OP_PONG or not first & 0x80 or length > 125:
                    return self._fail(PROTOCOL_ERROR, "bad control frame")
            elif opcode > _OP_BINARY:
                return self._fail(PROTOCOL_ERROR, "reserved opcode")
            elif length > MAX_FRAME_BYTES or (
                self._fragments is not None
                and length + sum(map(len, self._fragments)) - 1 > MAX_FRAME_BYTES
            ):  # (the first fragment entry is the opcode byte)
                return self._fail(MESSAGE_TOO_BIG, "message too big")
            end = pos + header + length
            if end > size:
                break
            mask = data[pos + header - 4 : pos + header]
            payload = apply_mask(data[pos + header : end], mask) if length else b""
            pos = end
            if not self._frame_received(first & 0x80, opcode, payload):
                return None
        self._buffer = bytearray(data[pos:]) if pos < size else b""
        return None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    def eof_received(self) -> bool:
        return False  # close the socket

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._closing = True
        self._buffer, self._fragments = b"", None
        for timer in (self._ping_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._close_timer = None
        self._wake_writer()
        if self.session is not None:
            self.session.lost()

    # frames and messages

    def _frame_received(self, fin: int, opcode: int, payload: bytes) -> bool:
        """Handle one complete frame; false when the connection is being dropped."""
        if opcode == _OP_PING:
            if not self._closing and self._transport is not None:
                self._transport.write(_frame(_OP_PONG, payload))
            return True
        if opcode == _OP_PONG:
            if self._ping_payload is not None and payload == self._ping_payload:
                self._ping_payload = None
                self._schedule_ping()
            return True
        if opcode == _OP_CLOSE:
            return self._close_received(payload)
        fragments = self._fragments
        if (opcode == _OP_CONT) != (fragments is not None):
            self._fail(PROTOCOL_ERROR, "unexpected or missing continuation frame")
            return False
        if not fin:
            if fragments is None:
                self._fragments = [bytes((opcode,)), payload]  # the opcode goes first
            else:
                fragments.append(payload)
            return True
        if fragments is not None:
            opcode = fragments[0][0]
            payload = b"".join(fragments[1:]) + payload
            self._fragments = None
        if opcode == _OP_BINARY:
            self._on_message(_BINARY)
            return True
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            self._fail(INVALID_DATA, "invalid UTF-8")
            return False
        self._on_message(text)
        return True

    def _close_received(self, payload: bytes) -> bool:
        try:
            close = Close.parse(payload)
        except UnicodeDecodeError:
            self._fail(INVALID_DATA, "invalid UTF-8 in the close reason")
            return False
        except FrameError:  # a bad code or a 1-byte payload
            self._fail(PROTOCOL_ERROR, "bad close frame")
            return False
        assert self._transport is not None
        if not self._closing:  # echo the code (RFC 6455 5.5.1); 1005 means none was given
            self._closing = True
            echo = Close(close.code, "").serialize() if close.code != 1005 else b""
            self._transport.write(_frame(_OP_CLOSE, echo))
        self._transport.close()
        if self.session is not None:
            self.session.lost()
        return False

    def _fail(self, code: int, reason: str) -> None:
        """Close for a protocol violation and drop the socket (the peer gets no more)."""
        if self._transport is None or self._lost:
            return
        if not self._closing:
            self._closing = True
            self._transport.write(_close_frame(code, reason))
        self._buffer = b""
        self._transport.close()
        if self.session is not None:
            self.session.lost()

    def _on_message(self, message: str | bytes) -> None:
        if self._closing:
            return
        inbox = self._inbox
        if inbox is None:
            inbox = self._inbox = deque()
        inbox.append(message)
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(
                self._run_commands(), name="realtime-ws-commands"
            )
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    async def _run_commands(self) -> None:
        """Run the inbox in order, each message to completion (see the module doc)."""
        hub = self._hub
        session = self.session
        inbox = self._inbox
        assert session is not None
        assert inbox is not None
        try:
            while inbox:
                message = inbox.popleft()
                try:
                    if isinstance(message, bytes):
                        raise ProtocolError(
                            ErrorCode.UNSUPPORTED_FRAME, "binary frames are not supported"
                        )
                    await hub.execute(session, parse_command(message))
                except ProtocolError as error:
                    await session.send_control(encode_error(error.code, error.message))
        except SessionClosed:
            pass
        except Exception:
            log.exception("websocket command failed")
            await session.close(INTERNAL_ERROR, "internal error")
        finally:
            self._runner = None
            self._inbox = None
            if self._reading_paused and not self._lost:
                self._reading_paused = False
                assert self._transport is not None
                self._transport.resume_reading()

    # keepalive

    def _schedule_ping(self) -> None:
        if self._ping_interval and not self._closing:
            loop = asyncio.get_running_loop()
            self._ping_timer = loop.call_later(self._ping_interval, self._send_ping)

    def _send_ping(self) -> None:
        self._ping_timer = None
        if self._closing or self._transport is None:
            return
        self._ping_payload = payload = os.urandom(4)
        self._transport.write(_frame(_OP_PING, payload))
        if self._ping_timeout:
            loop = asyncio.get_running_loop()
            self._ping_timer = loop.call_later(self._ping_timeout, self._ping_timed_out)
        else:
            self._schedule_ping()

    def _ping_timed_out(self) -> None:
        self._ping_timer = None
        if self._ping_payload is not None:
            self._fail(INTERNAL_ERROR, "keepalive ping timeout")

    # the session's transport

    def ready(self) -> bool:
        return not self._write_paused and not self._closing

    def write(self, frames: bytes) -> None:
        # Runs inside the hub's fan-out loop: must not raise (try/except, not
        # contextlib.suppress: this is the per-delivery path, and it costs nothing).
        try:  # noqa: SIM105
            self._transport.write(frames)  # type: ignore[union-attr]
        except (RuntimeError, OSError):
            pass

    async def wait_ready(self) -> bool:
        if self._write_paused and not self._lost:
            if self._writable is None:
                self._writable = asyncio.get_running_loop().create_future()
            await self._writable
        if self._lost:
            raise TransportClosed
        return self.ready()

    def _wake_writer(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send_text(self, text: str) -> None:
        if not await self.wait_ready():
            raise TransportClosed  # closing: no more data frames
        self.write(text_frame(text.encode()))

    async def close(self, code: int, reason: str) -> None:
        """Send the close frame and wait until the socket took it (the session times this
        out, then aborts); the socket is closed when the peer answers, aborted after
        :data:`CLOSE_WAIT` seconds without an answer."""
        if self._closing or self._transport is None:
            raise TransportClosed
        self._closing = True
        transport = self._transport
        transport.write(_close_frame(code, reason))
        if self._reading_paused:  # read the peer's close frame
            self._reading_paused = False
            transport.resume_reading()
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_WAIT, transport.abort)
        # Gone out once the socket took it. The transport signals only crossing its
        # high-water mark, so poll: this is the close path, not the delivery path.
        while transport.get_write_buffer_size() and not self._lost:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
