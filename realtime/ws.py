"""The Starlette WebSocket endpoint (``/v1/ws``): handshake, reader loop, transport adapter.

The endpoint task is the connection's *reader*: it parses one client message at a time
and runs it to completion (a subscribe awaits its snapshot) before reading the next, so
commands of one connection are applied in order and a client that floods commands is
throttled by TCP instead of queued. Everything outbound goes through the connection's
:class:`~realtime.session.Session` writer.

Bad input never closes the connection: malformed JSON, unknown ops, bad ids and binary
frames are answered with an ``error`` message. The exception is a frame above
:data:`~realtime.protocol.MAX_FRAME_BYTES`, closed with 1009 (uvicorn does this itself
when run with ``ws_max_size=65536``; the check here covers other settings).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from realtime.hub import Hub
from realtime.protocol import (
    MAX_FRAME_BYTES,
    ErrorCode,
    ProtocolError,
    encode_error,
    parse_command,
)
from realtime.session import Session, SessionClosed, TransportClosed

__all__ = ["Authenticate", "websocket_route"]

Authenticate = Callable[[WebSocket], Awaitable[Response | None]]
"""Called before the handshake is accepted; a returned response denies it (401/403)."""

MESSAGE_TOO_BIG_CLOSE = 1009


class _StarletteTransport:
    """Adapts a Starlette WebSocket to :class:`realtime.session.Transport`."""

    __slots__ = ("_websocket",)

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket

    async def send_text(self, text: str) -> None:
        try:
            await self._websocket.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise TransportClosed from exc

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._websocket.close(code, reason)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise TransportClosed from exc

    def abort(self) -> None:
        # ASGI has no abort. When the server's receive callable is a method of its protocol
        # object holding an asyncio transport (uvicorn's websocket protocols), drop the TCP
        # connection; otherwise the socket lingers until the peer goes away, with only the
        # server's bounded write buffer held (the session itself is already released).
        protocol = getattr(getattr(self._websocket, "_receive", None), "__self__", None)
        abort = getattr(getattr(protocol, "transport", None), "abort", None)
        if callable(abort):  # uvloop's transports do not subclass asyncio.Transport
            abort()


def _frame_too_big(text: str) -> bool:
    # UTF-8 takes at most 4 bytes per character: only long texts need encoding to check.
    return len(text) > MAX_FRAME_BYTES // 4 and len(text.encode()) > MAX_FRAME_BYTES


async def _read_loop(hub: Hub, session: Session, websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
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

    async def stock_websocket(websocket: WebSocket) -> None:
        current = hub if isinstance(hub, Hub) else hub()
        if authenticate is not None:
            denial = await authenticate(websocket)
            if denial is not None:
                await websocket.send_denial_response(denial)
                return
        await websocket.accept()
        session = current.open(_StarletteTransport(websocket))
        try:
            await _read_loop(current, session, websocket)
        except SessionClosed:
            pass
        finally:
            await session.close(1000, "")

    return WebSocketRoute(path, stock_websocket, name="stock_websocket")
