"""Request guards in front of the routes: loopback-mode origin checks, CORS, JSON depth.

SPEC "Security". Everything here is decided from the request head alone, before a route
runs, for HTTP and WebSocket scopes alike (so ``/v1/ws`` and ``/v1/stream`` are covered):

- **Loopback mode** (no ``INVENTORY_TOKENS``): the API is open to anything that can reach
  127.0.0.1, which includes every web page the local user opens. Two browser attacks are
  refused with 403 ``forbidden_origin``:

  * DNS rebinding: a page on ``evil.example`` whose name is re-pointed at 127.0.0.1 can
    read answers, but its requests still carry ``Host: evil.example``. So ``Host`` must
    be a loopback name or address (``localhost``, ``127.0.0.0/8``, ``[::1]``, any port).
  * Cross-site requests: a page may POST a "simple" request (no preflight) or open a
    WebSocket to 127.0.0.1 from anywhere. A state-changing request (any method but GET,
    HEAD and OPTIONS) or a WebSocket/SSE handshake whose ``Origin`` is present and is
    neither the server's own origin nor one of ``INVENTORY_CORS_ORIGINS`` is refused.
    Requests without ``Origin`` (curl, other servers, same-origin GETs) pass.

  With tokens configured these checks are off: a browser page cannot obtain the token.
- **CORS** (``INVENTORY_CORS_ORIGINS``): Starlette's CORS middleware for exactly those
  origins, preflight included; a refused preflight answers in the spec's JSON error shape.
- JSON depth is a rule of body decoding: :func:`inventory.http.schemas.check_depth`.

The middleware is pure ASGI and never wraps ``receive`` or ``send``: the WebSocket endpoint
recognises uvicorn's protocol through ``receive`` for its direct-write fast path.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from .errors import ForbiddenOrigin, error_response

__all__ = [
    "STREAM_PATHS",
    "Cors",
    "LoopbackGuard",
    "is_loopback_host",
    "is_loopback_name",
]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
STREAM_PATHS = frozenset({"/v1/stream"})
"""GET routes that open a live stream: their handshake is checked like a WebSocket's."""

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def is_loopback_host(host: str) -> bool:
    """``Host`` header value names this machine: localhost, 127.0.0.0/8 or [::1], any port."""
    name = _split_host(host)[0]
    return name is not None and is_loopback_name(name)


def is_loopback_name(name: str) -> bool:
    """A host name without brackets or port names this machine: localhost, 127.0.0.0/8, ::1."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _split_host(host: str) -> tuple[str | None, int | None]:
    """(lower-case name without brackets, port or None); (None, None) when malformed."""
    try:
        parts = urlsplit(f"//{host}")
        return (parts.hostname, parts.port) if parts.hostname else (None, None)
    except ValueError:  # a bad port or bracket
        return None, None


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(origin)
        if not parts.scheme or not parts.hostname:
            return None
        scheme = parts.scheme.lower()
        return scheme, parts.hostname, parts.port or _DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        return None


class LoopbackGuard:
    """The loopback-mode checks (see the module doc); add it only in loopback mode."""

    _CACHE_SIZE = 256

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = {key for o in allowed_origins if (key := _origin_key(o))}
        # Verdicts by (scheme, host, origin, checks origin): parsing a host and an origin
        # costs ~20 us, and a server sees the same few pairs again and again. Bounded:
        # cleared when full, so varied hostile values only cost the parse.
        self._verdicts: dict[tuple[str, bytes | None, bytes | None, bool], str | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" or kind == "websocket":
            host = origin = None
            for name, value in scope["headers"]:
                if name == b"host":
                    host = value
                elif name == b"origin":
                    origin = value
            checks_origin = origin is not None and (
                kind == "websocket"
                or scope["method"] not in SAFE_METHODS
                or scope["path"] in STREAM_PATHS
            )
            key = (scope["scheme"], host, origin if checks_origin else None, checks_origin)
            try:
                refusal = self._verdicts[key]
            except KeyError:
                if len(self._verdicts) >= self._CACHE_SIZE:
                    self._verdicts.clear()
                refusal = self._verdicts[key] = self._refusal(*key)
            if refusal is not None:
                response = error_response(ForbiddenOrigin(refusal))
                if kind == "websocket":
                    await WebSocket(scope, receive, send).send_denial_response(response)
                else:
                    await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(
        self, scheme: str, host: bytes | None, origin: bytes | None, checks_origin: bool
    ) -> str | None:
        if host is None or not is_loopback_host(host.decode("latin-1")):
            return "without tokens the server only answers requests addressed to localhost"
        if not checks_origin or origin is None:
            return None
        key = _origin_key(origin.decode("latin-1"))
        if key is not None and (
            key in self.allowed or key == _own_origin(scheme, host.decode("latin-1"))
        ):
            return None
        return "cross-origin requests are refused without tokens (see INVENTORY_CORS_ORIGINS)"


def _own_origin(scheme: str, host: str) -> tuple[str, str, int] | None:
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    name, port = _split_host(host)
    if name is None:
        return None
    return scheme, name, port or _DEFAULT_PORTS.get(scheme, 0)


class Cors(CORSMiddleware):
    """Starlette's CORS for the configured origins; a refused preflight gets a JSON error."""

    def __init__(self, app: ASGIApp, origins: Iterable[str]) -> None:
        super().__init__(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "Idempotent-Replayed"],
            max_age=600,
        )

    def preflight_response(self, request_headers: object) -> Response:
        response = super().preflight_response(request_headers)  # type: ignore[arg-type]
        if response.status_code == 200:
            return response
        refused = ForbiddenOrigin(f"CORS preflight refused: {bytes(response.body).decode()}")
        json = error_response(refused)
        json.status_code = response.status_code
        json.headers.update({k: v for k, v in response.headers.items() if k.startswith("vary")})
        return json
