"""The SSE fallback (``GET /v1/stream?product_ids=a,b``): the hub's messages as ``data:`` events.

For clients and proxies where WebSocket is not an option. One hub, one wire format, two
transports: an SSE connection is a :class:`~realtime.session.Session` of the same hub as a
WebSocket, so it gets the same messages (``snapshot``, ``subscribed``, ``stock``, and
whatever types the protocol grows), in the same order, with the same conflation,
overflow resync and slow-client close. Only the framing differs: each message is one
event ``data: <the JSON text>\\n\\n`` (the JSON is one line, so one ``data:`` field).

Policy:

* The subscription is fixed by the URL: the products are validated as the WebSocket's
  ``subscribe`` validates them (422 ``validation_error`` for a bad or missing list, at
  most :data:`~realtime.protocol.MAX_SUBSCRIPTIONS`), and the stream starts with their
  snapshots, then ``subscribed``, then changes. No event ids: a reconnect starts with
  fresh snapshots (the messages are full state, so nothing is lost by that). A browser's
  ``EventSource`` reconnects to the same URL by itself; with a ticket (single use) that
  reconnect is refused, so a browser client gets a new ticket and opens a new stream.
* Handshake: the connection cap (503), then ``authenticate`` (401/403), then the
  products (422), before the response starts; the same checks as the WebSocket's. The
  products are validated first but their 422 is answered only once the credential is
  known good, and without spending a ticket (:class:`realtime.ws.Authenticate`): a client
  that fixes its URL can still use the ticket it got.
* Writes go through the ASGI ``send`` of the HTTP server (chunked body), from the
  session's writer task, one event per send: the server's flow control makes a send
  wait while the client does not read, and meanwhile the session's bounded buffer keeps
  the newest state per row. A send blocked for the hub's ``send_timeout`` ends the
  stream (the reaper closes it, aborting the socket if the end cannot be sent). An SSE
  stream is a fallback, so it takes this simpler path rather than the WebSocket's
  direct socket writes.
* A snapshot that cannot be read (database down) is sent as an ``error`` event and the
  stream ends: a client reconnects instead of waiting on a stream that has nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from realtime.hub import Hub, HubFull
from realtime.protocol import ProtocolError, Subscribe, encode_error, validate_product_ids
from realtime.session import Session, SessionClosed, TransportClosed
from realtime.ws import AsgiTransport, Authenticate, StreamEndpoint, capacity_refusal, refusal

__all__ = ["sse_route"]

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # nginx: pass events on as they come
]


class _SseTransport(AsgiTransport):
    """:class:`realtime.session.Transport` writing each message as one SSE event."""

    __slots__ = ()

    async def send_text(self, text: str) -> None:
        body = b"data: " + text.encode() + b"\n\n"
        try:
            await self._send({"type": "http.response.body", "body": body, "more_body": True})
        except (RuntimeError, OSError) as exc:
            raise TransportClosed from exc

    async def close(self, code: int, reason: str) -> None:
        # An SSE stream has no close code: it ends. Ending the response also makes the
        # endpoint's pending receive() return (uvicorn answers http.disconnect then).
        try:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        except (RuntimeError, OSError) as exc:
            raise TransportClosed from exc


class _StreamEndpoint(StreamEndpoint):
    """The SSE route's ASGI application: one call per stream."""

    __slots__ = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub()
        request = Request(scope, receive)
        denial = None
        raw = request.query_params.get("product_ids", "")
        try:
            product_ids = validate_product_ids(raw.split(",") if raw else None)
        except ProtocolError as error:
            denial = refusal(422, "validation_error", f"product_ids: {error.message}")
        if hub.full:
            denial = capacity_refusal(hub)
        elif self._authenticate is not None:  # 401/403 before the 422; a ticket kept
            denial = await self._authenticate(request, denial)
        del request
        transport = _SseTransport(receive, send)
        session: Session | None = None
        if denial is None:
            try:
                session = hub.open(transport)
            except HubFull:
                denial = capacity_refusal(hub)
        if session is None:
            assert denial is not None
            await denial(scope, receive, send)
            return
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            try:
                await hub.execute(session, Subscribe(product_ids))
            except ProtocolError as error:
                # Nothing else was queued on this new session: written directly, then
                # the stream ends (finally).
                await transport.send_text(encode_error(error.code, error.message))
                return
            while (await receive())["type"] != "http.disconnect":
                pass
        except (SessionClosed, TransportClosed):
            pass
        finally:
            await session.close(1000, "")


def sse_route(
    hub: Hub | Callable[[], Hub],
    authenticate: Authenticate | None = None,
    *,
    path: str = "/v1/stream",
) -> Route:
    """The route to mount next to :func:`realtime.ws.websocket_route` (same arguments)."""
    return Route(path, _StreamEndpoint(hub, authenticate), methods=["GET"], name="stock_stream")
