"""Request-head limits at the protocol layer: uvicorn's httptools protocol with a cap.

SPEC "Security": request line plus headers at most 16 KiB (else 414 for the line, 431 for
the headers), with the connection's memory bounded while a client is still sending them.
uvicorn's httptools protocol has no such cap (h11 has ``h11_max_incomplete_event_size``,
httptools nothing): it appends URL pieces to ``self.url`` and httptools accumulates a
header's name and value until the header ends, so one endless line or header grows the
process by whatever the client sends.

:class:`LimitedHttpToolsProtocol` (installed by ``inventory serve`` as uvicorn's ``http``
class) counts while the head arrives:

- precisely, in the parser callbacks: URL pieces (``on_url`` is called for every piece
  that arrived, not only at the end of the line) and every completed header; past
  :data:`MAX_HEAD` the callback raises, and the refusal replaces uvicorn's 400;
- coarsely, per chunk read from the socket: bytes received while a head is still
  incomplete after the parser consumed them. This bounds a single header that never ends
  (httptools buffers it internally, out of the callbacks' sight). The chunk in which the
  head began is not counted (part of it may be the previous pipelined request), so the
  bound is :data:`MAX_HEAD` plus one read (at most 256 KiB with uvloop) per connection.

A head must also arrive in full within ``INVENTORY_HEADER_TIMEOUT`` seconds (default 30)
of its first byte, or of the connection opening: slowloris clients that dribble headers
(or never send one) are answered 408 (or simply closed when nothing arrived) instead of
holding a connection for ever. Between requests uvicorn's keep-alive timeout applies.

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

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["MAX_HEAD", "LimitedHttpToolsProtocol", "check_compatible"]

MAX_HEAD = 16 * 1024
"""Request line plus headers, in bytes (names, values and their separators)."""

_REASONS = {
    408: ("Request Timeout", "request_timeout", "the request head did not arrive in time"),
    414: ("URI Too Long", "uri_too_long", f"the request line exceeds {MAX_HEAD} bytes"),
    431: (
        "Request Header Fields Too Large",
        "request_header_fields_too_large",
        f"the request line and headers exceed {MAX_HEAD} bytes",
    ),
}

_OVERRIDDEN = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "send_400_response",
)


def check_compatible() -> None:
    """Raise ``RuntimeError`` unless uvicorn's protocol still has what this class hooks."""
    missing = [name for name in _OVERRIDDEN if not callable(getattr(HttpToolsProtocol, name, None))]
    params = inspect.signature(HttpToolsProtocol.__init__).parameters
    if missing or "config" not in params or "server_state" not in params:
        raise RuntimeError(
            "inventory.http_limits: this uvicorn's HttpToolsProtocol changed "
            f"(missing {missing or 'constructor arguments'}); the request-head limit "
            "cannot be installed"
        )


check_compatible()


@functools.cache
def head_timeout() -> float:
    """``INVENTORY_HEADER_TIMEOUT`` of this process (read once)."""
    from .config import Settings

    return Settings.from_env().header_timeout


class _Refused(Exception):
    """Raised inside a parser callback: the head is over the limit."""


def _refusal(status: int) -> bytes:
    reason, code, message = _REASONS[status]
    body = msgspec.json.encode(
        {"error": {"code": code, "message": message, "details": {"limit": MAX_HEAD}}}
    )
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
        self._head_bytes = 0  # counted in the callbacks
        self._head_chunks = 0  # whole chunks received while the head stayed incomplete
        self._refused: int | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return
        self._began_now = False
        super().data_received(data)  # a refusal in a callback arrives as send_400_response
        if self._in_head and self._refused is None and not self._began_now:
            self._head_chunks += len(data)
            if self._head_chunks > MAX_HEAD:
                self._refuse(431)

    # Parser callbacks.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._began_now = True
        self._head_bytes = self._head_chunks = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url), 414)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 431)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._refused is not None:  # the parser stopped because a callback refused
            self._write_refusal()
        else:
            super().send_400_response(msg)

    # Internals.

    def _count(self, n: int, status: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD:
            self._refused = status if not self.headers else 431
            raise _Refused

    def _refuse(self, status: int) -> None:
        self._refused = status
        self._write_refusal()

    def _write_refusal(self) -> None:
        assert self._refused is not None
        self._cancel_head_timer()
        self.logger.info("refused a request head: HTTP %d", self._refused)
        if not self.transport.is_closing():
            self.transport.write(_refusal(self._refused))
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
