"""``/openapi.json``: an OpenAPI 3.1 document built from the route table.

Every operation comes from one :class:`~inventory.http.routing.RouteDoc` (declared next to
its handler); nothing here knows a path. From a doc's facts this module derives:

- parameters: path ids with the patterns the handlers enforce, the declared query
  parameters, ``Idempotency-Key`` for idempotent routes, ``X-Request-ID`` everywhere;
- responses: the success statuses with their schema and links, then one response per
  error status the operation can answer (each error class declares its code and status),
  whose ``error.code`` is an enum of exactly the codes it can carry there;
  ``X-Request-ID`` on every response, ``Retry-After`` on 503, ``WWW-Authenticate`` on
  401, ``Idempotent-Replayed`` on idempotent successes;
- streaming routes' message schemas (``x-messages``) as named components.

Schemas come from the msgspec types that validate requests and encode answers, so the
document cannot drift from what the server enforces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import msgspec

from ..domain.model import (
    IDEMPOTENCY_KEY_RE,
    PRODUCT_ID_RE,
    WAREHOUSE_ID_RE,
    IdempotencyKeyReused,
    InventoryError,
    ValidationFailed,
    schema_pattern,
)
from .errors import (
    ClientDisconnected,
    Forbidden,
    ForbiddenOrigin,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from .routing import RouteDoc
from .schemas import STOCK_BODY_KINDS, ErrorOut, InvalidJson

__all__ = ["openapi_document"]

_STATUS_TEXT = {
    400: "Malformed JSON, or the client left before its body arrived",
    401: "Missing or unknown bearer token",
    403: "The token lacks the scope, or a foreign Host/Origin in loopback mode",
    404: "Unknown id",
    409: "A rule refuses the change in the current state",
    413: "Body over 64 KiB",
    415: "The body is not `Content-Type: application/json`",
    422: "Schema or id violation (`details.field` names it)",
    503: "Contention, or a dependency is down: retry after `Retry-After` seconds",
}
_PARAM_SCHEMAS = {
    "product_id": {"type": "string", "pattern": schema_pattern(PRODUCT_ID_RE)},
    "warehouse_id": {"type": "string", "pattern": schema_pattern(WAREHOUSE_ID_RE)},
    "webhook_id": {"type": "string", "pattern": schema_pattern(WAREHOUSE_ID_RE)},
    "reservation_id": {"type": "string", "format": "uuid"},
    "entry_id": {"type": "string", "format": "uuid"},
}
_HEADERS = {
    "X-Request-ID": {
        "description": "The client's `X-Request-ID` (printable ASCII, cut to 128 bytes) or a "
        "generated one; also in the server's log lines for the request.",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "required": True,
        "schema": {"type": "integer", "minimum": 1},
    },
    "WWW-Authenticate": {"required": True, "schema": {"type": "string", "const": "Bearer"}},
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored answer of an earlier request with the "
        "same `Idempotency-Key` and body; absent on a first answer.",
        "schema": {"type": "string", "const": "true"},
    },
}
_PARAMETERS = {
    "RequestId": {
        "name": "X-Request-ID",
        "in": "header",
        "description": "Correlation id echoed on the response (a new one when absent or "
        "not printable ASCII).",
        "schema": {"type": "string"},
    },
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "description": "Repeating the request with the same key and body returns the first "
        "answer (2xx, 404 or 409) for at least 24 h and reserves nothing more; the same key "
        "with another body is 422 `idempotency_key_reused`. Scoped to the token.",
        "schema": {"type": "string", "pattern": f"^{IDEMPOTENCY_KEY_RE.pattern}$"},
    },
}
_SECURITY_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "`Authorization: Bearer <token>`; tokens and their scopes (`read`, "
    "`reserve`, `admin`; admin implies the others) come from `INVENTORY_TOKENS`. With no "
    "tokens configured the server runs in loopback mode: it binds to loopback only and "
    "asks for no token.",
}

_TICKET_SCHEME = {
    "type": "apiKey",
    "in": "query",
    "name": "ticket",
    "description": "For browsers, which cannot set `Authorization` on a WebSocket or an "
    "EventSource: a single-use ticket from `POST /v1/stream-tickets`, valid 30 s. A raw "
    "token is never accepted in a URL.",
}


def _ref(name: str, kind: str = "schemas") -> dict[str, Any]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _headers(*names: str) -> dict[str, Any]:
    return {name: _ref(name, "headers") for name in names}


def _errors(doc: RouteDoc, has_input: bool) -> list[type[InventoryError]]:
    """Every error the operation can answer, in a stable order."""
    errors: list[type[InventoryError]] = [ForbiddenOrigin]  # loopback mode's Host guard
    if doc.scope is not None:
        errors += [Unauthorized, Forbidden]
    if has_input:
        errors.append(ValidationFailed)
    if doc.request is not None:
        errors += [InvalidJson, ClientDisconnected, PayloadTooLarge, UnsupportedMediaType]
    if doc.idempotent:
        errors.append(IdempotencyKeyReused)
    errors += doc.errors
    return list(dict.fromkeys(errors))


def _error_responses(errors: list[type[InventoryError]]) -> dict[str, Any]:
    by_status: dict[int, list[str]] = {}
    for error in errors:
        by_status.setdefault(error.status, []).append(error.code)
    responses: dict[str, Any] = {}
    for status in sorted(by_status):
        schema = {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message", "details"],
                    "properties": {
                        "code": {"type": "string", "enum": by_status[status]},
                        "message": {"type": "string"},
                        "details": {"description": "Machine-readable context, or null."},
                    },
                }
            },
        }
        extra = {503: ("Retry-After",), 401: ("WWW-Authenticate",)}.get(status, ())
        responses[str(status)] = {
            "description": _STATUS_TEXT[status],
            "headers": _headers("X-Request-ID", *extra),
            "content": {"application/json": {"schema": schema}},
        }
    return responses


def _schema(kind: Any, register: Any) -> dict[str, Any]:
    """A component reference for a Struct, an inline schema for a plain type (``str``)."""
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return _ref(register(kind))
    return msgspec.json.schema(kind)


def _operation(path: str, doc: RouteDoc, register: Any) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _PARAM_SCHEMAS[name]}
        for name in re.findall(r"{(\w+)}", path)
    ]
    for param in doc.query:
        entry: dict[str, Any] = {
            "name": param.name,
            "in": "query",
            "required": param.required,
            "schema": param.schema,
        }
        if param.description:
            entry["description"] = param.description
        if param.schema.get("type") == "array":
            entry |= {"style": "form", "explode": False}
        parameters.append(entry)
    has_input = bool(parameters) or doc.request is not None
    if doc.idempotent:
        parameters.append(_ref("IdempotencyKey", "parameters"))
    parameters.append(_ref("RequestId", "parameters"))

    success: dict[str, Any] = {
        "description": "OK",
        "headers": _headers("X-Request-ID", *(("Idempotent-Replayed",) if doc.idempotent else ())),
    }
    if doc.response is not None:
        success["content"] = {doc.media_type: {"schema": _schema(doc.response, register)}}
    if doc.links:
        success["links"] = {
            link.operation_id: {
                "operationId": link.operation_id,
                **({"parameters": link.parameters} if link.parameters else {}),
                **({"requestBody": link.request_body} if link.request_body is not None else {}),
            }
            for link in doc.links
        }
    responses = {
        str(status): {**success, "description": HTTPStatus(status).phrase}
        for status in (doc.status, *doc.also)
    }
    for status, response in _error_responses(_errors(doc, has_input)).items():
        responses.setdefault(status, response)

    op: dict[str, Any] = {
        "operationId": doc.operation_id,
        "summary": doc.summary,
        "parameters": parameters,
        "responses": responses,
    }
    if doc.tag:
        op["tags"] = [doc.tag]
    if doc.description:
        op["description"] = doc.description
    security: list[dict[str, list[str]]] = []
    if doc.scope is not None:
        security.append({"bearer": [doc.scope]})
        if doc.or_scope is not None:
            security.append({"bearer": [doc.or_scope]})
        if doc.tickets:
            security.append({"ticket": []})
        if doc.optional_auth:
            security.append({})
    op["security"] = security
    if doc.request is not None:
        body: dict[str, Any] = {"schema": _schema(doc.request, register)}
        if doc.example is not None:
            body["example"] = doc.example
        op["requestBody"] = {"required": True, "content": {"application/json": body}}
    if doc.messages:
        op["x-messages"] = {
            direction: _ref(register(messages.kind, messages.name))
            for direction, messages in doc.messages.items()
        }
    return op


def openapi_document(docs: Mapping[str, Mapping[str, RouteDoc]]) -> dict[str, Any]:
    """The document for ``docs`` (path -> lower-case method -> doc)."""
    # Stock bodies are referenced from a hand-written union (schemas.StockBody).
    kinds: dict[str, Any] = {"ErrorOut": ErrorOut, **{k.__name__: k for k in STOCK_BODY_KINDS}}

    def register(kind: Any, name: str | None = None) -> str:
        name = name or kind.__name__
        kinds[name] = kind
        return name

    paths: dict[str, Any] = {}
    tags: dict[str, None] = {}
    for path, methods in docs.items():
        item = paths.setdefault(path, {})
        for method, doc in methods.items():
            item[method] = _operation(path, doc, register)
            if doc.tag:
                tags[doc.tag] = None
    names = sorted(kinds)
    schemas, components = msgspec.json.schema_components(
        [kinds[name] for name in names], ref_template="#/components/schemas/{name}"
    )
    for name, schema in zip(names, schemas, strict=True):
        if "$ref" not in schema:  # a union: a component of its own under its given name
            components[name] = schema
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Inventory server",
            "version": "0.1.0",
            "description": "Stock per product and warehouse, reservations, and live stock "
            "over WebSocket (`/v1/ws`) or Server-Sent Events (`/v1/stream`). Errors are "
            '`{"error": {"code", "message", "details"}}`; each operation lists the codes it '
            "can answer.",
        },
        "tags": [{"name": tag} for tag in tags],
        "paths": paths,
        "components": {
            "schemas": components,
            "headers": _HEADERS,
            "parameters": _PARAMETERS,
            "securitySchemes": {"bearer": _SECURITY_SCHEME, "ticket": _TICKET_SCHEME},
        },
    }
