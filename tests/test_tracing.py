"""Optional OpenTelemetry tracing (``INVENTORY_TRACING``): spans when on, nothing when off.

One traced app serves this module's span tests (exporting to an ``InMemorySpanExporter``);
asyncpg and redis are patched process-wide while it is up and unpatched after the module.
It is started once, not per test: an app stopped within milliseconds of starting can hang
in its shutdown (Python 3.11's ``asyncio.wait_for``, used by redis-py while the realtime
subscriber connects, can swallow the cancellation). Its shutdown flush is tested by the
``inventory serve`` test at the end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from msgspec.structs import replace
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from starlette.applications import Starlette

from inventory.config import ConfigError, Settings
from inventory.logs import JsonFormatter
from inventory.ops.app import create_app
from inventory.ops.tracing import instrument, uninstrument

from .conftest import ROOT, ServerFactory
from .test_cli import run_cli


@dataclass
class Traced:
    """The traced app (lifespan running), a client of it, and what it exported."""

    app: Starlette
    provider: TracerProvider
    exporter: InMemorySpanExporter
    client: httpx.AsyncClient

    def spans(self) -> tuple[ReadableSpan, ...]:
        self.provider.force_flush()
        return self.exporter.get_finished_spans()


@pytest.fixture(scope="module")
async def traced_app(settings: Settings) -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    app = create_app(settings)  # tracing off: a plain app ...
    provider = instrument(app, replace(settings, tracing="on"), exporter=exporter)  # ... traced
    assert provider is not None
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                yield Traced(app, provider, exporter, c)
    finally:
        uninstrument()


@pytest.fixture
def traced(traced_app: Traced) -> Traced:
    """The module's traced app, with no spans exported yet."""
    traced_app.spans()
    traced_app.exporter.clear()
    return traced_app


def server_span(spans: tuple[ReadableSpan, ...]) -> ReadableSpan:
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in servers]
    return servers[0]


def status_of(span: ReadableSpan) -> Any:
    attributes = span.attributes or {}
    return attributes.get("http.status_code", attributes.get("http.response.status_code"))


def db_spans(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if (s.attributes or {}).get("db.system", (s.attributes or {}).get("db.system.name"))
        == "postgresql"
    ]


async def test_a_reservation_is_one_trace_with_its_queries(
    traced: Traced, make_stock: Callable[..., Any]
) -> None:
    product, _ = await make_stock(5)  # through the untraced session app: no spans
    r = await traced.client.post(
        "/v1/reservations", json={"lines": [{"product_id": product, "quantity": 2}]}
    )
    assert r.status_code == 201, r.text
    spans = traced.spans()

    server = server_span(spans)
    assert server.name == "POST /v1/reservations"
    assert (server.attributes or {})["http.route"] == "/v1/reservations"
    assert status_of(server) == 201
    assert server.parent is None
    assert server.resource.attributes["service.name"] == "inventory"

    queries = db_spans(spans)
    assert queries, [s.name for s in spans]
    assert all(s.kind is SpanKind.CLIENT for s in queries)
    assert all(s.parent is not None and s.parent.span_id == server.context.span_id for s in queries)
    # One trace, and nothing else: the background loops' spans (sweeper, relay, hub)
    # have no request parent and are dropped.
    assert {s.context.trace_id for s in spans} == {server.context.trace_id}
    assert "db.statement.parameters" not in {k for s in queries for k in s.attributes or {}}


async def test_the_clients_traceparent_is_the_parent(
    traced: Traced, make_stock: Callable[..., Any]
) -> None:
    product, _ = await make_stock(3)
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    r = await traced.client.get(
        f"/v1/products/{product}/stock",
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    assert r.status_code == 200, r.text
    spans = traced.spans()

    server = server_span(spans)
    assert server.name == "GET /v1/products/{product_id}/stock"
    assert status_of(server) == 200
    assert format(server.context.trace_id, "032x") == trace_id
    assert server.parent is not None
    assert server.parent.is_remote
    assert format(server.parent.span_id, "016x") == parent_id
    assert db_spans(spans)
    assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id}


async def test_probes_and_scrapes_are_not_traced(traced: Traced) -> None:
    for path in ("/health", "/ready", "/metrics"):
        r = await traced.client.get(path)
        assert r.status_code == 200, (path, r.text)
    r = await traced.client.get("/v1/warehouses/health")  # a route ending in /health is
    assert r.status_code == 404
    spans = traced.spans()

    server = server_span(spans)
    assert server.name == "GET /v1/warehouses/{warehouse_id}"
    assert status_of(server) == 404
    # /ready's database ping had no request span above it: dropped, not a trace of its own
    assert {s.context.trace_id for s in spans} == {server.context.trace_id}


async def test_log_lines_carry_the_trace_and_span_ids(traced: Traced) -> None:
    record = logging.LogRecord("inventory.test", logging.INFO, __file__, 1, "hello", (), None)
    context = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0x00F067AA0BA902B7,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with trace.use_span(NonRecordingSpan(context)):
        inside = orjson.loads(JsonFormatter().format(record))
    assert inside["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert inside["span_id"] == "00f067aa0ba902b7"
    outside = orjson.loads(JsonFormatter().format(record))
    assert "trace_id" not in outside
    assert "span_id" not in outside


def test_create_app_puts_the_tracing_middleware_outermost(
    traced: Traced, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    app = create_app(replace(settings, tracing="on"))  # not started: nothing to stop
    assert app.user_middleware[0].cls is OpenTelemetryMiddleware
    assert all(m.cls is not OpenTelemetryMiddleware for m in create_app(settings).user_middleware)


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "off"), ({"INVENTORY_TRACING": ""}, "off"), ({"INVENTORY_TRACING": "ON"}, "on")],
)
def test_setting_values(env: dict[str, str], expected: str) -> None:
    assert Settings.from_env(env).tracing == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INVENTORY_TRACING": "yes"}, "INVENTORY_TRACING must be one of off, on, got 'yes'"),
        (
            {"INVENTORY_TRACING": "on", "OTEL_TRACES_EXPORTER": "zipkin"},
            "OTEL_TRACES_EXPORTER must be otlp, console, none",
        ),
        (
            {"INVENTORY_TRACING": "on", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "only http/protobuf is supported, got 'grpc'",
        ),
    ],
)
def test_bad_values_fail_with_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


@pytest.fixture
def without_opentelemetry(tmp_path: Path) -> str:
    """A PYTHONPATH on which ``opentelemetry`` is an empty package: as if not installed."""
    (tmp_path / "opentelemetry").mkdir()
    (tmp_path / "opentelemetry" / "__init__.py").write_text("")
    return str(tmp_path)


@pytest.mark.parametrize("case", ["bad value", "not installed"])
def test_serve_refuses_to_start(
    case: str, without_opentelemetry: str, database_url: str, redis_url: str
) -> None:
    env = {"INVENTORY_DATABASE_URL": database_url, "INVENTORY_REDIS_URL": redis_url}
    if case == "bad value":
        env["INVENTORY_TRACING"] = "sometimes"
        expected = "INVENTORY_TRACING must be one of off, on, got 'sometimes'"
    else:
        env |= {"INVENTORY_TRACING": "on", "PYTHONPATH": without_opentelemetry}
        expected = "pip install 'inventory-server[otel]'"
    r = run_cli("serve", "--port", "0", env=env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("inventory: error: ")
    assert expected in last


@pytest.mark.parametrize("otel", ["installed", "not installed"])
def test_off_imports_no_opentelemetry(otel: str, without_opentelemetry: str) -> None:
    """Tracing off: building the app imports no OpenTelemetry module of its own.

    redis-py >= 8 imports ``opentelemetry.sdk.metrics`` by itself when it is installed
    (its optional metrics); that is the baseline, taken after importing the dependencies.
    """
    code = """
import sys
import asyncpg, orjson, redis.asyncio, starlette.applications, uvicorn  # on their own
before = {m for m in sys.modules if m.split(".")[0] == "opentelemetry"}
import inventory.ops.cli, inventory.ops.tracing
from inventory.ops.app import create_app
from inventory.config import Settings
for env in ({}, {"INVENTORY_TRACING": "off"}):
    create_app(Settings.from_env(env)).build_middleware_stack()
print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry" and m not in before))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INVENTORY_", "OTEL_"))}
    if otel == "not installed":
        env["PYTHONPATH"] = without_opentelemetry
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


async def test_serve_with_tracing_exports_on_shutdown(server_factory: ServerFactory) -> None:
    """The real path: ``inventory serve``, console exporter, flushed at SIGTERM."""
    server = await server_factory(
        env={"INVENTORY_TRACING": "on", "OTEL_TRACES_EXPORTER": "console"}
    )
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        r = await client.put("/v1/warehouses/traced-wh", json={"name": "t", "status": "active"})
        assert r.status_code in (200, 201), r.text
    assert await asyncio.to_thread(server.stop) == 0
    log = server.log.read_text()
    assert '"name": "PUT /v1/warehouses/{warehouse_id}"' in log, log[-3000:]
    assert '"http.route": "/v1/warehouses/{warehouse_id}"' in log
    assert '"service.name": "inventory"' in log
    assert '"name": "GET /ready"' not in log  # the start-up polls


async def test_no_credential_in_span_attributes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Query credentials are redacted from the URL attributes, and captured headers
    never carry Authorization, even when the operator asks to capture every header."""
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    exporter = InMemorySpanExporter()
    app = create_app(settings)
    provider = instrument(app, replace(settings, tracing="on"), exporter=exporter)
    assert provider is not None
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                r = await c.get(
                    "/v1/warehouses?token=SECRET-T1&ticket=SECRET-K1&limit=1",
                    headers={"Authorization": "Bearer SECRET-A1", "X-Api-Token": "SECRET-X1"},
                )
                assert r.status_code == 200
        provider.force_flush()
        server = server_span(exporter.get_finished_spans())
    finally:
        uninstrument()
    attributes = dict(server.attributes or {})
    assert any("limit=1" in str(v) for v in attributes.values()), attributes  # URL kept
    assert any("authorization" in k for k in attributes), attributes  # headers captured
    assert "SECRET" not in repr(attributes), attributes
