"""The errors only HTTP raises, and the one way any error leaves: the spec's shape
``{"error": {"code", "message", "details"}}`` with the status its class declares.

The code and status of every error, of whichever layer, are declared in its class
(:class:`~inventory.domain.model.InventoryError` registers them); nothing here maps one
to the other.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from ..domain.model import Contention, InventoryError, Unavailable
from .schemas import ErrorBody, ErrorOut

__all__ = [
    "ClientDisconnected",
    "Forbidden",
    "ForbiddenOrigin",
    "InternalError",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "Unauthorized",
    "UnsupportedMediaType",
    "error_body",
    "error_response",
    "json_response",
]


class Unauthorized(InventoryError):
    """No bearer token, or one the server does not know (answered with
    ``WWW-Authenticate: Bearer``)."""

    code = "unauthorized"
    status = 401


class Forbidden(InventoryError):
    """A known token without the scope the route declares."""

    code = "forbidden"
    status = 403


class ForbiddenOrigin(InventoryError):
    """Loopback mode's Host/Origin guard, or a refused CORS preflight
    (:mod:`inventory.http.guards`)."""

    code = "forbidden_origin"
    status = 403


class PayloadTooLarge(InventoryError):
    code = "payload_too_large"
    status = 413


class ClientDisconnected(InventoryError):
    """The client went away before its whole body arrived (not a server error)."""

    code = "client_disconnected"
    status = 400


class MethodNotAllowed(InventoryError):
    """A method the path has no route for (answered with ``Allow``)."""

    code = "method_not_allowed"
    status = 405


class UnsupportedMediaType(InventoryError):
    """A body sent as anything but ``application/json``: browsers send ``text/plain`` and
    form bodies cross-site without a preflight, so only JSON is ever read."""

    code = "unsupported_media_type"
    status = 415


class InternalError(InventoryError):
    """What an unhandled exception becomes (:mod:`inventory.http.middleware`): a bug,
    never a client's mistake, so no operation documents it."""

    code = "internal_error"
    status = 500


def json_response(
    payload: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        msgspec.json.encode(payload), status_code, headers, media_type="application/json"
    )


def error_body(exc: InventoryError) -> bytes:
    """The JSON body of ``exc`` (also what an idempotent request stores)."""
    return msgspec.json.encode(ErrorOut(ErrorBody(exc.code, exc.message, exc.details)))


def error_response(exc: InventoryError) -> Response:
    headers = {}
    if isinstance(exc, Contention | Unavailable):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return Response(error_body(exc), exc.status, headers, media_type="application/json")
