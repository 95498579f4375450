"""The one place that touches uvicorn's private WebSocket protocol: moving a connection off it.

Why (measured, ``bench/fanout.py``; README "Measured performance"): a handed-off idle connection
costs 8.0 KiB against 27.2 KiB on uvicorn's protocol object with its suspended ASGI task
(5,000 connections x 10 subscriptions), and a delivery is one socket write on the hub's
call, with no task switch and no ASGI send layers, which measured about as costly as the
write itself. No public API gives either: ASGI has no way to release a connection's
per-connection objects or to write a pre-built frame.

After the handshake (accepted through ASGI, so authentication, origin guards and
middleware apply as to any route), :func:`hand_off` makes a
:class:`~realtime.wsconn.WsConnection` the socket's protocol and retires uvicorn's
``WebSocketsSansIOProtocol`` object: its keepalive timers stop, it leaves uvicorn's
connection set (so uvicorn's graceful shutdown does not send its own 1012: the hub closes
every stream with 1001 in the lifespan shutdown), and its socket reference is replaced by
an inert stand-in, so that its ASGI task, returning right after, closes nothing. The
protocol object, its queue, scope, task and websockets parser are then freed.

This depends on attributes and behaviour of uvicorn's ``websockets-sansio``
implementation that are not public API (tested with uvicorn 0.54; ``pyproject.toml`` pins
``uvicorn<0.55``). :func:`check_compatible` verifies them and raises at import, so an
incompatible upgrade fails loudly at startup and in tests/test_realtime_wsconn.py instead of
silently serving every connection on the slow path. Anything that is not this protocol
(another server, or a middleware that wraps ``receive``) is served through plain ASGI
(:class:`realtime.ws.AsgiTransport`).
"""

from __future__ import annotations

import inspect
from typing import Any

from websockets.protocol import Protocol

from realtime.wsconn import WsConnection

_UPGRADE = "review realtime/handoff.py before upgrading uvicorn (pyproject.toml pins it)"
try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError as exc:  # moved or renamed: say so rather than fail at some import
    raise RuntimeError(
        f"realtime.handoff: uvicorn has no WebSocketsSansIOProtocol any more ({exc}); {_UPGRADE}"
    ) from exc

__all__ = ["abort_connection", "check_compatible", "hand_off", "sansio_protocol"]

_ATTRIBUTES = (
    "transport",
    "conn",
    "connections",
    "queue",
    "read_paused",
    "handshake_complete",
    "close_sent",
    "disconnected",
    "close_timer",
    "ping_interval",
    "ping_timeout",
)
_METHODS = ("stop_keepalive", "receive", "send", "run_asgi")


def check_compatible() -> None:
    """Raise ``RuntimeError`` unless uvicorn's protocol still has what :func:`hand_off` uses
    (attributes assigned in its source, methods, and the task ending in ``transport.close``
    only when no close timer runs)."""
    source = inspect.getsource(WebSocketsSansIOProtocol)
    missing = [a for a in _ATTRIBUTES if f"self.{a} " not in source and f"self.{a}:" not in source]
    missing += [m for m in _METHODS if not callable(getattr(WebSocketsSansIOProtocol, m, None))]
    run_asgi = inspect.getsource(WebSocketsSansIOProtocol.run_asgi)
    if "self.transport.close()" not in run_asgi:
        missing.append("run_asgi closing self.transport")
    if "self.reader " not in inspect.getsource(Protocol.__init__):
        missing.append("websockets Protocol.reader")
    if missing:
        raise RuntimeError(
            "realtime.handoff: uvicorn's WebSocketsSansIOProtocol changed (missing: "
            f"{', '.join(missing)}); {_UPGRADE}"
        )


check_compatible()


class _Released:
    """Stands in for the socket in the retired uvicorn protocol: every call is a no-op."""

    __slots__ = ()

    def is_closing(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return _ignore


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


_RELEASED = _Released()


def sansio_protocol(receive: Any) -> WebSocketsSansIOProtocol | None:
    """uvicorn's protocol object behind an ASGI ``receive``, if the connection can be
    handed off (no extension negotiated: frames are sent as built)."""
    protocol = getattr(receive, "__self__", None)
    if isinstance(protocol, WebSocketsSansIOProtocol) and not protocol.conn.extensions:
        return protocol
    return None


def hand_off(protocol: WebSocketsSansIOProtocol, connection: WsConnection) -> bool:
    """Move the socket from ``protocol`` to ``connection``, just after the ASGI accept
    (which wrote the 101). False when the peer is already gone: nothing was moved."""
    transport = protocol.transport
    if (
        protocol.disconnected
        or protocol.close_sent
        or not protocol.handshake_complete
        or transport.is_closing()
    ):
        return False
    messages: list[str | bytes] = []
    while not protocol.queue.empty():
        event: Any = protocol.queue.get_nowait()
        if event["type"] == "websocket.receive":
            text = event.get("text")
            messages.append(text if text is not None else b"")
    pending = bytes(protocol.conn.reader.buffer)
    protocol.stop_keepalive()
    protocol.connections.discard(protocol)
    protocol.transport = _RELEASED  # type: ignore[assignment]
    if protocol.read_paused:
        protocol.read_paused = False
        transport.resume_reading()
    connection.attach(
        transport,
        messages=messages,
        pending=pending,
        ping_interval=protocol.ping_interval,
        ping_timeout=protocol.ping_timeout,
    )
    return True


def abort_connection(receive: Any) -> None:
    """Drop the TCP connection behind an ASGI ``receive`` (ASGI has no abort): on uvicorn's
    WebSocket protocols ``receive`` is a method of the protocol object, which holds the
    asyncio transport. Does nothing on a server built otherwise."""
    protocol = getattr(receive, "__self__", None)
    abort = getattr(getattr(protocol, "transport", None), "abort", None)
    if callable(abort):  # uvloop's transports do not subclass asyncio.Transport
        abort()
