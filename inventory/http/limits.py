"""Request-head limits at the protocol layer: uvicorn's httptools protocol with a cap.

SPEC "Security": request line plus headers at most 16 KiB (else 414 for the line, 431 for
the headers), with the connection's memory bounded while a client is still sending them.
uvicorn's httptools protocol has no such cap (h11 has ``h11_max_incomplete_event_size``,
httptools nothing): it appends URL pieces to ``self.url`` and httptools accumulates a
header's name and value until the header ends, so one endless line or header grows the
process by whatever the client sends.

:class:`LimitedHttpToolsProtocol` (installed by ``inventory serve`` as uvicorn's ``http``
class) counts while the head arrives:

- while it arrives, per chunk read from the socket: bytes received while a head is still
  incomplete after the parser consumed them. Past :data:`MAX_HEAD` the connection is
  answered 414 (when most of it is the URL) or 431 and closed. This bounds URLs and
  headers that never end (httptools buffers a header internally until it ends). The
  chunk in which the head began is not counted (part of it may be the previous pipelined
  request), so memory is bounded by :data:`MAX_HEAD` plus one read (at most 256 KiB with
  uvloop) per connection;
- exactly, when the head is complete: URL plus headers are summed, but only when what
  arrived since the head began could exceed the limit, so an ordinary request costs no
  per-header work (a per-header callback doubled the parser callbacks' cost). Past the
  limit the callback raises and the refusal replaces uvicorn's 400.

A head must also arrive in full within ``INVENTORY_HEADER_TIMEOUT`` seconds (default 30)
of its first byte, or of the connection opening: slowloris clients that dribble headers
(or never send one) are answered 408 (or simply closed when nothing arrived) instead of
holding a connection for ever. Between requests uvicorn's keep-alive timeout applies.

A refused connection gets its answer and a FIN, then its further input is read and
dropped for up to :data:`LINGER_SECONDS` or :data:`LINGER_BYTES` before the close: closing
with unread input would make the kernel reset the connection and could destroy the answer
before the client reads it (the "lingering close" of other HTTP servers).

The WebSocket handshake of ``/v1/ws`` is parsed by this same protocol before uvicorn hands
the connection to its WebSocket protocol, so the cap covers it too.

This module depends on uvicorn internals (the callback names and ``send_400_response``);
:func:`check_compatible` runs at import and fails loudly on a uvicorn that changed them,
and tests/test_hostile.py drives the class over real sockets.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..domain.model import InventoryError
from .errors import error_body

__all__ = [
    "LINGER_BYTES",
    "LINGER_SECONDS",
    "MAX_HEAD",
    "HeadTimeout",
    "HeadTooLarge",
    "LimitedHttpToolsProtocol",
    "UriTooLong",
    "check_compatible",
]

MAX_HEAD = 16 * 1024
"""Request line plus headers, in bytes (names, values and their separators)."""

LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
"""After a refusal, input is read and dropped for at most this long and this much."""


# The refusals' errors: answered by the protocol before there is a request, so no
# operation documents them (SPEC "Input limits" and the README do).


class HeadTimeout(InventoryError):
    code = "request_timeout"
    status = 408


class UriTooLong(InventoryError):
    code = "uri_too_long"
    status = 414


class HeadTooLarge(InventoryError):
    code = "request_header_fields_too_large"
    status = 431


_REFUSALS = {
    error.status: (reason, error(message, {"limit": MAX_HEAD}))
    for error, reason, message in (
        (HeadTimeout, "Request Timeout", "the request head did not arrive in time"),
        (UriTooLong, "URI Too Long", f"the request line exceeds {MAX_HEAD} bytes"),
        (
            HeadTooLarge,
            "Request Header Fields Too Large",
            f"the request line and headers exceed {MAX_HEAD} bytes",
        ),
    )
}

_OVERRIDDEN = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "send_400_response",
)


def check_compatible() -> None:
    """Raise ``RuntimeError`` unless uvicorn's protocol still has what this class hooks."""
    missing = [name for name in _OVERRIDDEN if not callable(getattr(HttpToolsProtocol, name, None))]
    params = inspect.signature(HttpToolsProtocol.__init__).parameters
    source = inspect.getsource(HttpToolsProtocol)
    if "self.url += url" not in source or "self.headers.append((name, value))" not in source:
        missing.append("url and headers kept in self.url and self.headers")
    if missing or "config" not in params or "server_state" not in params:
        raise RuntimeError(
            "inventory.http.limits: this uvicorn's HttpToolsProtocol changed "
            f"(missing {missing or 'constructor arguments'}); the request-head limit "
            "cannot be installed"
        )


check_compatible()


@functools.cache
def head_timeout() -> float:
    """``INVENTORY_HEADER_TIMEOUT`` of this process (read once)."""
    from ..config import Settings

    return Settings.from_env().header_timeout


class _Refused(Exception):
    """Raised inside a parser callback: the head is over the limit."""


def _refusal(status: int) -> bytes:
    reason, error = _REFUSALS[status]
    body = error_body(error)
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head limit and timeout (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False  # a request began and its headers are not complete yet
        self._began_now = False  # ... and it began in the chunk being parsed
        self._chunk = 0  # size of the chunk being parsed
        self._head_chunks = 0  # whole chunks received while the head stayed incomplete
        self._refused: int | None = None
        self._lingered = 0  # bytes dropped after a refusal
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:  # lingering after a refusal: dropped
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.close()
            return
        self._began_now = False
        self._chunk = len(data)
        super().data_received(data)  # a refusal in a callback arrives as send_400_response
        if self._in_head and self._refused is None and not self._began_now:
            self._head_chunks += len(data)
            if self._head_chunks > MAX_HEAD:
                # Mostly URL so far: the line is what does not end.
                self._refuse(414 if 2 * len(self.url) > self._head_chunks else 431)

    # Parser callbacks.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._began_now = True
        self._head_chunks = 0
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        # The head is within what arrived since it began: only a large one is measured.
        if self._head_chunks + self._chunk > MAX_HEAD:
            if len(self.url) > MAX_HEAD:
                self._refused = 414
            elif len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > MAX_HEAD:
                self._refused = 431
            if self._refused is not None:
                raise _Refused  # the parser stops; uvicorn calls send_400_response
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refused is not None:  # the parser stopped because a callback refused
            self._write_refusal()
        else:
            super().send_400_response(msg)

    # Internals.

    def _refuse(self, status: int) -> None:
        self._refused = status
        self._write_refusal()

    def _write_refusal(self) -> None:
        assert self._refused is not None
        self._cancel_head_timer()
        self.logger.info("refused a request head: HTTP %d", self._refused)
        if self.transport.is_closing():
            return
        self.transport.write(_refusal(self._refused))
        if self.transport.can_write_eof():
            # Closing with unread input makes the kernel send a reset, which can destroy
            # the answer before the client reads it. So: send it and a FIN, then keep
            # reading (and dropping) for a moment, bounded in time and bytes.
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(head_timeout(), self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self._in_head):
            return  # a request is being answered; keep-alive timing is uvicorn's
        if self._in_head:
            self._refuse(408)
        else:
            self.transport.close()  # connected and never sent a byte
