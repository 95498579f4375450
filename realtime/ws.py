"""The WebSocket endpoint (``/v1/ws``): handshake, reader loop, transport adapters.

The endpoint is a plain ASGI application mounted by a Starlette ``WebSocketRoute``.
Given an ASGI callable rather than a ``func(websocket)``, Starlette passes the
connection's ``receive``/``send`` through without its per-connection ``WebSocket`` object
and exception-handling wrapper: about 1.5 KiB less per open connection, and one layer less
on every send. A Starlette ``WebSocket`` is built only for the handshake, so that
``authenticate`` can read headers and send a denial response.

Serving policy: on uvicorn's ``websockets-sansio`` protocol (what ``inventory serve``
runs) the handshake goes through ASGI like any route (authentication, origin guards,
middleware, logging), and right after the accept the connection is handed off
(:mod:`realtime.handoff`) to a :class:`~realtime.wsconn.WsConnection`: its own frame
parser, command runner and direct-write transport, with no task while idle. That keeps an
idle subscriber at a fraction of what uvicorn's per-connection objects and a suspended
ASGI task cost (README "Live stream": memory per connection).

Anywhere else (another server or WebSocket implementation, or an ASGI middleware that
wraps ``receive``) the endpoint task stays the connection's *reader* and everything goes
through the ASGI ``send`` (:class:`AsgiTransport`): correct but slower. Both paths apply a
connection's commands in order, each to completion (a subscribe awaits its snapshot)
before the next is read, so a client that floods commands is throttled by TCP instead of
queued. Everything outbound goes through the connection's
:class:`~realtime.session.Session`.

Bad input never closes the connection: malformed JSON, unknown ops, bad ids and binary
frames are answered with an ``error`` message. The exception is a message above
:data:`~realtime.protocol.MAX_FRAME_BYTES`, closed with 1009 (by the handed-off
connection's parser, or by uvicorn itself with ``ws_max_size=65536``; the check in the
ASGI reader covers other settings).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import orjson
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.routing import WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from realtime.handoff import abort_connection, hand_off, sansio_protocol
from realtime.hub import Hub, HubFull
from realtime.protocol import (
    MAX_FRAME_BYTES,
    ErrorCode,
    ProtocolError,
    encode_error,
    parse_command,
)
from realtime.session import Session, SessionClosed, Transport, TransportClosed
from realtime.wsconn import WsConnection

__all__ = [
    "AsgiTransport",
    "Authenticate",
    "StreamEndpoint",
    "capacity_refusal",
    "refusal",
    "websocket_route",
]


class Authenticate(Protocol):
    """Called before a stream handshake (WebSocket or SSE) is accepted."""

    def __call__(
        self, connection: HTTPConnection, refusal: Response | None = None, /
    ) -> Awaitable[Response | None]:
        """``None`` accepts the handshake; a response denies it: 401/403/503 when the
        credential fails, else ``refusal``. ``refusal`` is the handshake's own answer to
        bad parameters (the SSE route's 422): it is answered only once the credential is
        known good (who asks first, then what), and the credential is not spent then: a
        single-use ticket stays valid for the corrected request."""
        ...


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
        # ASGI has no abort: on uvicorn the TCP connection is dropped; elsewhere the socket
        # lingers until the peer goes away, with only the server's bounded write buffer
        # held (the session itself is already released).
        abort_connection(self._receive)


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


class StreamEndpoint:
    """A stream route's ASGI application (WebSocket or SSE): the hub, or how to get it
    once the lifespan has made it, and the handshake's authentication."""

    __slots__ = ("_authenticate", "_hub")

    def __init__(self, hub: Hub | Callable[[], Hub], authenticate: Authenticate | None) -> None:
        self._hub = hub
        self._authenticate = authenticate

    def hub(self) -> Hub:
        return self._hub if isinstance(self._hub, Hub) else self._hub()


class _Endpoint(StreamEndpoint):
    """The WebSocket route's ASGI application: one call per connection."""

    __slots__ = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub()
        protocol = sansio_protocol(receive)
        if protocol is None:
            await self._serve_asgi(hub, scope, receive, send)
            return
        connection = WsConnection(hub)
        session = await self._admit(hub, scope, receive, send, connection)
        if session is None:
            return
        connection.session = session
        try:
            await send({"type": "websocket.accept"})
            if hand_off(protocol, connection):
                return  # the connection lives on without this task (realtime.wsconn)
        except OSError:  # uvicorn's ClientDisconnected: gone before the accept
            pass
        session.lost()

    async def _serve_asgi(self, hub: Hub, scope: Scope, receive: Receive, send: Send) -> None:
        """Any other server: this task reads the connection, writes go through ``send``."""
        session = await self._admit(hub, scope, receive, send, AsgiTransport(receive, send))
        if session is None:
            return
        try:
            await send({"type": "websocket.accept"})
            await _read_loop(hub, session, receive)
        except SessionClosed:
            pass
        finally:
            await session.close(1000, "")

    async def _admit(
        self, hub: Hub, scope: Scope, receive: Receive, send: Send, transport: Transport
    ) -> Session | None:
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
                return hub.open(transport)
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
