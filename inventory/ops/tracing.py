"""Optional OpenTelemetry tracing: ``INVENTORY_TRACING=on`` with the ``otel`` extra.

Policy:

- **Off** (the default): this module imports nothing of OpenTelemetry and
  :func:`instrument` returns at once, so a server without the extra pays nothing.
- **On** needs ``pip install 'inventory-server[otel]'``; without it the settings fail at
  start (``Settings.from_env`` checks it) with a :class:`ConfigError`
  that says so, before any server is started.
- One ``TracerProvider`` per app (one per server process). Resource from the
  ``OTEL_*`` variables as the SDK reads them (``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_SERVICE_NAME``), with ``service.name`` ``inventory`` unless they name one.
  Sampler from ``OTEL_TRACES_SAMPLER`` (default: parent-based, always on), but only
  traces that start at an incoming request are kept: a span that a background loop
  (expiry sweeper, realtime relay and hub) starts without a parent is dropped, or every
  10 ms relay poll and every sweep would be a trace of its own.
- Exporters from ``OTEL_TRACES_EXPORTER`` (comma-separated): ``otlp`` (the default;
  OTLP over HTTP/protobuf, honouring ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the other
  ``OTEL_EXPORTER_OTLP_*`` variables), ``console`` (stdout) or ``none``; each behind a
  ``BatchSpanProcessor``, flushed and shut down when the app's lifespan ends.
- HTTP and WebSocket: the ASGI middleware is the outermost layer, so the request id,
  the metrics and the JSON 500 all run inside the server span. An incoming
  ``traceparent`` is honoured (``OTEL_PROPAGATORS``). The span is named
  ``METHOD /route/{template}`` and gets ``http.route`` once routing has matched; no
  per-message receive/send spans. ``/health``, ``/ready`` and ``/metrics`` are not traced
  (``OTEL_PYTHON_ASGI_EXCLUDED_URLS`` or ``OTEL_PYTHON_EXCLUDED_URLS``, comma-separated
  regular expressions searched in the full URL, replace that list).
- asyncpg and redis are patched process-wide, once per process, bound to the first
  traced app's provider (:func:`uninstrument` undoes it, for tests). Statements are
  recorded, their parameters never.
- JSON log lines logged inside a span carry its ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import logs
from ..config import DISTRIBUTION, otel_missing, trace_exporters

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span
    from starlette.applications import Starlette

    from ..config import Settings

__all__ = ["DEFAULT_EXCLUDED_URLS", "instrument", "uninstrument"]

SERVICE_NAME = "inventory"

#: Not traced unless ``OTEL_PYTHON_ASGI_EXCLUDED_URLS`` / ``OTEL_PYTHON_EXCLUDED_URLS``
#: say otherwise: probes and scrapes, searched in ``scheme://host/path`` (no query).
DEFAULT_EXCLUDED_URLS = r"^[a-z]+://[^/]*/(?:health|ready|metrics)$"


def instrument(
    app: Starlette, settings: Settings, *, exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """Trace ``app`` when ``settings.tracing`` is ``on``; otherwise do nothing.

    Call it last when building the app: the OpenTelemetry middleware is added as the
    outermost layer. ``exporter`` replaces the ones ``OTEL_TRACES_EXPORTER`` names (for
    tests: an ``InMemorySpanExporter``). Returns the app's tracer provider (``None`` when
    off); the app's lifespan shuts it down.
    """
    if settings.tracing != "on":
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.util.http import (
            OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS,
            get_custom_headers,
            sanitize_method,
        )
    except ImportError as exc:
        raise otel_missing(str(exc)) from exc

    exporters = [exporter] if exporter is not None else _exporters(os.environ)
    provider = TracerProvider(resource=_resource())  # sampler from OTEL_TRACES_SAMPLER
    provider.sampler = _request_traces_only(provider.sampler)  # before any tracer exists
    for each in exporters:
        provider.add_span_processor(BatchSpanProcessor(_redacting(each)))
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)  # for manual spans; once per process
    _instrument_libraries(provider)

    def span_details(scope: Scope) -> tuple[str, dict[str, Any]]:
        # The route is unknown yet: "GET" for now, _RouteName renames it.
        method = scope.get("method")
        return (sanitize_method(method) if method else "WebSocket"), {}

    app.add_middleware(_RouteName, current_span=trace.get_current_span)
    app.add_middleware(
        OpenTelemetryMiddleware,
        excluded_urls=_excluded_urls(os.environ),
        default_span_details=span_details,
        tracer_provider=provider,
        exclude_spans=["receive", "send"],
        # Headers an operator chooses to capture never carry credentials.
        http_capture_headers_sanitize_fields=[
            *get_custom_headers(OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SANITIZE_FIELDS),
            *SECRET_HEADERS,
        ],
    )
    _shutdown_with_lifespan(app, provider)
    return provider


def uninstrument() -> None:
    """Undo the process-wide patches (asyncpg, redis, log correlation); for tests."""
    logs.set_trace_ids(None)
    if "opentelemetry.instrumentation.asyncpg" not in sys.modules:
        return
    for instrumentor in _instrumentors():
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


# --- pieces (called only with tracing on) ----------------------------------------------


def _exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    for name in trace_exporters(env):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # reads OTEL_EXPORTER_OTLP_*
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
    return exporters


def _resource() -> Resource:
    from opentelemetry.sdk.resources import SERVICE_NAME as NAME
    from opentelemetry.sdk.resources import SERVICE_VERSION, Resource

    resource = Resource.create()  # SDK defaults + OTEL_RESOURCE_ATTRIBUTES + OTEL_SERVICE_NAME
    ours: dict[str, str] = {}
    name = resource.attributes.get(NAME)
    if not isinstance(name, str) or name.startswith("unknown_service"):
        ours[NAME] = SERVICE_NAME
    if SERVICE_VERSION not in resource.attributes:
        with contextlib.suppress(PackageNotFoundError):
            ours[SERVICE_VERSION] = version(DISTRIBUTION)
    return resource.merge(Resource(ours)) if ours else resource


SECRET_HEADERS = ("authorization", "proxy-authorization", "cookie", ".*token.*", ".*secret.*",
                  ".*ticket.*", "inventory-signature")  # fmt: skip


def _redacting(exporter: SpanExporter) -> SpanExporter:
    """``exporter`` behind a filter that redacts credentials (:func:`inventory.logs.redact`)
    from string attributes of spans and their events: the URL attributes carry the query
    string (``?ticket=``), exception events their messages. Done at export because
    instrumentations set attributes at any time, also after a span started."""
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    def clean(attributes: Any) -> tuple[dict[str, Any], bool]:
        out, changed = dict(attributes or {}), False
        for key, value in out.items():
            if isinstance(value, str) and (redacted := logs.redact(value)) != value:
                out[key], changed = redacted, True
        return out, changed

    def redacted(span: ReadableSpan) -> ReadableSpan:
        attributes, changed = clean(span.attributes)
        events = []
        for event in span.events:
            event_attributes, event_changed = clean(event.attributes)
            changed |= event_changed
            events.append(Event(event.name, event_attributes, event.timestamp))
        if not changed:
            return span
        return ReadableSpan(
            name=span.name, context=span.context, parent=span.parent, resource=span.resource,
            attributes=attributes, events=events, links=span.links, kind=span.kind,
            status=span.status, start_time=span.start_time, end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )  # fmt: skip

    class Redacting(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return exporter.export([redacted(s) for s in spans])

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return exporter.force_flush(timeout_millis)

    return Redacting()


def _request_traces_only(delegate: Sampler) -> Sampler:
    """``delegate`` decides, but a trace must start at a request (a SERVER span)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class RequestTracesOnly(Sampler):
        def __init__(self, delegate: Sampler) -> None:
            self._delegate = delegate

        def should_sample(
            self,
            parent_context: Any,
            trace_id: int,
            name: str,
            kind: trace.SpanKind | None = None,
            attributes: Any = None,
            links: Any = None,
            trace_state: Any = None,
        ) -> SamplingResult:
            parent = trace.get_current_span(parent_context).get_span_context()
            if not parent.is_valid and kind is not trace.SpanKind.SERVER:
                return SamplingResult(Decision.DROP)
            return self._delegate.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"RequestTracesOnly{{{self._delegate.get_description()}}}"

    return RequestTracesOnly(delegate)


def _instrumentors() -> tuple[Any, ...]:
    """asyncpg's and redis's instrumentors (each a process-wide singleton; untyped)."""
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    return AsyncPGInstrumentor(), RedisInstrumentor()  # type: ignore[no-untyped-call]


def _instrument_libraries(provider: TracerProvider) -> None:
    """Patch asyncpg and redis (process-wide, once) and correlate log lines."""
    from opentelemetry import trace

    for instrumentor in _instrumentors():
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=provider)

    get_current_span = trace.get_current_span

    def trace_ids() -> tuple[str, str] | None:
        context = get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return format(context.trace_id, "032x"), format(context.span_id, "016x")

    logs.set_trace_ids(trace_ids)


def _excluded_urls(env: Mapping[str, str]) -> str:
    for name in ("OTEL_PYTHON_ASGI_EXCLUDED_URLS", "OTEL_PYTHON_EXCLUDED_URLS"):
        if name in env:
            return env[name]
    return DEFAULT_EXCLUDED_URLS


def _shutdown_with_lifespan(app: Starlette, provider: TracerProvider) -> None:
    """Flush and shut down ``provider`` when the app's lifespan ends (after its own
    shutdown, so spans of the last requests are exported)."""
    lifespan = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def traced_lifespan(app: Any) -> AsyncIterator[Any]:
        try:
            async with lifespan(app) as state:
                yield state
        finally:
            await asyncio.to_thread(provider.shutdown)  # blocks up to the export timeout

    app.router.lifespan_context = traced_lifespan


class _RouteName:
    """Just inside the OpenTelemetry middleware: names the server span after the route
    template (``POST /v1/reservations``) and sets ``http.route``, once routing is done."""

    def __init__(self, app: ASGIApp, current_span: Callable[[], Span]) -> None:
        self.app = app
        self.current_span = current_span

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        span = self.current_span()  # the server span (this runs inside it)
        if not span.is_recording():
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                route = getattr(scope.get("route"), "path", None)
                if isinstance(route, str):
                    span.set_attribute("http.route", route)
                    method = scope.get("method")
                    span.update_name(f"{method} {route}" if method else route)
            await send(message)

        await self.app(scope, receive, send_named)
