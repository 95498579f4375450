"""Webhooks: registration API, signed deliveries fed from the ledger, retries, ordering,
isolation between endpoints, the SSRF guard and crash recovery.

Each test runs its own app (or server processes) on a scratch database, so no other
server of the session delivers its webhooks. The receiver is a small asyncio HTTP/1.1
server in the test whose answers the test programs (status, delay, never answering).
Waits are conditions with deadlines; ordering and isolation are checked by counts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from msgspec.structs import replace
from prometheus_client.parser import text_string_to_metric_families

from inventory.config import Settings
from inventory.ops import app as app_module
from inventory.ops.app import create_app
from inventory.service.webhooks.delivery import Dispatcher
from inventory.service.webhooks.signing import signature_header, verify
from inventory.store.webhooks import WebhookStore
from realtime.tasks import restarts
from tests.conftest import ROOT, ServerProcess, wait_until

SECRET = "whsec-0123456789-abcdefghij-TOPSECRET"


# --- the receiver ---------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self.body)
        return value

    @property
    def event_id(self) -> str:
        return self.headers["inventory-event-id"]


Behaviour = Callable[[Received], Awaitable[int]]


async def _ok(_: Received) -> int:
    return 200


@dataclass
class Receiver:
    """An HTTP/1.1 endpoint (keep-alive) that records every request it reads and answers
    with whatever ``behaviour`` returns; ``acked`` are the requests answered 2xx."""

    behaviour: Behaviour = _ok
    requests: list[Received] = field(default_factory=list)
    acked: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                assert lines[0].startswith("POST /hook "), lines[0]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(headers, body)
                self.requests.append(received)
                status = await self.behaviour(received)
                if 200 <= status < 300:
                    self.acked.append(received)
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    def distinct(self) -> list[Received]:
        """Acknowledged requests, first acknowledgement of each event id only."""
        seen: set[str] = set()
        out = []
        for r in self.acked:
            if r.event_id not in seen:
                seen.add(r.event_id)
                out.append(r)
        return out


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def make(behaviour: Behaviour = _ok) -> Receiver:
        receiver = Receiver(behaviour)
        await receiver.start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        await receiver.stop()


# --- an app of the test's own -----------------------------------------------------------


@pytest.fixture
def webhook_settings(scratch_database: str, redis_url: str) -> Settings:
    return Settings(
        database_url=scratch_database,
        redis_url=redis_url,
        redis_prefix=f"inventory-wh-{uuid.uuid4().hex[:8]}",
        sweep_interval=0.1,
        webhook_allow_private=True,
        webhook_retry_base=0.1,
        webhook_retry_max=0.4,
        webhook_concurrency=4,
    )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
            yield c


async def put_webhook(
    client: httpx.AsyncClient, url: str, events: list[str], webhook_id: str | None = None
) -> str:
    wid = webhook_id or f"wh-{uuid.uuid4().hex[:8]}"
    r = await client.put(
        f"/v1/webhooks/{wid}", json={"url": url, "events": events, "secret": SECRET}
    )
    assert r.status_code == 201, r.text
    return wid


async def stock(client: httpx.AsyncClient, product: str, warehouse: str, quantity: int) -> None:
    r = await client.put(f"/v1/products/{product}/stock/{warehouse}", json={"quantity": quantity})
    assert r.status_code == 200, r.text


async def warehouse(client: httpx.AsyncClient, wid: str = "w1") -> str:
    r = await client.put(f"/v1/warehouses/{wid}", json={"name": wid, "status": "active"})
    assert r.status_code in (200, 201), r.text
    return wid


# --- registration API ---------------------------------------------------------------------


async def test_registration_api_validates_and_never_shows_the_secret(
    webhook_settings: Settings,
) -> None:
    async with running(webhook_settings) as client:
        body = {"url": "http://127.0.0.1:9/hook", "events": ["stock.changed"], "secret": SECRET}
        r = await client.put("/v1/webhooks/orders", json=body)
        assert r.status_code == 201, r.text
        assert SECRET not in r.text
        assert "secret" not in r.json()
        assert r.json()["events"] == ["stock.changed"]
        assert r.json()["active"] is True
        r = await client.put("/v1/webhooks/orders", json={**body, "active": False})
        assert r.status_code == 200
        assert r.json()["active"] is False
        for r in (await client.get("/v1/webhooks"), await client.get("/v1/webhooks/orders")):
            assert r.status_code == 200
            assert SECRET not in r.text
        assert [w["id"] for w in (await client.get("/v1/webhooks")).json()["webhooks"]] == [
            "orders"
        ]

        bad: list[tuple[str, dict[str, Any], str]] = [
            ("bad$id", body, "webhook_id"),
            ("w", {**body, "url": "ftp://example.com/x"}, "url"),
            ("w", {**body, "url": "not a url"}, "url"),
            ("w", {**body, "url": "http://"}, "url"),
            ("w", {**body, "url": "http://example.com:99999/"}, "url"),
            ("w", {**body, "events": []}, "events"),
            ("w", {**body, "events": ["stock.nope"]}, "events[0]"),
            ("w", {**body, "secret": "short"}, "secret"),
            ("w", {**body, "secret": "has white space in it!"}, "secret"),
            ("w", {**body, "active": "yes"}, "active"),
            ("w", {**body, "extra": 1}, "extra"),
            ("w", {"url": body["url"], "events": body["events"]}, "secret"),
        ]
        for wid, payload, field_name in bad:
            r = await client.put(f"/v1/webhooks/{wid}", json=payload)
            assert r.status_code == 422, (payload, r.text)
            error = r.json()["error"]
            assert error["code"] == "validation_error"
            assert error["details"]["field"] == field_name, (payload, error)
            assert SECRET not in r.text
        r = await client.put(
            "/v1/webhooks/w", content=b"{", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_json"
        r = await client.get("/v1/webhooks/orders/deliveries?limit=0")
        assert r.status_code == 422
        assert r.json()["error"]["details"]["field"] == "limit"
        for method, path in (
            ("GET", "/v1/webhooks/nope"),
            ("DELETE", "/v1/webhooks/nope"),
            ("GET", "/v1/webhooks/nope/deliveries"),
        ):
            r = await client.request(method, path)
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "not_found"
        assert (await client.delete("/v1/webhooks/orders")).status_code == 204
        assert (await client.get("/v1/webhooks/orders")).status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://localhost:8080/hook",
        "http://10.1.2.3/hook",
        "https://192.168.1.1/hook",
        "http://172.16.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://100.64.0.1/hook",
    ],
)
async def test_private_targets_are_refused_unless_allowed(
    webhook_settings: Settings, url: str
) -> None:
    closed = replace(webhook_settings, webhook_allow_private=False)
    async with running(closed) as client:
        r = await client.put(
            "/v1/webhooks/w", json={"url": url, "events": ["stock.changed"], "secret": SECRET}
        )
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"] == {"field": "url"}
        # a public address is accepted (inactive: nothing is sent to it)
        r = await client.put(
            "/v1/webhooks/w",
            json={
                "url": "https://93.184.216.34/hook",
                "events": ["stock.changed"],
                "secret": SECRET,
                "active": False,
            },
        )
        assert r.status_code == 201, r.text


async def test_private_target_rechecked_at_delivery(
    webhook_settings: Settings, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    """A target that became private after registration (DNS rebinding) is not called."""
    receiver = await receivers()
    closed = replace(webhook_settings, webhook_allow_private=False)
    async with running(closed) as client:
        pool = await asyncpg.create_pool(closed.database_url, min_size=1, max_size=2)
        try:
            await WebhookStore(pool).put("rebound", receiver.url, ["stock.changed"], SECRET, True)
        finally:
            await pool.close()
        await stock(client, "sku-r", await warehouse(client), 5)

        async def refused() -> bool:
            r = await client.get("/v1/webhooks/rebound/deliveries")
            return any((d["error"] or "").startswith("refused") for d in r.json()["deliveries"])

        await wait_until(refused, 10, "a refused attempt in the delivery log")
        assert receiver.requests == []


# --- deliveries ----------------------------------------------------------------------------


async def test_events_are_signed_ordered_and_logged(
    webhook_settings: Settings, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    receiver = await receivers()
    events = ["stock.changed", "reservation.created", "reservation.committed",
              "reservation.released", "reservation.expired"]  # fmt: skip
    async with running(webhook_settings) as client:
        wid = await put_webhook(client, receiver.url, events)
        wh = await warehouse(client)
        await stock(client, "sku-a", wh, 10)
        r = await client.post(
            "/v1/reservations", json={"lines": [{"product_id": "sku-a", "quantity": 2}]}
        )
        first = r.json()["id"]
        assert (await client.post(f"/v1/reservations/{first}/commit")).status_code == 200
        r = await client.post(
            "/v1/reservations", json={"lines": [{"product_id": "sku-a", "quantity": 1}]}
        )
        second = r.json()["id"]
        assert (await client.post(f"/v1/reservations/{second}/release")).status_code == 200
        # 5 ledger rows (set, reserve, commit, reserve, release) + 4 reservation transitions
        await wait_until(lambda: len(receiver.distinct()) >= 9, 15, "9 events delivered")

        got = receiver.distinct()
        assert len(receiver.acked) == 9  # no retry was needed: no duplicate
        for r in got:
            payload = r.payload
            assert set(payload) == {"id", "type", "created_at", "data"}
            assert r.event_id == payload["id"]
            assert payload["created_at"].endswith("Z")
            assert r.headers["content-type"] == "application/json"
            signature = r.headers["inventory-signature"]
            assert verify(SECRET, r.body, signature)
            assert not verify("another-secret-of-some-length", r.body, signature)
            assert not verify(SECRET, r.body.replace(b"sku-a", b"sku-b"), signature)
            assert not verify(SECRET, r.body, signature, now=int(signature[2:12]) + 3600)
        # per product in ledger order: versions 1..5 of the stock row
        changes = [r.payload["data"] for r in got if r.payload["type"] == "stock.changed"]
        assert [c["version"] for c in changes] == [1, 2, 3, 4, 5]
        assert [c["event"] for c in changes] == [
            "adjusted", "reserved", "committed", "reserved", "released"
        ]  # fmt: skip
        expected = {"type": "stock", "product_id": "sku-a", "warehouse_id": wh, "quantity": 10}
        assert changes[1] == {**changes[1], **expected, "reserved": 2, "available": 8}
        transitions = [(r.payload["type"], r.payload["data"]["id"], r.payload["data"]["status"])
                       for r in got if r.payload["type"] != "stock.changed"]  # fmt: skip
        assert transitions == [
            ("reservation.created", first, "active"),
            ("reservation.committed", first, "committed"),
            ("reservation.created", second, "active"),
            ("reservation.released", second, "released"),
        ]
        types = [r.payload["type"] for r in got]
        assert types.index("reservation.created") == types.index("stock.changed") + 2

        await wait_until(lambda: _has(delivery_log(client, wid), 9), 10, "nine attempts logged")
        r = await client.get(f"/v1/webhooks/{wid}/deliveries?limit=5")
        page = r.json()
        assert SECRET not in r.text
        assert len(page["deliveries"]) == 5
        assert page["next_after"]
        rest = (
            await client.get(f"/v1/webhooks/{wid}/deliveries?after={page['next_after']}")
        ).json()
        log = page["deliveries"] + rest["deliveries"]
        assert len(log) == 9
        assert rest["next_after"] is None
        assert [d["event_id"] for d in log] == [r.event_id for r in reversed(receiver.acked)]
        assert all(d["status_code"] == 200 and d["attempt"] == 1 for d in log)
        assert all(d["error"] is None and d["next_retry_at"] is None for d in log)

        # a webhook registered now receives only what happens from now on
        late = await receivers()
        await put_webhook(client, late.url, ["stock.changed"])
        await stock(client, "sku-a", wh, 20)
        await wait_until(lambda: len(late.acked) >= 1 and len(receiver.distinct()) >= 10, 15,
                         "the new change reaches both webhooks")  # fmt: skip
        assert [r.payload["data"]["version"] for r in late.acked] == [6]

        metrics = (await client.get("/metrics")).text
        assert (
            f'inventory_webhook_attempts_total{{outcome="success",webhook_id="{wid}"}}' in metrics
        )
        assert "127.0.0.1" not in metrics
        assert SECRET not in metrics


async def test_failing_receiver_gets_retries_with_backoff_then_delivery(
    webhook_settings: Settings, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    calls = 0

    async def flaky(_: Received) -> int:
        nonlocal calls
        calls += 1
        return 503 if calls <= 3 else 200

    receiver = await receivers(flaky)
    async with running(webhook_settings) as client:
        wid = await put_webhook(client, receiver.url, ["stock.changed"])
        wh = await warehouse(client)
        await stock(client, "sku-f", wh, 1)
        await stock(client, "sku-f", wh, 2)
        await wait_until(lambda: len(receiver.acked) >= 2, 15, "both events acknowledged")
        versions = [r.payload["data"]["version"] for r in receiver.requests]
        # the first event was tried until it succeeded; the second waited for it
        assert versions == [1, 1, 1, 1, 2]
        assert len({r.event_id for r in receiver.requests[:4]}) == 1  # the same id each time

        # the receiver counts an answer before the server has read and recorded it
        await wait_until(lambda: _has(delivery_log(client, wid), 5), 10, "five attempts logged")
        log = await delivery_log(client, wid)
        assert [(d["attempt"], d["status_code"]) for d in reversed(log)] == [
            (1, 503), (2, 503), (3, 503), (4, 200), (1, 200)
        ]  # fmt: skip
        for d in log:
            if d["status_code"] == 503:
                assert d["error"] == "HTTP 503"
                assert d["next_retry_at"] is not None
                delay = datetime.fromisoformat(d["next_retry_at"]) - datetime.fromisoformat(d["at"])
                base, most = webhook_settings.webhook_retry_base, webhook_settings.webhook_retry_max
                cap = min(most, base * 2 ** (d["attempt"] - 1))
                # Capped; not bounded below: ``at`` is when the attempt was logged,
                # which on a busy machine can come after a short retry time.
                assert delay.total_seconds() <= cap + 0.05


async def test_event_given_up_after_the_retry_window_unblocks_the_product(
    webhook_settings: Settings, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    async def refuse_v1(r: Received) -> int:
        return 500 if r.payload["data"]["version"] == 1 else 200

    receiver = await receivers(refuse_v1)
    short = replace(webhook_settings, webhook_retry_window=1.0)
    async with running(short) as client:
        wid = await put_webhook(client, receiver.url, ["stock.changed"])
        wh = await warehouse(client)
        await stock(client, "sku-g", wh, 1)
        await stock(client, "sku-g", wh, 2)
        await wait_until(
            lambda: len(receiver.acked) >= 1, 15, "the second event after the first gave up"
        )
        assert [r.payload["data"]["version"] for r in receiver.acked] == [2]
        log = (await client.get(f"/v1/webhooks/{wid}/deliveries")).json()["deliveries"]
        failed = [d for d in log if d["status_code"] == 500]
        assert failed
        assert failed[0]["next_retry_at"] is None


async def test_a_dead_endpoint_does_not_delay_another(
    webhook_settings: Settings, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    never = asyncio.Event()

    async def hang(_: Received) -> int:
        await never.wait()
        return 200

    dead = await receivers(hang)
    alive = await receivers()
    async with running(webhook_settings) as client:
        await put_webhook(client, dead.url, ["stock.changed"], "dead")
        await put_webhook(client, alive.url, ["stock.changed"], "alive")
        wh = await warehouse(client)
        for round_ in range(4):
            for p in range(5):
                await stock(client, f"sku-{p}", wh, round_ + 1)
        await wait_until(
            lambda: len(alive.distinct()) >= 20, 20, "all 20 events at the live endpoint"
        )
        # the dead endpoint saw at most the first event of each product: the rest waits
        assert dead.acked == []
        assert len({r.event_id for r in dead.requests}) <= 5
        assert {r.payload["data"]["version"] for r in dead.requests} == {1}


# --- supervision ----------------------------------------------------------------------------


class _BrokenCleanup(Dispatcher):
    """A dispatcher whose first cleanup after losing its lease session raises once it
    has cleaned up (a bug): the error escapes its loop and ends the task."""

    failed = 0

    async def _release_all(self) -> None:
        held = self._session is not None
        await super()._release_all()
        if held and not self.failed:
            type(self).failed += 1
            raise asyncpg.InterfaceError("cleanup bug")


KILL_LEASE_HOLDERS = """
SELECT coalesce(array_agg(pg_terminate_backend(pid)), '{}') FROM pg_locks
WHERE locktype = 'advisory' AND classid = 16048 AND objsubid = 2 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""  # the sessions holding webhook leases (lock class 0x3EB0) of this database


async def test_dispatcher_is_restarted_and_counted_when_its_loop_ends(
    webhook_settings: Settings,
    receivers: Callable[..., Awaitable[Receiver]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The webhook dispatcher runs supervised: when an error escapes its loop (here its
    cleanup after its lease session was killed) it is restarted, counted in
    ``inventory_task_restarts_total``, takes the lease again and delivers on."""
    monkeypatch.setattr(app_module, "Dispatcher", _BrokenCleanup)
    monkeypatch.setattr(_BrokenCleanup, "failed", 0)
    receiver = await receivers()
    before = restarts["webhook-dispatcher"]
    async with running(webhook_settings) as client:
        await put_webhook(client, receiver.url, ["stock.changed"])
        wh = await warehouse(client)
        await stock(client, "sku-s", wh, 1)
        await wait_until(lambda: len(receiver.distinct()) == 1, 10, "the first delivery")
        admin = await asyncpg.connect(webhook_settings.database_url)
        try:
            assert await admin.fetchval(KILL_LEASE_HOLDERS) == [True]
        finally:
            await admin.close()
        await wait_until(lambda: _BrokenCleanup.failed == 1, 10, "the loop to fail")
        await wait_until(
            lambda: restarts["webhook-dispatcher"] == before + 1, 5, "the dispatcher restarted"
        )
        await stock(client, "sku-s", wh, 2)
        await wait_until(lambda: len(receiver.distinct()) == 2, 10, "a delivery after it")
        assert [r.payload["data"]["version"] for r in receiver.distinct()] == [1, 2]
        metrics = (await client.get("/metrics")).text
        assert 'inventory_task_restarts_total{task="webhook-dispatcher"}' in metrics


# --- crash recovery with real server processes ---------------------------------------------


async def test_kill_9_mid_delivery_loses_nothing_and_keeps_order(
    scratch_database: str, redis_url: str, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    async def slow(_: Received) -> int:
        await asyncio.sleep(0.05)
        return 200

    receiver = await receivers(slow)
    env = _process_env(scratch_database, redis_url)
    first, second = ServerProcess(env), ServerProcess(env)
    try:
        await asyncio.to_thread(first.start)
        async with httpx.AsyncClient(base_url=first.base_url, timeout=10) as client:
            await put_webhook(client, receiver.url, ["stock.changed"], "crash")
            wh = await warehouse(client)
            products = [f"sku-k{p}" for p in range(6)]
            for q in range(1, 9):
                await asyncio.gather(*(stock(client, p, wh, q) for p in products))
        await wait_until(lambda: len(receiver.requests) >= 12, 20, "deliveries under way")
        first.kill()
        assert len(receiver.distinct()) < 48  # killed mid-delivery
        await asyncio.to_thread(second.start)
        await wait_until(lambda: len(receiver.distinct()) >= 48, 30, "all 48 events after restart")

        got = receiver.distinct()
        assert len(got) == 48
        for p in products:
            versions = [
                r.payload["data"]["version"] for r in got if r.payload["data"]["product_id"] == p
            ]
            assert versions == list(range(1, 9)), (p, versions)
        duplicates = len(receiver.requests) - 48
        # only events whose outcome the killed process had not recorded were sent again:
        # at most its in-flight attempts (INVENTORY_WEBHOOK_CONCURRENCY)
        assert duplicates <= 4, duplicates
        for server in (first, second):
            assert SECRET not in server.log.read_text()
    finally:
        first.kill()
        await asyncio.to_thread(second.stop)
        for server in (first, second):
            server.log.unlink(missing_ok=True)


def _process_env(database_url: str, redis_url: str) -> dict[str, str]:
    """The environment of delivering server processes on the test's own database (and
    Redis prefix), with short retries and 4 requests in flight per endpoint."""
    return {
        **os.environ,
        "INVENTORY_DATABASE_URL": database_url,
        "INVENTORY_REDIS_URL": redis_url,
        "INVENTORY_REDIS_PREFIX": f"inventory-wh-{uuid.uuid4().hex[:8]}",
        "INVENTORY_TOKENS": "",
        "INVENTORY_WEBHOOK_ALLOW_PRIVATE": "true",
        "INVENTORY_WEBHOOK_RETRY_BASE": "0.2",
        "INVENTORY_WEBHOOK_CONCURRENCY": "4",
        "INVENTORY_LOG_LEVEL": "debug",
    }


async def _attempts(server: ServerProcess, webhook_id: str) -> int:
    """The delivery attempts for ``webhook_id`` that ``server``'s process made."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "inventory_webhook_attempts_total"
            and sample.labels.get("webhook_id") == webhook_id
        )
    )


async def test_two_processes_deliver_through_one_deliverer_at_a_time(
    scratch_database: str, redis_url: str, receivers: Callable[..., Awaitable[Receiver]]
) -> None:
    """Two server processes up at once, changes written through both: every event is
    delivered once, by the one process holding the endpoint's lease, and a product's
    next event is never sent while its previous one is in flight. When that process
    stops, the other takes over and carries on in order."""
    in_flight: Counter[str] = Counter()
    overlaps: list[tuple[str, int]] = []

    async def exclusive(r: Received) -> int:
        data = r.payload["data"]
        in_flight[data["product_id"]] += 1
        if in_flight[data["product_id"]] > 1:
            overlaps.append((data["product_id"], data["version"]))
        await asyncio.sleep(0.02)  # a slow endpoint: attempts overlap if anything lets them
        in_flight[data["product_id"]] -= 1
        return 200

    receiver = await receivers(exclusive)
    env = _process_env(scratch_database, redis_url)
    servers = [ServerProcess(env), ServerProcess(env)]
    products = [f"sku-t{p}" for p in range(6)]

    async def write(rounds: range, via: list[ServerProcess]) -> None:
        """Set every product to each ``q`` of ``rounds``, the rounds alternating between
        ``via``'s processes (products in parallel, a product's rounds in order)."""
        for q in rounds:
            async with httpx.AsyncClient(base_url=via[q % len(via)].base_url, timeout=10) as c:
                await asyncio.gather(*(stock(c, p, "w1", q) for p in products))

    try:
        for server in servers:
            await asyncio.to_thread(server.start)
        async with httpx.AsyncClient(base_url=servers[0].base_url, timeout=10) as client:
            await put_webhook(client, receiver.url, ["stock.changed"], "both")
            await warehouse(client)
            await write(range(1, 9), servers)
            # recorded, not only answered: nothing is left for a takeover to send again
            await wait_until(
                lambda: _has(delivery_log(client, "both", 1000), 48), 30, "48 attempts logged"
            )
        by_process = [await _attempts(s, "both") for s in servers]
        assert sorted(by_process) == [0, 48], by_process  # one process made every attempt
        holder, other = servers if by_process[0] else servers[::-1]

        await asyncio.to_thread(holder.stop)
        await write(range(9, 11), [other])
        await wait_until(lambda: len(receiver.distinct()) >= 60, 30, "the rounds after the stop")

        got = receiver.distinct()
        assert len(got) == 60
        for p in products:
            data = [r.payload["data"] for r in got]
            assert [d["version"] for d in data if d["product_id"] == p] == list(range(1, 11)), p
        assert overlaps == []

        async def taken_over() -> bool:  # counted just after the answer arrives
            return await _attempts(other, "both") >= 12

        await wait_until(taken_over, 10, "the other process's 12 attempts")
        assert await _attempts(other, "both") == 12
        assert len(receiver.requests) == 60  # nothing failed, so nothing was sent twice
    finally:
        for server in servers:
            await asyncio.to_thread(server.stop)
            server.log.unlink(missing_ok=True)


async def delivery_log(
    client: httpx.AsyncClient, wid: str, limit: int = 100
) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/webhooks/{wid}/deliveries", params={"limit": limit})
    deliveries: list[dict[str, Any]] = r.json()["deliveries"]
    return deliveries


async def _has(entries: Awaitable[list[dict[str, Any]]], count: int) -> bool:
    return len(await entries) >= count


def test_signature_header_round_trip() -> None:
    body = b'{"id":"x"}'
    header = signature_header(SECRET, body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert verify(SECRET, body, header, now=1_700_000_010)
    assert not verify(SECRET, body, header, now=1_700_001_000)  # too old
    assert not verify(SECRET, body + b" ", header, now=1_700_000_010)
    assert not verify(SECRET, body, "t=1700000000", now=1_700_000_010)
    assert not verify(SECRET, body, "garbage", now=1_700_000_010)


# --- the verification code of docs/webhooks.md ----------------------------------------------

# Appended to the JavaScript snippet: verify each case of a JSON array on standard input
# ({secret, body: base64, header}) and print the results as a JSON array.
_JS_CASES = """
const cases = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(
  cases.map((c) => verify(c.secret, Buffer.from(c.body, "base64"), c.header))));
"""


def _documented(language: str) -> str:
    """The one ``language`` code block of docs/webhooks.md's "Verifying the signature"."""
    text = (ROOT / "docs" / "webhooks.md").read_text()
    section = text[text.index("## Verifying the signature") :]
    section = section[: section.find("\n## ", 1)]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, (language, len(blocks))
    return str(blocks[0])


@pytest.mark.parametrize("language", ["python", "js"])
async def test_documented_verifiers_accept_a_real_delivery_and_refuse_forgeries(
    webhook_settings: Settings, receivers: Callable[..., Awaitable[Receiver]], language: str
) -> None:
    """The Python and JavaScript snippets of docs/webhooks.md, run as written, accept the
    signature of a delivery the server made (a body with non-ASCII bytes, so the raw
    body must be what is signed) and refuse a tampered body, another secret and a
    replayed old signature."""
    node = shutil.which("node")
    if language == "js" and node is None:
        pytest.skip("node is not installed")
    receiver = await receivers()
    async with running(webhook_settings) as client:
        await put_webhook(client, receiver.url, ["reservation.created"])
        await stock(client, "sku-doc", await warehouse(client), 3)
        lines = [{"product_id": "sku-doc", "quantity": 1}]
        r = await client.post("/v1/reservations", json={"lines": lines, "reference": "été-✓"})
        assert r.status_code == 201, r.text
        await wait_until(lambda: len(receiver.acked) >= 1, 15, "the delivery")
    body, header = receiver.acked[0].body, receiver.acked[0].headers["inventory-signature"]
    assert "été-✓".encode() in body  # raw UTF-8, as sent
    cases = [
        (SECRET, body, header),
        (SECRET, body.replace("été".encode(), b"ete"), header),
        ("another-secret-0123456789", body, header),
        (SECRET, body, signature_header(SECRET, body, int(time.time()) - 3600)),
    ]
    code = _documented(language)
    if language == "python":
        namespace: dict[str, Any] = {}
        exec(compile(code, "docs/webhooks.md", "exec"), namespace)
        results = [namespace["verify"](secret, raw, signed) for secret, raw, signed in cases]
    else:
        assert node is not None
        given = [
            {"secret": secret, "body": base64.b64encode(raw).decode(), "header": signed}
            for secret, raw, signed in cases
        ]
        done = await asyncio.to_thread(
            subprocess.run,
            [node, "-e", code + _JS_CASES],
            input=json.dumps(given), capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout)
    assert results == [True, False, False, False]
