"""``inventory.client`` against real server processes: every route, retries, the stream."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid

import httpx
import pytest

from inventory.client import (
    ApiError,
    AsyncClient,
    BulkItem,
    Client,
    Line,
    SignatureError,
    StreamMessage,
    verify_signature,
)

from .conftest import ServerFactory, ServerProcess, wait_until


def _ids() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"cl-{tag}", f"clw-{tag}"


async def test_every_route(server_factory: ServerFactory) -> None:
    server = await server_factory()
    product, wh = _ids()

    def sync_part() -> None:
        with Client(server.base_url) as c:
            assert c.health()
            assert c.put_warehouse(wh, "Main", location="Here").location == "Here"
            assert c.get_warehouse(wh).name == "Main"
            assert wh in [w.id for w in c.list_warehouses()]
            level = c.adjust(product, wh, 10, reason="receive")
            assert (level.quantity, level.version) == (10, 1)
            assert c.set_quantity(product, wh, 12, expected_version=1).version == 2
            with pytest.raises(ApiError) as info:
                c.set_quantity(product, wh, 1, expected_version=1)
            assert (info.value.status, info.value.code) == (409, "version_conflict")
            assert info.value.details == {"current_version": 2}
            assert c.get_stock(product).available == 12
            assert [s.product_id for s in c.get_stocks([product])] == [product]
            page = c.movements(product)
            assert [m.version for m in page.items] == [1, 2]
            r = c.reserve([Line(product, 2)], ttl_seconds=60, reference="order-1")
            assert (r.status, r.lines[0].warehouse_id, r.replayed) == ("active", wh, False)
            assert c.get_reservation(r.id).reference == "order-1"
            assert c.extend(r.id, 120).status == "active"
            assert c.commit(r.id).status == "committed"
            assert c.commit(r.id).status == "committed"  # repeating answers 200
            r2 = c.reserve([{"product_id": product, "quantity": 1}], idempotency_key="k-" + wh)
            again = c.reserve([{"product_id": product, "quantity": 1}], idempotency_key="k-" + wh)
            assert (again.id, again.replayed) == (r2.id, True)
            assert c.release(r2.id).status == "released"
            listed = c.list_reservations(reference="order-1")
            assert [x.id for x in listed.items] == [r.id]
            kit = c.put_product(product + "-kit", components=[{"product_id": product,
                                                               "quantity": 2}])  # fmt: skip
            assert kit.components is not None
            assert kit.components[0].quantity == 2
            assert kit.stock is not None  # a kit's stock body
            assert (kit.stock.kit, kit.stock.reservable, kit.stock.levels) == (True, 5, [])
            assert kit.stock.components is not None
            part = kit.stock.components[0]
            assert (part.product_id, part.quantity) == (product, 2)
            assert part.stock is not None
            assert part.stock.available == 10
            assert c.get_stock(product + "-kit") == kit.stock
            assert c.put_product(product, name="Tee", safety_stock=1).stock is not None
            assert c.get_product(product).name == "Tee"
            ids = [
                p.product_id for p in c.iter_products(limit=2) if p.product_id.startswith(product)
            ]
            assert ids == [product, product + "-kit"]
            results = c.bulk([BulkItem(product, wh, delta=1), BulkItem(product, wh, delta=-999)])
            assert [x.status for x in results] == [200, 409]
            assert results[1].error is not None
            assert results[1].error.code == "insufficient_stock"
            with pytest.raises(ApiError) as info:
                c.get_stock("no-such-" + product)
            assert info.value.status == 404

    await asyncio.to_thread(sync_part)

    async with AsyncClient(server.base_url) as c:
        assert await c.health()
        assert (await c.get_warehouse(wh)).id == wh
        assert (await c.adjust(product, wh, 5)).quantity == 16
        r = await c.reserve([Line(product, 1, wh)])
        assert (await c.get_reservation(r.id)).status == "active"
        assert (await c.release(r.id)).status == "released"
        assert (await c.list_reservations(status="released", reference=None)).items
        assert (await c.get_product(product)).safety_stock == 1
        assert [p.product_id async for p in c.iter_products()]
        first = await c.movements(product, after=0, limit=1)
        assert first.next_after == first.items[0].id
        assert first.items[0].quantity == 10


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
