"""``inventory.client`` against real server processes: every route, retries, the stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import inspect
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, Generator
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import msgspec
import pytest

from inventory import client as cl
from inventory.client import (
    ApiError,
    AsyncClient,
    BulkItem,
    Client,
    Component,
    Line,
    ReadyChecks,
    SignatureError,
    StreamMessage,
    StreamTransport,
    verify_signature,
)
from inventory.http import catalog, doc_schemas, schemas, waitlist, webhooks
from inventory.http.app_routes import api_document
from inventory.store.webhooks import Delivery

from .conftest import ServerFactory, ServerProcess, wait_until
from .test_webhooks import Receiver

SECRET = "whsec-client-0123456789-abcdef"

#: Every operation of ``/openapi.json`` and the method of both clients that calls it.
CLIENT_METHODS = {
    "getHealth": "health",
    "getReadiness": "ready",
    "getMetrics": "metrics",
    "getOpenApi": "openapi",
    "listWarehouses": "list_warehouses",
    "getWarehouse": "get_warehouse",
    "putWarehouse": "put_warehouse",
    "listStock": "get_stocks",
    "getProductStock": "get_stock",
    "adjustStock": "adjust",
    "setStock": "set_quantity",
    "listMovements": "movements",
    "bulkChangeStock": "bulk",
    "createReservation": "reserve",
    "getReservation": "get_reservation",
    "commitReservation": "commit",
    "releaseReservation": "release",
    "extendReservation": "extend",
    "listReservations": "list_reservations",
    "listProducts": "list_products",
    "getProduct": "get_product",
    "putProduct": "put_product",
    "joinWaitlist": "join_waitlist",
    "listWaitlist": "list_waitlist",
    "listWaitlistLengths": "waitlist_lengths",
    "getWaitlistEntry": "get_waitlist_entry",
    "cancelWaitlistEntry": "cancel_waitlist_entry",
    "putWebhook": "put_webhook",
    "getWebhook": "get_webhook",
    "listWebhooks": "list_webhooks",
    "deleteWebhook": "delete_webhook",
    "listWebhookDeliveries": "list_webhook_deliveries",
    "createStreamTicket": "create_stream_ticket",
    "openStockWebSocket": "stream",
    "streamStock": "stream",  # transport="sse", or the fallback
}

#: Each client model and the server's wire types it decodes (its fields are theirs).
MIRRORS: list[tuple[type[Any], tuple[type[Any], ...]]] = [
    (cl.Warehouse, (schemas.WarehouseOut,)),
    (cl.Level, (schemas.LevelOut,)),
    (cl.ProductStock, (schemas.ProductStockOut, schemas.KitStockOut)),  # a kit's too
    (cl.KitComponentStock, (schemas.KitComponentStockOut,)),
    (cl.Component, (catalog.ComponentOut,)),
    (cl.Product, (catalog.ProductOut,)),
    (cl.Line, (schemas.ReservationLineOut,)),
    (cl.Reservation, (schemas.ReservationOut,)),
    (cl.Movement, (schemas.MovementOut,)),
    (cl.BulkItem, (catalog.BulkItemIn,)),
    (cl.BulkResult, (catalog.BulkResultOut,)),
    (cl.ErrorBody, (schemas.ErrorBody,)),
    (cl.WaitlistEntry, (waitlist.WaitlistEntryOut,)),
    (cl.WaitlistLength, (waitlist.WaitlistLengthOut,)),
    (cl.Webhook, (webhooks.WebhookOut,)),
    (cl.Delivery, (Delivery,)),
    (cl.StreamTicket, (doc_schemas.StreamTicketOut,)),
    (cl.Readiness, (doc_schemas.ReadyOut,)),
    (cl.ReadyChecks, (doc_schemas.ReadyChecks,)),
]
CLIENT_ONLY = {"replayed"}  # set from the Idempotent-Replayed header


def _operation_ids(document: dict[str, Any]) -> set[str]:
    return {op["operationId"] for item in document["paths"].values() for op in item.values()}


def test_every_operation_has_a_method_in_both_clients() -> None:
    """The mapping covers the document exactly, and the two facades agree on every
    method's parameters (a method added to one class only, or with other defaults,
    fails here)."""
    assert _operation_ids(api_document()) == set(CLIENT_METHODS)
    for name in sorted(set(CLIENT_METHODS.values())):
        blocking, awaited = getattr(Client, name), getattr(AsyncClient, name)
        params = inspect.signature(blocking).parameters
        assert params == inspect.signature(awaited).parameters, name
        assert inspect.iscoroutinefunction(awaited) or inspect.isasyncgenfunction(awaited), name


def _field_names(cls: type[Any]) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return {f.name for f in msgspec.structs.fields(cls)}


@pytest.mark.parametrize(("model", "wire"), MIRRORS, ids=[m.__name__ for m, _ in MIRRORS])
def test_client_models_mirror_the_wire_types(model: type[Any], wire: tuple[type[Any], ...]) -> None:
    """A field the server adds to an answer must reach the client's model (msgspec
    would otherwise drop it without a word)."""
    assert _field_names(model) - CLIENT_ONLY == set().union(*map(_field_names, wire))


def _ids() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"cl-{tag}", f"clw-{tag}"


class _Sent:
    """The operations of the requests an httpx client sent (an event hook), matched on
    the OpenAPI document's paths and methods."""

    def __init__(self) -> None:
        self.operations: set[str] = set()
        self._routes = [
            (method.upper(), re.compile(_path_pattern(path)), op["operationId"])
            for path, item in api_document()["paths"].items()
            for method, op in item.items()
        ]

    def hook(self, request: httpx.Request) -> None:
        found = [
            op
            for method, pattern, op in self._routes
            if method == request.method and pattern.fullmatch(request.url.path)
        ]
        assert len(found) == 1, (request.method, request.url.path, found)
        self.operations.add(found[0])

    async def async_hook(self, request: httpx.Request) -> None:
        self.hook(request)


def _path_pattern(path: str) -> str:
    return "/".join("[^/]+" if s.startswith("{") else re.escape(s) for s in path.split("/"))


class _Awaiting:
    """A :class:`Client` behind the :class:`AsyncClient` API: each call, and each step
    of a generator, runs in a worker thread, so one async walk drives both facades."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if inspect.isgeneratorfunction(method):
            return lambda *args, **kw: _stepped(method(*args, **kw))

        async def call(*args: Any, **kw: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kw)

        return call


async def _stepped(steps: Generator[Any]) -> AsyncGenerator[Any]:
    """A generator as an async generator, each step in a worker thread."""
    end = object()
    try:
        while (item := await asyncio.to_thread(next, steps, end)) is not end:
            yield item
    finally:
        await asyncio.to_thread(steps.close)


async def _walk(c: AsyncClient, hook_url: str) -> None:
    """Every operation through ``c`` (the WebSocket too), checking the typed answers."""
    tag = uuid.uuid4().hex[:8]
    product, wh, queued, kit = f"cl-{tag}", f"clw-{tag}", f"clq-{tag}", f"cl-{tag}-kit"

    assert await c.health()
    ready = await c.ready()
    assert (ready.status, ready.checks) == ("ready", ReadyChecks(postgres=True, redis=True))
    assert _operation_ids(await c.openapi()) == set(CLIENT_METHODS)

    assert (await c.put_warehouse(wh, "Main", location="Here")).location == "Here"
    assert (await c.get_warehouse(wh)).name == "Main"
    assert wh in [w.id for w in await c.list_warehouses()]

    level = await c.adjust(product, wh, 10, reason="receive")
    assert (level.quantity, level.version) == (10, 1)
    assert (await c.set_quantity(product, wh, 12, expected_version=1)).version == 2
    with pytest.raises(ApiError) as info:
        await c.set_quantity(product, wh, 1, expected_version=1)
    assert (info.value.status, info.value.code) == (409, "version_conflict")
    assert info.value.details == {"current_version": 2}
    assert (await c.get_stock(product)).available == 12
    assert [s.product_id for s in await c.get_stocks([product])] == [product]
    first = await c.movements(product, limit=1)
    assert ([m.version for m in first.items], first.next_after) == ([1], first.items[0].id)
    assert [m.quantity for m in (await c.movements(product, after=first.items[0].id)).items] == [12]
    results = await c.bulk([BulkItem(product, wh, delta=1), BulkItem(product, wh, delta=-999)])
    assert [x.status for x in results] == [200, 409]
    assert results[1].error is not None
    assert results[1].error.code == "insufficient_stock"
    with pytest.raises(ApiError) as info:
        await c.get_stock("no-such-" + product)
    assert info.value.status == 404

    # 13 on hand
    customer = "cust-" + tag
    r = await c.reserve(
        [Line(product, 2)], ttl_seconds=60, reference="order-" + tag, customer_id=customer
    )
    assert (r.status, r.lines[0].warehouse_id, r.replayed) == ("active", wh, False)
    assert (await c.get_reservation(r.id)).reference == "order-" + tag
    assert (await c.extend(r.id, 120)).status == "active"
    assert (await c.commit(r.id)).status == "committed"
    assert (await c.commit(r.id)).status == "committed"  # repeating answers 200
    one = [{"product_id": product, "quantity": 1, "warehouse_id": wh}]
    r2 = await c.reserve(one, reference="again-" + tag, idempotency_key="k-" + tag)
    again = await c.reserve(one, reference="again-" + tag, idempotency_key="k-" + tag)
    assert (again.id, again.replayed) == (r2.id, True)
    assert (await c.release(r2.id)).status == "released"
    assert [x.id for x in (await c.list_reservations(customer_id=customer)).items] == [r.id]
    listed = await c.list_reservations(reference="again-" + tag, status="released")
    assert ([x.id for x in listed.items], listed.next_after) == ([r2.id], None)
    assert "inventory_http_requests_total{" in await c.metrics()

    # 11 on hand
    made = await c.put_product(kit, components=[Component(product, 2)])
    assert made.components == [Component(product, 2)]
    assert made.stock is not None
    assert (made.stock.kit, made.stock.reservable, made.stock.levels) == (True, 5, [])
    assert made.stock.components is not None
    part = made.stock.components[0]
    assert (part.product_id, part.quantity) == (product, 2)
    assert part.stock is not None
    assert part.stock.available == 11
    assert await c.get_stock(kit) == made.stock
    assert (await c.put_product(product, name="Tee", safety_stock=1)).stock is not None
    assert (await c.get_product(product)).name == "Tee"
    ids = [p.product_id async for p in c.iter_products(limit=2) if p.product_id.startswith(product)]
    assert ids == [product, kit]

    await c.adjust(queued, wh, 1)
    head = await c.join_waitlist(queued, "c1-" + tag, 2, idempotency_key="w-" + tag)
    assert (head.status, head.position, head.reservation_id, head.replayed) == (
        "waiting", 1, None, False,
    )  # fmt: skip
    repeated = await c.join_waitlist(queued, "c1-" + tag, 2, idempotency_key="w-" + tag)
    assert (repeated.id, repeated.replayed) == (head.id, True)
    behind = await c.join_waitlist(queued, "c2-" + tag, 1, hold_seconds=60, warehouse_id=wh)
    assert (behind.status, behind.position) == ("waiting", 2)
    page = await c.list_waitlist(queued, limit=1)
    assert [e.id for e in page.items] == [head.id]
    assert page.next_after is not None
    assert [e.id for e in (await c.list_waitlist(queued, after=page.next_after)).items] == [
        behind.id
    ]
    lengths = await c.waitlist_lengths([queued, "none-" + tag])
    assert [(x.product_id, x.waiting, x.units) for x in lengths] == [
        (queued, 2, 3), ("none-" + tag, 0, 0),
    ]  # fmt: skip
    assert (await c.get_waitlist_entry(behind.id)).position == 2
    assert (await c.cancel_waitlist_entry(behind.id)).status == "cancelled"
    with pytest.raises(ApiError) as info:
        await c.cancel_waitlist_entry(behind.id)
    assert (info.value.status, info.value.code) == (409, "invalid_state")

    wid = "clwh-" + tag
    hook = await c.put_webhook(wid, hook_url, ["stock.changed"], SECRET)
    assert (hook.id, hook.url, hook.events, hook.active) == (wid, hook_url, ["stock.changed"], True)
    assert wid in [w.id for w in await c.list_webhooks()]
    assert await c.get_webhook(wid) == hook
    await c.adjust(product, wh, 1)
    await c.adjust(product, wh, 1)

    async def logged() -> bool:
        return len((await c.list_webhook_deliveries(wid)).items) == 2

    await wait_until(logged, 15, "two deliveries in the log")
    newest = await c.list_webhook_deliveries(wid, limit=1)
    assert newest.next_after is not None
    older = await c.list_webhook_deliveries(wid, after=newest.next_after)
    log = newest.items + older.items
    assert [(d.type, d.attempt, d.status_code, d.error, d.next_retry_at) for d in log] == [
        ("stock.changed", 1, 200, None, None)
    ] * 2
    assert len({d.event_id for d in log}) == 2
    await c.delete_webhook(wid)
    with pytest.raises(ApiError) as info:
        await c.get_webhook(wid)
    assert info.value.status == 404

    ticket = await c.create_stream_ticket()
    assert ticket.ticket
    assert ticket.expires_at > datetime.now(UTC)
    transports: tuple[StreamTransport, ...] = ("websocket", "sse")
    for transport in transports:  # no fallback: each is the operation it names
        opened = c.stream([product], transport=transport, reconnect=False)
        stream = cast("AsyncGenerator[StreamMessage]", opened)
        seen: dict[str, StreamMessage] = {}
        async with asyncio.timeout(15), contextlib.aclosing(stream):
            async for message in stream:
                seen[message.type] = message
                if {"snapshot", "subscribed"} <= set(seen):
                    break
        levels = seen["snapshot"].data["levels"]
        assert [(x["warehouse_id"], x["quantity"]) for x in levels] == [(wh, 13)], transport


async def test_every_route_through_both_clients(
    server_factory: ServerFactory, scratch_database: str
) -> None:
    """The walk through the async client, then through the sync one (each call in a
    worker thread), against a real server; the requests each client sent are matched to
    operations, which must be all of the document's."""
    receiver = Receiver()
    await receiver.start()
    server = await server_factory(
        env={
            # a database of the test's own: no other server of the session delivers its
            # webhooks (to a loopback receiver they would refuse)
            "INVENTORY_DATABASE_URL": scratch_database,
            "INVENTORY_REDIS_PREFIX": f"inventory-cl-{uuid.uuid4().hex[:8]}",
            "INVENTORY_WEBHOOK_ALLOW_PRIVATE": "true",
            "INVENTORY_WEBHOOK_RETRY_BASE": "0.2",
        }
    )
    # The WebSocket handshake is no httpx request; the walk checked the stream over it.
    over_http = set(CLIENT_METHODS) - {"openStockWebSocket"}
    try:
        async with AsyncClient(server.base_url) as c:
            sent = _Sent()
            c.http.event_hooks["request"].append(sent.async_hook)
            await _walk(c, receiver.url)
        assert sent.operations == over_http
        with Client(server.base_url) as s:
            sent = _Sent()
            s.http.event_hooks["request"].append(sent.hook)
            await _walk(cast(AsyncClient, _Awaiting(s)), receiver.url)
        assert sent.operations == over_http
        assert len(receiver.distinct()) == 4  # two changes per walk
    finally:
        await receiver.stop()


def _scripted(*outcomes: int | type[httpx.TransportError]) -> tuple[list[str], httpx.MockTransport]:
    """A transport answering each request with the next status, or raising the next error;
    returns the request paths it saw."""
    seen: list[str] = []
    pending = list(outcomes)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        outcome = pending.pop(0)
        if not isinstance(outcome, int):
            raise outcome("scripted", request=request)
        body = {"error": {"code": "unavailable", "message": "busy"}} if outcome >= 400 else LEVEL
        return httpx.Response(outcome, json=body, headers={"Retry-After": "0"})

    return seen, httpx.MockTransport(handle)


LEVEL = {"warehouse_id": "w", "quantity": 1, "reserved": 0, "available": 1, "version": 1,
         "updated_at": None}  # fmt: skip


async def test_both_clients_share_one_retry_policy() -> None:
    """503 and unsent requests are retried; a POST that may have arrived is not (no
    server: a scripted transport)."""
    for outcomes, calls, error in (
        ((503, 503, 200), 3, None),
        ((httpx.ConnectError, 200), 2, None),
        ((httpx.ReadTimeout,), 1, httpx.ReadTimeout),  # adjust may have been applied
        ((503, 503, 503), 3, ApiError),  # retries=2: the third answer is final
    ):
        seen, transport = _scripted(*outcomes)
        http = httpx.Client(transport=transport, base_url="http://localhost")
        with Client(retries=2, max_retry_wait=0.01, http=http) as c:
            if error is None:
                assert c.adjust("p", "w", 1).quantity == 1
            else:
                with pytest.raises(error):
                    c.adjust("p", "w", 1)
        assert len(seen) == calls
        seen, transport = _scripted(*outcomes)
        ahttp = httpx.AsyncClient(transport=transport, base_url="http://localhost")
        async with AsyncClient(retries=2, max_retry_wait=0.01, http=ahttp) as a:
            if error is None:
                assert (await a.adjust("p", "w", 1)).quantity == 1
            else:
                with pytest.raises(error):
                    await a.adjust("p", "w", 1)
        assert len(seen) == calls
    seen, transport = _scripted(httpx.ReadTimeout, 200)  # a PUT is harmless to repeat
    with Client(http=httpx.Client(transport=transport, base_url="http://localhost")) as c:
        assert c.set_quantity("p", "w", 1).version == 1
    assert len(seen) == 2


async def test_reserve_retries_keep_one_key(server_factory: ServerFactory) -> None:
    """A reservation retried after the server stopped answering is reserved once: the
    client sends the same Idempotency-Key on every attempt."""
    server = await server_factory()
    product, wh = _ids()
    async with AsyncClient(server.base_url, retries=40, max_retry_wait=0.5) as c:
        await c.put_warehouse(wh, wh)
        await c.adjust(product, wh, 3)
        first = await c.reserve([Line(product, 1)], idempotency_key="fixed-" + wh)
        await asyncio.to_thread(server.stop)
        restart = asyncio.create_task(asyncio.to_thread(server.start))
        again = await c.reserve([Line(product, 1)], idempotency_key="fixed-" + wh)
        await restart
        assert (again.id, again.replayed) == (first.id, True)
        assert (await c.get_stock(product)).reserved == 1


async def test_stream_resumes_with_since_after_a_restart(server_factory: ServerFactory) -> None:
    server = await server_factory()
    other = await server_factory()
    product, wh = _ids()
    seen: list[StreamMessage] = []
    async with AsyncClient(server.base_url) as c:
        await c.put_warehouse(wh, wh)
        await c.adjust(product, wh, 5)

        async def consume() -> None:
            async for message in c.stream([product]):
                seen.append(message)

        task = asyncio.create_task(consume())
        try:
            await wait_until(lambda: any(m.type == "subscribed" for m in seen), 10, "subscribed")
            await c.adjust(product, wh, 1)  # version 2
            await wait_until(
                lambda: any(m.type == "stock" and m.data["version"] == 2 for m in seen), 10, "v2"
            )
            await asyncio.to_thread(server.stop)
            mark = len(seen)
            async with AsyncClient(other.base_url) as o:  # changes while the server is down
                await o.adjust(product, wh, 1)  # version 3
                await o.adjust(product, wh, 1)  # version 4
            await asyncio.to_thread(server.start)

            def caught_up() -> bool:
                return any(
                    (m.type == "snapshot" and any(x["version"] == 4 for x in m.data["levels"]))
                    or (m.type == "stock" and m.data["version"] == 4)
                    for m in seen[mark:]
                )

            await wait_until(caught_up, 20, "version 4 after the restart")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    resumed = [m for m in seen[mark:] if m.type == "snapshot"]
    assert resumed, "the client resubscribed"
    # With since, the snapshot after the restart holds only rows newer than version 2.
    assert all(x["version"] > 2 for m in resumed for x in m.data["levels"])
    versions = [m.data["version"] for m in seen if m.type == "stock"]
    assert versions == sorted(versions)


def _levels(messages: list[StreamMessage]) -> list[tuple[str, int]]:
    """(warehouse, version) of every row the caller was given, in order."""
    rows: list[tuple[str, int]] = []
    for m in messages:
        if m.type == "snapshot":
            rows += [(x["warehouse_id"], x["version"]) for x in m.data["levels"]]
        elif m.type == "stock":
            rows.append((m.data["warehouse_id"], m.data["version"]))
    return rows


def _monotonic(rows: list[tuple[str, int]]) -> bool:
    newest: dict[str, int] = {}
    for wh, version in rows:
        if version <= newest.get(wh, 0):
            return False
        newest[wh] = version
    return True


class _NoUpgradeProxy:
    """An HTTP proxy that forwards plain requests to ``target`` but answers every
    WebSocket upgrade with 502, as some corporate proxies and load balancers do."""

    def __init__(self, target: ServerProcess) -> None:
        self.target = target
        self.refused = 0
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> _NoUpgradeProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.open:
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"upgrade: websocket" in head.lower():
                self.refused += 1
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target.port)
            up_writer.write(head)

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
                dst.close()

            self.open.add(up_writer)
            try:
                await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
            finally:
                self.open.discard(up_writer)
                up_writer.close()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()


async def _consume(c: AsyncClient, product: str, seen: list[StreamMessage], **kw: str) -> None:
    async for message in c.stream([product], max_backoff=0.5, **kw):  # type: ignore[arg-type]
        seen.append(message)


async def test_stream_falls_back_to_sse_when_a_proxy_refuses_the_upgrade(
    server_factory: ServerFactory,
) -> None:
    server = await server_factory()
    product, wh = _ids()
    seen: list[StreamMessage] = []
    async with _NoUpgradeProxy(server) as proxy, AsyncClient(proxy.base_url) as c:
        await c.put_warehouse(wh, wh)
        await c.adjust(product, wh, 5)
        task = asyncio.create_task(_consume(c, product, seen))
        try:
            await wait_until(lambda: any(m.type == "subscribed" for m in seen), 10, "subscribed")
            await c.adjust(product, wh, 2)
            await wait_until(lambda: ("stock", 2) in [(m.type, m.data.get("version"))
                                                       for m in seen], 10, "v2")  # fmt: skip
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert proxy.refused == 1, "one upgrade was tried, then the stream stayed on SSE"
    assert seen[0].type == "snapshot"
    assert [(x["warehouse_id"], x["quantity"]) for x in seen[0].data["levels"]] == [(wh, 5)]
    assert _levels(seen) == [(wh, 1), (wh, 2)]


async def test_forced_sse_stream_sends_the_token_and_refuses_a_bad_one(
    server_factory: ServerFactory,
) -> None:
    tokens = {"reader-" + uuid.uuid4().hex: ["read"], "admin-" + uuid.uuid4().hex: ["admin"]}
    reader, admin = list(tokens)
    server = await server_factory(env={"INVENTORY_TOKENS": json.dumps(tokens)})
    product, wh = _ids()

    def sync_part() -> list[StreamMessage]:
        with Client(server.base_url, admin) as a, Client(server.base_url, reader) as r:
            a.put_warehouse(wh, wh)
            a.adjust(product, wh, 3)
            got: list[StreamMessage] = []
            for message in r.stream([product], transport="sse"):
                got.append(message)
                if message.type == "subscribed":
                    a.adjust(product, wh, -1)
                if message.type == "stock":
                    break
            with Client(server.base_url, "wrong") as bad, pytest.raises(ApiError) as info:
                next(bad.stream([product], transport="sse"))
            assert (info.value.status, info.value.code) == (401, "unauthorized")
            with pytest.raises(ApiError) as info:
                next(r.stream(["bad id!"], transport="sse"))
            assert info.value.status == 422
            return got

    got = await asyncio.to_thread(sync_part)
    assert [m.type for m in got] == ["snapshot", "subscribed", "stock"]
    assert (got[2].data["quantity"], got[2].data["version"]) == (2, 2)


async def test_sse_stream_resumes_after_a_restart_without_going_back(
    server_factory: ServerFactory,
) -> None:
    """SSE has no ``since``: the reconnect's fresh snapshot re-sends every row, and the
    client drops the ones the caller has already seen, so versions only go up."""
    server = await server_factory()
    other = await server_factory()
    product, wh = _ids()
    still = "still-" + wh  # a row that does not change while the server is down
    seen: list[StreamMessage] = []
    async with AsyncClient(server.base_url) as c:
        await c.put_warehouse(wh, wh)
        await c.put_warehouse(still, still)
        await c.adjust(product, wh, 5)
        await c.adjust(product, still, 5)
        task = asyncio.create_task(_consume(c, product, seen, transport="sse"))
        try:
            await wait_until(lambda: any(m.type == "subscribed" for m in seen), 10, "subscribed")
            await c.adjust(product, wh, 1)  # version 2
            await wait_until(lambda: (wh, 2) in _levels(seen), 10, "v2")
            await asyncio.to_thread(server.stop)
            mark = len(seen)
            async with AsyncClient(other.base_url) as o:
                await o.adjust(product, wh, 1)  # version 3
                await o.adjust(product, wh, 1)  # version 4
            await asyncio.to_thread(server.start)
            await wait_until(lambda: (wh, 4) in _levels(seen[mark:]), 20, "v4 after restart")
            await c.adjust(product, wh, 1)  # version 5, live after the resume
            await wait_until(lambda: (wh, 5) in _levels(seen[mark:]), 10, "v5")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    resumed = [m for m in seen[mark:] if m.type == "snapshot"]
    assert resumed, "the client reconnected and got a fresh snapshot"
    # The unchanged row and the already seen versions were dropped from it.
    assert [(x["warehouse_id"], x["version"]) for m in resumed for x in m.data["levels"]] == [
        (wh, 4)
    ]
    assert _monotonic(_levels(seen))
    assert sorted(_levels(seen)) == sorted([(wh, 1), (still, 1), (wh, 2), (wh, 4), (wh, 5)])


def test_webhook_signature_verifier() -> None:
    body = b'{"id":"e1","type":"stock.changed"}'
    t = int(time.time())
    mac = hmac.new(b"s3cret", f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    assert verify_signature("s3cret", f"t={t},v1={mac}", body) == t
    for header, secret, payload in (
        (f"t={t},v1={mac}", "wrong", body),
        (f"t={t},v1={mac}", "s3cret", body + b" "),
        (f"t={t - 1000},v1={mac}", "s3cret", body),
        ("v1=abc", "s3cret", body),
        ("", "s3cret", body),
    ):
        with pytest.raises(SignatureError):
            verify_signature(secret, header, payload)


async def test_loadtest_seed_goes_through_the_client(server_factory: ServerFactory) -> None:
    from loadtest.seed import HOT_STOCK, PRODUCT_STOCK, WAREHOUSES, seed

    server = await server_factory()
    rows = await asyncio.to_thread(seed, server.base_url, 4)
    assert rows == (4 + 3) * len(WAREHOUSES)
    async with AsyncClient(server.base_url) as c:
        stocks = await c.get_stocks(["lt-sku-4", "lt-hot-1"])
        assert [s.quantity for s in stocks] == [
            PRODUCT_STOCK * len(WAREHOUSES), HOT_STOCK * len(WAREHOUSES),
        ]  # fmt: skip
        await c.adjust("lt-sku-4", WAREHOUSES[0], 10)
        held = await c.reserve([Line("lt-sku-4", PRODUCT_STOCK + 10, WAREHOUSES[0])])
        # Setting 500 below the 510 reserved is a 409 for that row, which seeding keeps.
        assert await asyncio.to_thread(seed, server.base_url, 4) == rows
        assert (await c.get_stock("lt-sku-4")).levels[0].quantity == PRODUCT_STOCK + 10
        assert (await c.get_reservation(held.id)).status == "active"
