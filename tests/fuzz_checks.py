"""Schemathesis checks of this project, registered on import: by tests/test_fuzz_api.py
for the pytest integration and through ``SCHEMATHESIS_HOOKS=tests.fuzz_checks`` for the
``schemathesis run`` command line (the stateful phase and CI's fuzz step)."""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

__all__ = ["error_shape", "positive_data_accepted"]

_SNAKE = re.compile(r"[a-z][a-z0-9_]*")


@schemathesis.check
def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """The spec's error body on every 4xx/5xx answer; X-Request-ID on every answer."""
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
    return True


@schemathesis.check
def positive_data_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance`` (which the runs disable) except for 422
    ``idempotency_key_reused``: SPEC answers a key reused with another body so, and the
    generator reuses short keys ("0") across bodies. That refusal is about an earlier
    request, not about this request's shape, so it says nothing on whether schema and
    server agree."""
    if response.status_code == 422 and _error_code(response) == "idempotency_key_reused":
        return None
    return positive_data_acceptance(ctx, response, case)


def _error_code(response: Any) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None
