"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

The document is built without any server (:func:`inventory.openapi.openapi_document` over
the route table), so the operations are known at collection time and each one is a
test of its own; the requests go to a live ``inventory serve`` process started once for
the module (shared session database and Redis).

Per operation a bounded number of generated requests (``MAX_EXAMPLES``) is sent and each
answer is checked:

- ``not_a_server_error``: no 5xx at all. The server is healthy and nothing else uses its
  products, so even 503 (``contention``/``unavailable``) would be a finding here.
- ``response_schema_conformance``: the body matches the documented schema of the status
  (the success schema or ``ErrorOut``).
- ``status_code_conformance`` and ``content_type_conformance``: the status is one the
  document lists, the media type the documented one.
- an extra check of the spec's error shape: every non-2xx body is
  ``{"error": {"code": <snake_case>, "message": <non-empty>, "details": ...}}`` and every
  response carries ``X-Request-ID``.

Left out on purpose (they conflict with choices the spec makes, see the report):

- ``negative_data_rejection`` / ``positive_data_acceptance`` (and negative generation):
  the spec answers schema-valid requests with 404/409 (unknown ids, short stock) and
  some schema-invalid ones with 404 before parsing (an unknown route); those checks
  would flag the spec's own choices.
- ``use_after_free``/``ensure_resource_availability`` and other stateful checks: a
  reservation id that was committed/released is still readable by design.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from inventory.api import Auth, api_routes
from inventory.openapi import openapi_document
from tests.conftest import ServerProcess

MAX_EXAMPLES = int(os.environ.get("INVENTORY_FUZZ_EXAMPLES", "25"))


def _document() -> dict[str, Any]:
    def no_service() -> Any:
        raise AssertionError("documentation only")

    _, docs = api_routes(no_service, Auth({}))
    return openapi_document(docs)


schema = schemathesis.openapi.from_dict(_document())

_SNAKE = re.compile(r"[a-z][a-z0-9_]*")


def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """The spec's error body on every non-2xx answer; X-Request-ID on every answer."""
    assert response.headers.get("x-request-id"), "X-Request-ID is missing"
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, body
    assert isinstance(error["code"], str), body
    assert _SNAKE.fullmatch(error["code"]), body
    assert isinstance(error["message"], str), body
    assert error["message"], body
    if response.status_code == 503:
        assert response.headers.get("retry-after", "").isdigit(), "503 without Retry-After"
    return True


CHECKS = [
    not_a_server_error,
    error_shape,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
]


@pytest.fixture(scope="module")
def live_server(database_url: str, redis_url: str, redis_prefix: str) -> Iterator[ServerProcess]:
    """One ``inventory serve`` for every operation of the module (a start costs ~1 s)."""
    env = {
        **os.environ,
        "INVENTORY_DATABASE_URL": database_url,
        "INVENTORY_REDIS_URL": redis_url,
        "INVENTORY_REDIS_PREFIX": redis_prefix,
        "INVENTORY_TOKENS": "",
    }
    server = ServerProcess(env)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.log.unlink(missing_ok=True)


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    # Reproducible in CI (the suite runs twice). To explore: INVENTORY_FUZZ_RANDOM=1 and
    # INVENTORY_FUZZ_EXAMPLES=500 (examples per operation).
    derandomize=not os.environ.get("INVENTORY_FUZZ_RANDOM"),
    database=None,
    # Generated bodies are large and filtered (ids with patterns): the speed and
    # filtering health checks would only make the run flaky, they judge no answer.
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_api_conforms(case: Any, live_server: ServerProcess) -> None:
    response = case.call(base_url=live_server.base_url, timeout=30)
    case.validate_response(response, checks=CHECKS)


# --- regressions found by this fuzzing ------------------------------------------------------


NUL_BODIES = [
    ("PUT", "/v1/warehouses/{wh}", {"name": "a\u0000b", "status": "active"}, "name"),
    (
        "PUT",
        "/v1/warehouses/{wh}",
        {"name": "n", "status": "active", "location": "\u0000"},
        "location",
    ),
    (
        "POST",
        "/v1/products/{pid}/stock/{wh}/adjustments",
        {"delta": 1, "reason": "r\u0000"},
        "reason",
    ),
    ("PUT", "/v1/products/{pid}/stock/{wh}", {"quantity": 3, "reason": "\u0000"}, "reason"),
    (
        "POST",
        "/v1/reservations",
        {"lines": [{"product_id": "{pid}", "quantity": 1}], "reference": "\u0000"},
        "reference",
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), NUL_BODIES)
async def test_nul_in_free_text_is_a_422(
    client: Any, make_stock: Any, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    """PostgreSQL text cannot store U+0000: the request is refused as invalid (it was a
    500 from the database driver)."""
    pid, [wh] = await make_stock(10)
    raw = json.dumps(body).replace("{pid}", pid)
    r = await client.request(
        method,
        path.format(pid=pid, wh=wh),
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == field


async def test_one_bad_reservation_does_not_fail_its_batch(client: Any, make_stock: Any) -> None:
    """Concurrent single-line reservations of one product are combined into one
    transaction; one request the database would refuse must not fail the others (a NUL
    in ``reference`` used to turn all 30 of these into 500s)."""
    pid, _ = await make_stock(1000)
    bodies = [
        {"lines": [{"product_id": pid, "quantity": 1}], "reference": f"ok-{i}"} for i in range(30)
    ]
    bodies[10]["reference"] = "bad\u0000"
    answers = await asyncio.gather(*(client.post("/v1/reservations", json=b) for b in bodies))
    statuses = [r.status_code for r in answers]
    assert statuses[10] == 422
    assert statuses[:10] + statuses[11:] == [201] * 29, statuses
