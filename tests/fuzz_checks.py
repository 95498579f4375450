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
    """``positive_data_acceptance`` (which the runs disable) except for two 422s that
    are about something other than the request's shape, so say nothing on whether
    schema and server agree: ``idempotency_key_reused`` (SPEC's answer to a key reused
    with another body; the generator reuses short keys such as "0" across bodies) and a
    refused webhook target (below)."""
    if response.status_code == 422 and _error_code(response) == "idempotency_key_reused":
        return None
    if response.status_code == 422 and _refused_webhook_target(response):
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


def _error_code(response: Any) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None
