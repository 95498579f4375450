"""The WebSocket endpoint (``/v1/ws``): handshake, reader loop, transport adapters.

The endpoint is a plain ASGI application mounted by a Starlette ``WebSocketRoute``.
Given an ASGI callable rather than a ``func(websocket)``, Starlette passes the
connection's ``receive``/``send`` through without its per-connection ``WebSocket`` object
and exception-handling wrapper: about 1.5 KiB less per open connection, and one layer less
on every send. A Starlette ``WebSocket`` is built only for the handshake, so that
``authenticate`` can read headers and send a denial response.

The endpoint task is the connection's *reader*: it parses one client message at a time
and runs it to completion (a subscribe awaits its snapshot) before reading the next, so
commands of one connection are applied in order and a client that floods commands is
throttled by TCP instead of queued. Everything outbound goes through the connection's
:class:`~realtime.session.Session`.

Transports: on uvicorn's ``websockets-sansio`` protocol (what ``inventory serve`` runs)
the session writes pre-encoded frames straight to the connection's asyncio transport
(:class:`_SansIOTransport`): that protocol keeps no per-frame state for outgoing data
frames without extensions, flushes its own output (pongs, closes) synchronously, and
signals backpressure through its ``writable`` event, so a whole frame written while the
connection is open and writable is exactly what its own ``send`` would write. Anywhere
else (another server or WebSocket implementation, or an ASGI middleware that wraps
``receive``) every message goes through the ASGI ``send`` (:class:`AsgiTransport`),
correct but slower.

Bad input never closes the connection: malformed JSON, unknown ops, bad ids and binary
frames are answered with an ``error`` message. The exception is a frame above
:data:`~realtime.protocol.MAX_FRAME_BYTES`, closed with 1009 (uvicorn does this itself
when run with ``ws_max_size=65536``; the check here covers other settings).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.routing import WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from realtime.hub import Hub, HubFull
from realtime.protocol import (
    MAX_FRAME_BYTES,
    ErrorCode,
    ProtocolError,
    encode_error,
    parse_command,
)
from realtime.session import Session, SessionClosed, Transport, TransportClosed

__all__ = ["AsgiTransport", "Authenticate", "capacity_refusal", "refusal", "websocket_route"]

Authenticate = Callable[[HTTPConnection], Awaitable[Response | None]]
"""Called before a stream handshake (WebSocket or SSE) is accepted; a returned response
denies it (401/403/503)."""


def refusal(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """A handshake denial in the API's error shape ``{"error": {code, message, details}}``."""
    body = orjson.dumps({"error": {"code": code, "message": message, "details": None}})
    return Response(body, status, headers, media_type="application/json")


def capacity_refusal(hub: Hub) -> Response:
    """503 for a handshake past the process's connection cap (WebSocket and SSE)."""
    return refusal(
        503,
        "too_many_connections",
        f"this server process holds its maximum of {hub.settings.max_connections} stream "
        "connections; retry later or elsewhere",
        {"Retry-After": "1"},
    )


MESSAGE_TOO_BIG_CLOSE = 1009


class AsgiTransport:
    """:class:`realtime.session.Transport` over the ASGI ``send``: no direct writes."""

    __slots__ = ("_receive", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send

    def ready(self) -> bool:
        return False

    def write(self, frames: bytes) -> None:
        raise RuntimeError("this transport has no direct writes")

    async def wait_ready(self) -> bool:
        return False

    async def send_text(self, text: str) -> None:
        try:
            await self._send({"type": "websocket.send", "text": text})
        except (RuntimeError, OSError) as exc:  # uvicorn: ClientDisconnected is an OSError
            raise TransportClosed from exc

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except (RuntimeError, OSError) as exc:
            raise TransportClosed from exc

    def abort(self) -> None:
        # ASGI has no abort. When the server's receive callable is a method of its protocol
        # object holding an asyncio transport (uvicorn's websocket protocols), drop the TCP
        # connection; otherwise the socket lingers until the peer goes away, with only the
        # server's bounded write buffer held (the session itself is already released).
        protocol = getattr(self._receive, "__self__", None)
        abort = getattr(getattr(protocol, "transport", None), "abort", None)
        if callable(abort):  # uvloop's transports do not subclass asyncio.Transport
            abort()


class _SansIOTransport(AsgiTransport):
    """Direct frame writes on uvicorn's websockets-sansio protocol (see the module doc)."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: WebSocketsSansIOProtocol, receive: Receive, send: Send) -> None:
        super().__init__(receive, send)
        self._protocol = protocol

    def ready(self) -> bool:
        protocol = self._protocol
        return (
            protocol.writable.is_set()
            and not protocol.disconnected
            and protocol.conn.state is State.OPEN  # no close sent or received
        )

    async def wait_ready(self) -> bool:
        protocol = self._protocol
        await protocol.writable.wait()  # set again by resume_writing, or on connection loss
        if protocol.disconnected:
            raise TransportClosed
        return self.ready()  # false once closing: then the ASGI send reports it

    def write(self, frames: bytes) -> None:
        # Runs inside the hub's fan-out loop, so it must not raise; a transport closing
        # under us is a connection the reader is about to see disconnected. (try/except,
        # not contextlib.suppress: this is the per-delivery path, and it costs nothing.)
        try:  # noqa: SIM105
            self._protocol.transport.write(frames)
        except (RuntimeError, OSError):
            pass

    def abort(self) -> None:
        self._protocol.transport.abort()


def _transport(receive: Receive, send: Send) -> Transport:
    """The fastest transport that is correct for this connection (after the handshake)."""
    protocol: Any = getattr(receive, "__self__", None)
    if (
        isinstance(protocol, WebSocketsSansIOProtocol)
        and all(hasattr(protocol, a) for a in ("writable", "disconnected", "conn", "transport"))
        and not protocol.conn.extensions  # frames are sent as built, uncompressed
    ):
        return _SansIOTransport(protocol, receive, send)
    return AsgiTransport(receive, send)


def _frame_too_big(text: str) -> bool:
    # UTF-8 takes at most 4 bytes per character: only long texts need encoding to check.
    return len(text) > MAX_FRAME_BYTES // 4 and len(text.encode()) > MAX_FRAME_BYTES


async def _read_loop(hub: Hub, session: Session, receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return  # websocket.disconnect
        text = message.get("text")
        if text is None:
            data = message.get("bytes") or b""
            if len(data) > MAX_FRAME_BYTES:
                await session.close(MESSAGE_TOO_BIG_CLOSE, "message too big")
                return
            await session.send_control(
                encode_error(ErrorCode.UNSUPPORTED_FRAME, "binary frames are not supported")
            )
            continue
        if _frame_too_big(text):
            await session.close(MESSAGE_TOO_BIG_CLOSE, "message too big")
            return
        try:
            await hub.execute(session, parse_command(text))
        except ProtocolError as error:
            await session.send_control(encode_error(error.code, error.message))


class _Endpoint:
    """The route's ASGI application: one call per connection."""

    __slots__ = ("_authenticate", "_hub")

    def __init__(self, hub: Hub | Callable[[], Hub], authenticate: Authenticate | None) -> None:
        self._hub = hub
        self._authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self._hub if isinstance(self._hub, Hub) else self._hub()
        session = await self._admit(hub, scope, receive, send)
        if session is None:
            return
        try:
            await send({"type": "websocket.accept"})
            await _read_loop(hub, session, receive)
        except SessionClosed:
            pass
        finally:
            await session.close(1000, "")

    async def _admit(self, hub: Hub, scope: Scope, receive: Receive, send: Send) -> Session | None:
        """The connection's session, counted before the accept (so no handshake slips
        past the cap meanwhile), or ``None`` after denying the handshake. The Starlette
        ``WebSocket`` lives only here, not for the whole connection."""
        if (await receive())["type"] != "websocket.connect":
            return None  # gone before the handshake
        websocket = WebSocket(scope, receive, send)
        denial = None
        if hub.full:  # before the credentials: a refused client keeps its ticket
            denial = capacity_refusal(hub)
        elif self._authenticate is not None:
            denial = await self._authenticate(websocket)
        if denial is None:
            try:
                return hub.open(_transport(receive, send))
            except HubFull:
                denial = capacity_refusal(hub)
        await websocket.send_denial_response(denial)
        return None


def websocket_route(
    hub: Hub | Callable[[], Hub],
    authenticate: Authenticate | None = None,
    *,
    path: str = "/v1/ws",
) -> WebSocketRoute:
    """The route to mount in the application (``Starlette(routes=[..., route])``).

    ``hub`` may be a zero-argument callable returning the hub, for apps that create it in
    their lifespan (after the routes).
    """
    return WebSocketRoute(path, _Endpoint(hub, authenticate), name="stock_websocket")
