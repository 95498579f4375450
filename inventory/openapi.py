"""``/openapi.json``: an OpenAPI 3.1 document built from the schemas that validate requests."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from .api import RouteDoc
from .schemas import ErrorOut

__all__ = ["openapi_document"]

_ERRORS = {
    "400": "Malformed JSON (`invalid_json`)",
    "401": "Missing or unknown token (`unauthorized`)",
    "403": "Token lacks the scope (`forbidden`)",
    "404": "Unknown id (`not_found`)",
    "409": "Rule violation (`insufficient_stock`, `version_conflict`, ...)",
    "413": "Body over 64 KiB (`payload_too_large`)",
    "422": "Schema or id violation (`validation_error`)",
    "503": "Contention or a dependency is down; see Retry-After",
}
_PARAM_PATTERNS = {
    "product_id": r"^[A-Za-z0-9._:-]{1,128}$",
    "warehouse_id": r"^[A-Za-z0-9._-]{1,64}$",
    "webhook_id": r"^[A-Za-z0-9._-]{1,64}$",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def openapi_document(docs: Mapping[str, Mapping[str, RouteDoc]]) -> dict[str, Any]:
    types: set[type] = {ErrorOut}
    for methods in docs.values():
        for doc in methods.values():
            types.update(t for t in (doc.request, doc.response) if t is not None)
    _, components = msgspec.json.schema_components(
        sorted(types, key=lambda t: t.__name__), ref_template="#/components/schemas/{name}"
    )
    error = {"content": {"application/json": {"schema": _ref("ErrorOut")}}}
    paths: dict[str, Any] = {}
    for path, methods in docs.items():
        params = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"}
                if name in ("reservation_id", "entry_id")
                else {"type": "string", "pattern": _PARAM_PATTERNS[name]},
            }
            for name in re.findall(r"{(\w+)}", path)
        ]
        item: dict[str, Any] = {}
        for method, doc in methods.items():
            op: dict[str, Any] = {
                "summary": doc.summary,
                "operationId": f"{method}_{re.sub(r'[^a-z]+', '_', path.lower()).strip('_')}",
                "security": [{"bearer": [doc.scope]}, {}],
                "responses": {
                    str(doc.status): {
                        "description": "OK",
                        "content": {"application/json": {"schema": _ref(doc.response.__name__)}}
                        if doc.response
                        else {},
                    },
                    **{code: {"description": text, **error} for code, text in _ERRORS.items()},
                },
            }
            if method == "put" and path in (
                "/v1/warehouses/{warehouse_id}",
                "/v1/products/{product_id}",
            ):
                # 201 when the warehouse was created, 200 when it was updated.
                op["responses"]["201"] = {**op["responses"]["200"], "description": "Created"}
            if params:
                op["parameters"] = list(params)
            if doc.request is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(doc.request.__name__)}},
                }
            if path == "/v1/reservations" and method == "post":
                op.setdefault("parameters", []).append(
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    }
                )
            if path == "/v1/stock":
                op["parameters"] = [
                    {"name": "product_ids", "in": "query", "required": True,
                     "schema": {"type": "string"}},
                ]  # fmt: skip
            if path.endswith("/movements"):
                op["parameters"] = [
                    *params,
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "limit", "in": "query",
                     "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                ]  # fmt: skip
            item[method] = op
        paths[path] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": "Inventory server", "version": "0.1.0"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
