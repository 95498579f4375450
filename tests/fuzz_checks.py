"""Schemathesis checks of this project, registered on import: by tests/test_fuzz_api.py
for the pytest integration and through ``SCHEMATHESIS_HOOKS=tests.fuzz_checks`` for the
``schemathesis run`` command line (the stateful phase and CI's fuzz step)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

__all__ = ["before_call", "error_shape", "positive_data_accepted"]

_SNAKE = re.compile(r"[a-z][a-z0-9_]*")
_KEY = re.compile(r"[\x20-\x7e]{1,255}")


@schemathesis.check
def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """The spec's error body on every 4xx/5xx answer; X-Request-ID on every answer."""
    assert response.headers.get("x-request-id"), "X-Request-ID is missing"
    if response.status_code < 400:
        return None
    documented = case.operation.definition.raw.get("responses", {}).get(
        str(response.status_code), {}
    )
    if "$ref" in documented.get("content", {}).get("application/json", {}).get("schema", {}):
        return None  # a documented body of its own (``/ready``'s 503 is ReadyOut)
    body = response.json()
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, body
    assert isinstance(error["code"], str), body
    assert _SNAKE.fullmatch(error["code"]), body
    assert isinstance(error["message"], str), body
    assert error["message"], body
    return True


@schemathesis.check
def positive_data_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance`` (which the runs disable) except for a refused
    webhook target (below): a 422 about the network the server is in, not about the
    request's shape, so it says nothing on whether schema and server agree."""
    if response.status_code == 422 and (
        _refused_webhook_target(response)
        or _customer_required(response)
        or _beyond_on_hand_bound(response)
        or _repeated_component(response)
    ):
        return None
    return positive_data_acceptance(ctx, response, case)


def _refused_webhook_target(response: Any) -> bool:
    """A webhook ``url`` of valid form whose host does not resolve or resolves to a
    private address: whether a name resolves depends on the network the server is in,
    which no schema can state (SPEC answers 422)."""
    try:
        error = response.json()["error"]
        return bool(error["details"]["field"] == "url" and "resolve" in error["message"])
    except (ValueError, KeyError, TypeError):
        return False


def _customer_required(response: Any) -> bool:
    """A reservation line for a product that has a purchase limit (set by an earlier
    ``PUT /v1/products``) but no ``customer_id``: SPEC answers 422 ``customer_required``,
    which depends on the product's settings, not on the request's shape."""
    try:
        return bool(response.json()["error"]["code"] == "customer_required")
    except (ValueError, KeyError, TypeError):
        return False


def _beyond_on_hand_bound(response: Any) -> bool:
    """An adjustment that would take the row past 1,000,000,000 on hand: SPEC answers 422,
    and whether a delta does depends on the row's current quantity."""
    try:
        return "max_on_hand" in response.json()["error"]["details"]
    except (ValueError, KeyError, TypeError):
        return False


def _repeated_component(response: Any) -> bool:
    """A kit listing one component twice: a rule across array items (distinct by
    ``product_id``) that JSON Schema cannot state (``uniqueItems`` compares whole items)."""
    try:
        error = response.json()["error"]
        return bool(error["details"]["field"].startswith("components[")) and (
            "listed twice" in error["message"]
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Give every valid generated ``Idempotency-Key`` a fresh suffix.

    The generator draws short keys ("0", "a") again and again across different bodies,
    and SPEC answers a key reused with another body with 422 ``idempotency_key_reused``:
    most reservations would be refused for an earlier request instead of judged on their
    own. An invalid key is left alone (it must still be refused); schemathesis
    re-validates the case after this hook, so the checks judge what was sent. Replays
    themselves are tested in tests/test_reservations.py.
    """
    key = case.headers.get("Idempotency-Key") if case.headers else None
    if isinstance(key, str) and _KEY.fullmatch(key):
        case.headers["Idempotency-Key"] = f"{key[:222]}-{uuid.uuid4().hex}"
