"""The one HTTP middleware: request id, the JSON 500, and the request metrics.

One pure ASGI layer instead of three: every layer around the app costs a coroutine frame,
a ``send`` wrapper and a dispatch per message on every request, which the profile of the
hot-SKU path showed as a tenth of the server's CPU. It is the outermost layer (tracing,
when on, wraps it), so it sees what the client sees:

- ``X-Request-ID``: the client's value (printable ASCII, at most 128 bytes) or a new
  uuid4, echoed on the response, stored in ``scope["state"]["request_id"]`` and in the
  logging context (:data:`inventory.logs.request_id_var`).
- An exception nothing below handled becomes the spec's JSON 500, logged with the request
  id; if the response had already started, the connection is dropped instead.
- Requests and latency are counted by method, route template (``unmatched`` when no route
  matched, so clients cannot grow the label set) and status. Methods outside the HTTP
  standard ones are counted as ``OTHER`` for the same reason.
"""

from __future__ import annotations

import logging
import time
import uuid

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..logs import request_id_var
from ..metrics import HTTP_LATENCY, HTTP_REQUESTS
from .errors import InternalError, error_response

__all__ = ["RequestMiddleware"]

log = logging.getLogger("inventory.app")

_INTERNAL_ERROR = error_response(InternalError("internal server error"))
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        request_id = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value[:128]
                break
        if not request_id or not (request_id.isascii() and request_id.decode().isprintable()):
            request_id = uuid.uuid4().hex.encode()
        text_id = request_id.decode()
        scope.setdefault("state", {})["request_id"] = text_id
        token = request_id_var.set(text_id)
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if status:
                raise
            await _INTERNAL_ERROR(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            self._observe(scope, status or 500, time.perf_counter() - began)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        key = (method, template, status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                HTTP_REQUESTS.labels(method, template, str(status)),
                HTTP_LATENCY.labels(method, template),
            )
        requests, latency = series
        requests.inc()
        latency.observe(seconds)
