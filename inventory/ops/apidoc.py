"""Render the HTTP API reference (``docs/http-api.md``) from the OpenAPI document.

``python -m inventory.ops.apidoc > docs/http-api.md``. The document is the one the server
serves at ``/openapi.json`` (built from the msgspec schemas that validate requests), so
the Markdown cannot say anything the server does not enforce; ``tests/test_docs.py``
fails when the committed file differs from what this produces.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ..http.app_routes import api_document

__all__ = ["openapi", "render"]


def openapi() -> dict[str, Any]:
    """The server's OpenAPI document, built without a database."""
    return api_document()


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if schema.get("format"):
        return f"{kind} ({schema['format']})"
    return str(kind)


def _limits(schema: dict[str, Any]) -> str:
    parts = []
    for key, text in (
        ("minimum", "≥ {}"), ("maximum", "≤ {}"), ("minLength", "length ≥ {}"),
        ("maxLength", "length ≤ {}"), ("minItems", "≥ {} items"), ("maxItems", "≤ {} items"),
        ("pattern", "pattern `{}`"),
    ):  # fmt: skip
        if key in schema:
            parts.append(text.format(schema[key]))
    for option in schema.get("anyOf", []):
        if option.get("type") != "null":
            parts += [p for p in _limits(option).split(", ") if p]
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|") if "\\|" not in text else text


def _scope(security: list[dict[str, list[str]]]) -> str:
    """The token scope an operation needs (``open`` when none; ``, optional`` when an
    empty alternative makes the token optional)."""
    scopes = [s for alternative in security for s in alternative.get("bearer", [])]
    if not scopes:
        return "open"
    return scopes[0] + (", optional" if {} in security else "")


def _error_codes(response: dict[str, Any]) -> list[str]:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    code = schema.get("properties", {}).get("error", {}).get("properties", {}).get("code", {})
    return list(code.get("enum", []))


def render(doc: dict[str, Any]) -> str:
    out = [
        "# HTTP API reference",
        "",
        "Generated from the server's OpenAPI document (`/openapi.json`) by "
        "`python -m inventory.ops.apidoc > docs/http-api.md`; do not edit by hand. The README "
        "has the quick start and the choices; errors always have the shape "
        '`{"error": {"code", "message", "details"}}`.',
        "",
        "## Routes",
        "",
        "| method and path | summary | scope | body | answer |",
        "| --- | --- | --- | --- | --- |",
    ]
    statuses: dict[str, tuple[str, set[str]]] = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            scope = _scope(op.get("security", []))
            for code, response in op["responses"].items():
                if code[0] in "45":
                    _, codes = statuses.setdefault(code, (response["description"], set()))
                    codes.update(_error_codes(response))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ok = next((c for c in op["responses"] if c[0] in "12"), "")  # 101: WebSocket
            answer = op["responses"][ok].get("content", {}).get("application/json", {})
            out.append(
                f"| `{method.upper()} {path}` | {op['summary']} | {scope} | "
                f"{_type(body['schema']) if body else ''} | "
                f"{ok} {_type(answer['schema']) if answer else ''} |"
            )
    out += ["", "## Error statuses", "", "| status | meaning | codes |", "| --- | --- | --- |"]
    out += [
        f"| {code} | {text} | {', '.join(f'`{c}`' for c in sorted(codes))} |"
        for code, (text, codes) in sorted(statuses.items())
    ]
    out += ["", "## Schemas", ""]
    for name, schema in sorted(doc["components"]["schemas"].items()):
        out += [f"### {name}", ""]
        if schema.get("description"):
            out += [" ".join(schema["description"].split()), ""]
        props = schema.get("properties", {})
        if not props:
            out += [f"{_type(schema)}", ""]
            continue
        required = set(schema.get("required", []))
        out += ["| field | type | required | limits / default |", "| --- | --- | --- | --- |"]
        for field, prop in props.items():
            limits = _limits(prop)
            if "default" in prop:
                limits = ", ".join(
                    x for x in (limits, f"default `{json.dumps(prop['default'])}`") if x
                )
            out.append(
                f"| `{field}` | {_cell(_type(prop))} | {'yes' if field in required else 'no'} "
                f"| {_cell(limits)} |"
            )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    sys.stdout.write(render(openapi()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
