"""App factory: wires settings, the store, Redis, the service, realtime and routes.

One :func:`create_app` per server process. Its lifespan opens the PostgreSQL pool and
the Redis client, starts the expiry sweeper, the idempotency purge, the realtime relay
and hub (each background loop supervised: restarted if it ends), and closes them all in
reverse order on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from realtime.hub import Hub, HubSettings
from realtime.keys import RedisKeys
from realtime.relay import Relay
from realtime.sharded import RedisClient, redis_from_url
from realtime.sse import sse_route
from realtime.tasks import cancel_and_wait, set_restart_hook, spawn
from realtime.tickets import TicketStore
from realtime.ws import websocket_route

from .. import metrics
from ..config import Settings
from ..domain.model import InventoryError, Unavailable
from ..http.api import reservation_out
from ..http.app_routes import OpsHandlers, app_routes
from ..http.auth import TokenAuth
from ..http.errors import json_response
from ..http.guards import Cors, LoopbackGuard
from ..http.middleware import RequestMiddleware
from ..http.openapi import openapi_document
from ..http.redis_errors import REDIS_FAILURES, redis_translated
from ..http.routing import EXCEPTION_HANDLERS, build_routes, route_docs
from ..http.stream_auth import StreamAuth
from ..service.alerts import install as install_alerts
from ..service.commerce_feed import CommerceFeed, KitSnapshots
from ..service.expiry import Expiry
from ..service.inventory import InventoryService
from ..service.waitlist import Offerer, Waitlist
from ..service.waitlist import install as install_offered
from ..service.webhooks.delivery import Dispatcher, policy_from
from ..service.webhooks.events import install as install_reservation_events
from ..store.feed import PgLevelReader, PgOutbox
from ..store.pg import Store, connect
from ..store.webhooks import WebhookStore
from .tracing import instrument

__all__ = ["app_from_env", "create_app", "tune_gc"]

log = logging.getLogger("inventory.app")

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


class Runtime:
    """The per-process resources the lifespan opens; handlers reach them through it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis: RedisClient | None = None
        self.store: Store | None = None
        self.service: InventoryService | None = None
        self.hub: Hub | None = None
        self.tickets: TicketStore | None = None
        self.relay: Relay | None = None
        self.expiry: Expiry | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    def get_service(self) -> InventoryService:
        if self.service is None:
            raise Unavailable("the server is starting")
        return self.service

    def get_store(self) -> Store:
        if self.store is None:
            raise Unavailable("the server is starting")
        return self.store

    def get_hub(self) -> Hub:
        assert self.hub is not None, "the hub starts with the lifespan"
        return self.hub

    def get_tickets(self) -> TicketStore:
        if self.tickets is None:
            raise Unavailable("the server is starting")
        return self.tickets


_HUB_COUNTERS = {
    "connections_total": metrics.WS_CONNECTIONS_TOTAL,
    "coalesced": metrics.WS_COALESCED,
    "gaps": metrics.WS_GAPS,
    "deliveries": metrics.WS_DELIVERIES,
    "conflated": metrics.WS_CONFLATED,
    "stale": metrics.WS_DROPPED,
    "overflows": metrics.WS_DROPPED,
    "slow_disconnects": metrics.WS_SLOW_DISCONNECTS,
    "redis_reconnects": metrics.REDIS_RECONNECTS,
    "resyncs": metrics.RESYNCS,
}


_HUB_GAUGES = {
    "connections": metrics.WS_CONNECTIONS,
    "subscriptions": metrics.WS_SUBSCRIPTIONS,
    "topics": metrics.WS_TOPICS,
}


async def _export_hub_stats(hub: Hub, interval: float = 1.0) -> None:
    """Copy the hub's plain counters into Prometheus (multiprocess-safe) every second."""
    seen = dict.fromkeys(_HUB_COUNTERS, 0)
    while True:
        stats = hub.stats
        for name, counter in _HUB_COUNTERS.items():
            value = getattr(stats, name)
            if value > seen[name]:
                counter.inc(value - seen[name])
            seen[name] = value
        for name, gauge in _HUB_GAUGES.items():
            gauge.set(getattr(stats, name))
        await asyncio.sleep(interval)


def _lock_factory(redis: RedisClient, settings: Settings) -> Any:
    from locks import LockError, LockNotAcquired, acquire_many

    from ..domain.model import Contention

    names = RedisKeys(settings.redis_prefix)
    lock_failures: tuple[type[Exception], ...] = (LockError, *REDIS_FAILURES)

    @contextlib.asynccontextmanager
    async def lock_products(products: Sequence[str]) -> AsyncIterator[None]:
        """Hold the products' locks around a write.

        Failing to get them is 503 (``contention`` or ``unavailable``). Losing them after
        the write committed is only logged: the write was version-checked (the row
        version is the fence), and a 503 then would invite a retry that reserves twice.
        """
        keys = [names.lock_pair(p) for p in products]
        metrics.LOCK_WAITS.inc()
        lock = acquire_many(redis, keys, ttl=settings.lock_ttl, timeout=settings.lock_wait)
        try:
            with redis_translated("the product locks cannot be taken right now; retry"):
                await lock.__aenter__()
        except LockNotAcquired:
            metrics.LOCK_TIMEOUTS.inc()
            raise Contention("timed out waiting for the product lock; retry", 1.0) from None
        except LockError as exc:
            raise Unavailable(f"lock service unavailable: {type(exc).__name__}") from None
        try:
            yield
        except BaseException:
            with contextlib.suppress(*lock_failures):
                await lock.__aexit__(*sys.exc_info())
            raise
        try:
            await lock.__aexit__(None, None, None)
        except lock_failures as exc:
            log.warning("product lock lost before release (write was fenced): %r", exc)

    return lock_products


def create_app(settings: Settings) -> Starlette:
    runtime = Runtime(settings)
    # webhook producers of reservation.*, stock.low/out/back and waitlist.offered
    install_reservation_events(reservation_out)
    install_alerts()
    install_offered()
    auth = TokenAuth(settings.tokens)
    stream_auth = StreamAuth(auth, runtime.get_tickets)

    async def health(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(request: Request) -> Response:
        checks = {"postgres": False, "redis": False, "relay": False}
        if runtime.store is not None:
            with contextlib.suppress(InventoryError, OSError):
                await asyncio.wait_for(runtime.store.ping(), 2)
                checks["postgres"] = True
        if runtime.redis is not None:
            with contextlib.suppress(*REDIS_FAILURES):
                await asyncio.wait_for(runtime.redis.ping(), 2)
                checks["redis"] = True
        if runtime.relay is not None:  # some process leads the relay for this redis
            with contextlib.suppress(*REDIS_FAILURES):
                checks["relay"] = await asyncio.wait_for(runtime.relay.lease_held(), 2)
        ok = all(checks.values())
        return json_response(
            {"status": "ready" if ok else "unavailable", "checks": checks}, 200 if ok else 503
        )

    async def openapi(request: Request) -> Response:
        return json_response(document)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        assert settings.database_url is not None
        assert settings.redis_url is not None
        store = runtime.store = await connect(
            settings.database_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_timeout,
        )
        runtime.redis = redis_from_url(
            settings.redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15
        )
        lock_products = None
        if settings.reserve_strategy == "lock":
            lock_products = _lock_factory(runtime.redis, settings)
        set_restart_hook(lambda name: metrics.TASK_RESTARTS.labels(name).inc())
        feed = CommerceFeed(store, runtime.redis, prefix=settings.redis_prefix)
        relay = runtime.relay = Relay(
            PgOutbox(store.pool),
            runtime.redis,
            prefix=settings.redis_prefix,
            poll_interval=settings.relay_poll_interval,
            followers=[feed.publish],
        )
        hub = runtime.hub = Hub(
            runtime.redis,
            PgLevelReader(store.pool),
            prefix=settings.redis_prefix,
            settings=HubSettings(max_connections=settings.max_streams),
            extra_snapshots=KitSnapshots(store, runtime.redis, settings.redis_prefix),
        )
        runtime.tickets = TicketStore(runtime.redis, prefix=settings.redis_prefix)
        offerer: Offerer | None = None

        def on_change() -> None:
            relay.wake()
            if offerer is not None:
                offerer.wake()

        service = InventoryService(
            store,
            lock_products=lock_products,
            on_change=on_change,
            # A reservation only takes stock: it never lets a waitlist entry be offered.
            on_reserved=relay.wake,
            lanes=settings.process_lanes,
            wait_bound=settings.db_timeout,
            # Requests waiting for a busy row never take the lanes' connections.
            wait_slots=max(1, settings.db_pool_max - settings.process_lanes - 2),
        )
        runtime.service = service
        offerer = Offerer(Waitlist(service, store))
        runtime.tasks.append(spawn("waitlist-offerer", offerer.run))
        await hub.start()
        await relay.start()
        runtime.tasks.append(spawn("hub-metrics", lambda: _export_hub_stats(hub)))

        def released(products: Iterable[str]) -> None:
            for product_id in products:  # stock came back: stop refusing it from memory
                service.engine.forget(product_id)
            service.on_change()

        expiry = runtime.expiry = Expiry(store, batch=settings.sweep_batch, on_released=released)
        runtime.tasks.append(
            spawn("expiry-sweeper", lambda: expiry.run_sweeper(settings.sweep_interval))
        )
        runtime.tasks.append(
            spawn("idempotency-purge", lambda: expiry.run_purge(settings.idempotency_ttl_hours))
        )
        webhooks = Dispatcher(
            settings.database_url, WebhookStore(store.pool), store, policy_from(settings)
        )
        webhooks.start()
        try:
            yield
        finally:
            await webhooks.stop()
            await cancel_and_wait(*runtime.tasks)
            await hub.stop()  # closes WebSockets with 1001
            await relay.stop()
            await service.close()
            await runtime.redis.aclose()
            await store.close()

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE_LATEST)

    async def dashboard(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "dashboard.html", media_type="text/html")

    rows = app_routes(
        runtime,
        OpsHandlers(health, ready, metrics_endpoint, openapi, stream_auth.create_ticket),
        settings.webhook_allow_private,
    )
    document = openapi_document(route_docs(rows))
    opened = [
        operation
        for operation, public in (
            ("getReadiness", settings.ready_public),
            ("getMetrics", settings.metrics_public),
        )
        if public
    ]
    all_routes: list[BaseRoute] = [
        *build_routes(rows, auth, opened),
        Route("/", dashboard, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
        websocket_route(runtime.get_hub, stream_auth.authenticate),
        sse_route(runtime.get_hub, stream_auth.authenticate),
    ]
    app = Starlette(routes=all_routes, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    if settings.cors_origins:
        app.add_middleware(Cors, origins=settings.cors_origins)
    if not auth.enabled:
        app.add_middleware(LoopbackGuard, allowed_origins=settings.cors_origins)
    app.add_middleware(RequestMiddleware)
    app.state.runtime = runtime
    instrument(app, settings)  # INVENTORY_TRACING=on: OpenTelemetry, outermost; else no-op
    return app


def app_from_env() -> Starlette:
    """uvicorn factory for server processes: settings come from the environment."""
    app = create_app(Settings.from_env())
    tune_gc()
    return app


def tune_gc(young: int = 10_000) -> None:
    """Make the cyclic garbage collector cheap for a long-running server.

    Two standard measures: everything built so far (modules, the app, its routes and
    schemas) is moved out of the collector's sight (``gc.freeze``), so full collections
    do not traverse it again and again; and the youngest generation is collected after
    ``young`` net allocations instead of 700. Almost everything a request allocates is
    freed by reference counting, so collections mostly traverse live in-flight objects
    for nothing. Measured on the hot-SKU path driven in-process (128 concurrent requests):
    with the defaults, 191 young, 18 middle and 1 full collection took 19 us per request,
    about a fifth of the app's CPU; with 10,000, two collections in the same run.
    Unreachable cycles are still collected, ~14x less often.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
