"""The route table: every HTTP operation is one row ``(path, method, handler, RouteDoc)``,
declared by its feature module next to its handler; this module makes the rows into
Starlette routes (:func:`build_routes`) and into the documentation OpenAPI is built from
(:func:`route_docs`).

- Each row is one ``starlette.routing.Route(path, handler, methods=[method])`` named by its
  ``operationId``: Starlette matches the path and the method (``HEAD`` with ``GET``).
  Rows are ordered busiest first (Starlette tries routes in order; no two paths overlap).
- The doc's ``scope`` is the operation's authorization, enforced here and nowhere else:
  the handler is wrapped in :meth:`~inventory.http.auth.TokenAuth.guard`.
- Routing's own answers (:data:`EXCEPTION_HANDLERS`): an unknown path is 404
  ``not_found``; a method the path lacks is 405 ``method_not_allowed`` with ``Allow``
  naming every method of the path (Starlette names only the first route's) and
  ``OPTIONS``, which answers 204 with the same ``Allow`` (a CORS preflight, when
  ``INVENTORY_CORS_ORIGINS`` is set, is answered before routing).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route

from ..domain.model import InventoryError, NotFound
from .auth import Handler, TokenAuth
from .errors import MethodNotAllowed, error_response, json_response

__all__ = [
    "EXCEPTION_HANDLERS",
    "Errors",
    "Link",
    "Messages",
    "QueryParam",
    "RouteDoc",
    "Row",
    "build_routes",
    "route_docs",
]


Errors = tuple[type[InventoryError], ...]
"""Error classes an operation can answer (each carries its code and status)."""


@dataclass(frozen=True, slots=True)
class QueryParam:
    """A documented query parameter (``schema`` is JSON Schema; arrays are comma-separated)."""

    name: str
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True, slots=True)
class Link:
    """An OpenAPI link from a route's success answer to the operation ``operation_id``.

    ``parameters`` and ``request_body`` hold runtime expressions (``$response.body#/id``,
    ``$request.path.product_id``); clients and the stateful fuzzer follow them.
    """

    operation_id: str
    parameters: dict[str, str] = field(default_factory=dict)
    request_body: Any = None


@dataclass(frozen=True, slots=True)
class Messages:
    """A message type (or a union of tagged ones) of a streaming route, documented as the
    component ``name``."""

    name: str
    kind: Any


@dataclass(frozen=True, slots=True)
class RouteDoc:
    """Everything said about one operation, declared next to its handler: its
    authorization (``scope``) and what OpenAPI says of it.

    :mod:`inventory.http.openapi` derives the rest from these facts: a ``scope`` means
    401/403, parameters or a body mean 422, a body means 400/413/415, ``idempotent`` means
    the ``Idempotency-Key``/``Idempotent-Replayed`` headers and ``idempotency_key_reused``.
    ``errors`` lists the other errors the operation can answer, as their classes (which
    carry code and status); nothing else is listed, so a client sees exactly what each
    call can return. ``scope`` ``None`` is an open route; ``optional_auth`` one that the
    configuration may open (``/ready``, ``/metrics``: ``build_routes``'s ``opened``);
    ``or_scope`` a second scope that grants it too (SPEC: ``reserve`` reads the
    reservations and waitlist entries it works with).
    """

    summary: str
    scope: str | None
    request: type | None = None
    response: type | None = None
    status: int = 200
    operation_id: str = field(kw_only=True)
    tag: str = ""
    description: str = ""
    errors: Errors = ()
    query: tuple[QueryParam, ...] = ()
    also: tuple[int, ...] = ()  # further success statuses with the same body
    idempotent: bool = False
    links: tuple[Link, ...] = ()
    media_type: str = "application/json"
    optional_auth: bool = False
    or_scope: str | None = None
    tickets: bool = False  # also accepts a stream ticket (``?ticket=``) instead of a token
    example: Any = None  # a request body to show (and for the fuzzer's examples phase)
    # Streaming routes: their messages by direction ("client", "server"), as ``x-messages``.
    messages: dict[str, Messages] = field(default_factory=dict)


Row = tuple[str, str, Handler | None, RouteDoc]
"""``(path, method, handler, doc)``: one operation; no handler for a route served by
another part (the live streams: :mod:`realtime`), which the row only documents."""


def build_routes(
    rows: Sequence[Row], auth: TokenAuth, opened: Collection[str] = ()
) -> list[BaseRoute]:
    """One route per row, behind the scope its doc declares. ``opened`` names the
    operations (``operationId``) with ``optional_auth`` that the configuration opens."""
    by_id = {doc.operation_id: doc for *_, doc in rows}
    assert all(by_id[op].optional_auth for op in opened), opened
    routes: list[BaseRoute] = []
    for path, method, handler, doc in sorted(rows, key=lambda row: _rank(row[0])):
        if handler is None:
            continue
        endpoint = handler
        if doc.scope is not None and doc.operation_id not in opened:
            endpoint = auth.guard(handler, doc.scope, doc.or_scope)
        routes.append(Route(path, endpoint, methods=[method], name=doc.operation_id))
    return routes


def _rank(path: str) -> int:
    """Starlette tries routes in order: the busiest paths first."""
    if path.startswith("/v1/reservations"):
        return 0
    return 1 if path == "/v1/products/{product_id}/stock" else 2


def route_docs(rows: Sequence[Row]) -> dict[str, dict[str, RouteDoc]]:
    """Path -> lower-case method -> doc, in table order (for
    :func:`inventory.http.openapi.openapi_document`)."""
    docs: dict[str, dict[str, RouteDoc]] = {}
    for path, method, _, doc in rows:
        docs.setdefault(path, {})[method.lower()] = doc
    return docs


async def _inventory_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, InventoryError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = ", ".join(sorted(_allowed(request, exc) | {"OPTIONS"}))
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        response = error_response(MethodNotAllowed(f"{request.method} is not allowed here"))
        response.headers["Allow"] = allow
        return response
    if exc.status_code == 404:
        return error_response(NotFound(f"no route for {request.url.path}"))
    return json_response(
        {"error": {"code": "http_error", "message": str(exc.detail), "details": None}},
        exc.status_code,
    )


def _allowed(request: Request, exc: HTTPException) -> set[str]:
    """The methods of every route of the request's path; else (a mounted app refused
    the method) what the refusal says."""
    methods: set[str] = set()
    for route in request.scope["router"].routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    if methods:
        return methods
    return {m.strip() for m in (exc.headers or {}).get("Allow", "GET, HEAD").split(",")}


EXCEPTION_HANDLERS: Mapping[Any, Any] = {
    InventoryError: _inventory_error,
    HTTPException: _http_error,
}
"""The app's exception handlers: every error leaves in the spec's JSON shape."""
