"""The documentation cannot drift: docs/http-api.md is what the generator makes of the
server's OpenAPI document."""

from __future__ import annotations

from inventory.ops.apidoc import openapi, render

from .conftest import ROOT


def test_http_api_reference_is_generated() -> None:
    committed = (ROOT / "docs" / "http-api.md").read_text()
    assert committed == render(openapi()), (
        "docs/http-api.md is stale: run `python -m inventory.ops.apidoc > docs/http-api.md`"
    )


def test_reference_lists_every_route() -> None:
    text = render(openapi())
    for path, item in openapi()["paths"].items():
        for method in item:
            assert f"`{method.upper()} {path}`" in text
