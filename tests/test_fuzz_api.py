"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

The document is built without any server (:func:`inventory.http.app_routes.api_document`), so
the operations are known at collection time and each one is a test of its own; the
requests go to a live ``inventory serve`` process started once for the module (shared
session database and Redis) with a bearer token configured, so authentication is
exercised too.

Every built-in check runs (the equivalent of ``schemathesis run --checks all``) in every
phase: examples, coverage (boundary values, missing and undeclared parameters,
undeclared methods), fuzzing (positive and negative data) per operation, then the
stateful phase, which follows the document's OpenAPI links (create a warehouse, receive
stock, reserve, then read, commit, release or extend that reservation; create, read,
delete a webhook). Among the checks:

- ``not_a_server_error``: no 5xx at all. The server is healthy and nothing else uses its
  products, so even 503 (``contention``/``unavailable``) would be a finding here.
- ``response_schema_conformance``, ``status_code_conformance``,
  ``content_type_conformance``, ``response_headers_conformance``: each answer is one the
  operation documents (its status, its error ``code`` enum, its headers).
- ``positive_data_acceptance`` / ``negative_data_rejection``: the schema and the server
  agree on every constraint (no schema-valid request refused with 422, no invalid one
  accepted).
- ``ignored_auth``, ``unsupported_method`` (405 with ``Allow``), ``missing_required_header``,
  ``use_after_free``, ``ensure_resource_availability`` (a created reservation is readable).
- ``error_shape`` (below): the spec's error body on every non-2xx answer.

The project's checks and hook live in tests/fuzz_checks.py: ``positive_data_acceptance``
runs wrapped (a refused webhook target is about the network, not the schema), and each
valid ``Idempotency-Key`` gets a fresh suffix so reservations are judged on their own
body, not refused for reusing a key the generator drew before.

After all of it the server's log must not contain the configured token.

Bounded: ``INVENTORY_FUZZ_EXAMPLES`` examples per operation in the fuzzing phase (25 by
default; CI's fuzz step raises it) and as many stateful scenarios.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from inventory.http.app_routes import api_document
from tests import fuzz_checks  # noqa: F401  (registers the project's checks)
from tests.conftest import ROOT, ServerProcess

MAX_EXAMPLES = int(os.environ.get("INVENTORY_FUZZ_EXAMPLES", "25"))
PHASES = os.environ.get("INVENTORY_FUZZ_PHASES", "stateful")
TOKEN = f"fuzz-{secrets.token_hex(16)}"

# Operations that are no request/response exchange (a WebSocket handshake, an endless
# event stream): covered by tests/test_realtime_*.py and the live-stream tests instead.
STREAMING = ["openStockWebSocket", "streamStock"]
# Documented per SPEC, served by the live-stream work (branch h/stream): fuzzed once
# merged (drop them here then; tests/test_openapi.py lists what is not served yet).
NOT_SERVED_YET: list[str] = []

_config = SchemathesisConfig.from_dict(
    {
        "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
        "phases": {"stateful": {"max-steps": 12}},
        # Replaced by fuzz_checks.positive_data_accepted (one documented exception).
        "checks": {"positive_data_acceptance": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_dict(api_document(), config=_config).exclude(
    operation_id=STREAMING + NOT_SERVED_YET
)

SETTINGS = hypothesis.settings(
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


@pytest.fixture(scope="module")
def live_server(database_url: str, redis_url: str, redis_prefix: str) -> Iterator[ServerProcess]:
    """One ``inventory serve`` for every operation of the module (a start costs ~1 s)."""
    env = {
        **os.environ,
        "INVENTORY_DATABASE_URL": database_url,
        "INVENTORY_REDIS_URL": redis_url,
        # Its own relay namespace: this process leads its relay itself (the session's
        # in-process app, blocked while these synchronous tests run, would let the relay
        # heartbeat lapse and /ready answer 503).
        "INVENTORY_REDIS_PREFIX": f"{redis_prefix}-fuzz",
        "INVENTORY_TOKENS": json.dumps({TOKEN: ["admin"]}),
        "INVENTORY_LOG_LEVEL": "debug",  # the secrets check reads every line there is
    }
    server = ServerProcess(env)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        server.log.unlink(missing_ok=True)


@schema.parametrize()
@SETTINGS
def test_api_conforms(case: Any, live_server: ServerProcess) -> None:
    case.call_and_validate(base_url=live_server.base_url, timeout=30)


def test_schemathesis_run_every_check(live_server: ServerProcess, tmp_path: Path) -> None:
    """``schemathesis run --checks all`` in the phases ``INVENTORY_FUZZ_PHASES`` names.

    By default only ``stateful``: scenarios along the OpenAPI links with every check on
    every step (use-after-free and resource availability included); the other phases ran
    per operation above. CI's fuzz step runs every phase here with more examples: the
    command a user would type. The command line is used because its engine drives the
    state machine against a live server (a bare Hypothesis state machine reports runs as
    flaky when answers depend on what earlier scenarios created)."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        f'[auth.openapi.bearer]\nbearer = "{TOKEN}"\n'
        "[checks.positive_data_acceptance]\nenabled = false\n"
        "[phases.stateful]\nmax-steps = 12\n"
        # Only the document's links: inferred ones guessed that a movement's (nullable)
        # reservation_id feeds reservation paths and sent "None" as a schema-valid id.
        "[phases.stateful.inference]\nalgorithms = []\n"
    )
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--no-color",
        f"--config-file={config}",
        "run",
        f"{live_server.base_url}/openapi.json",
        "--checks=all",
        "--exclude-checks=positive_data_acceptance",
        f"--phases={PHASES}",
        f"--max-examples={MAX_EXAMPLES}",
        "--request-timeout=30",
        *(f"--exclude-operation-id={op}" for op in STREAMING + NOT_SERVED_YET),
    ]
    if not os.environ.get("INVENTORY_FUZZ_RANDOM"):
        command.append("--seed=1")
    run = subprocess.run(
        command,
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.fuzz_checks",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
        cwd=tmp_path,  # the command line keeps a cache (.schemathesis/) in its directory
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    print(run.stdout)  # the report, shown with -s (CI's fuzz step) or -rP
    for phase in PHASES.split(","):  # each phase ran, none was skipped
        assert f"✅  {phase.title()} (in" in run.stdout, run.stdout


def test_no_secret_in_the_server_log(live_server: ServerProcess) -> None:
    """After everything above (the module's tests run in order), the configured token
    appears nowhere in the server's output, at debug level."""
    log = live_server.log.read_text(errors="replace")
    assert log, "the server wrote no log at all"
    assert TOKEN not in log


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
