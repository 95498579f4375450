"""Micro-benchmarks of the code every reservation and every stock message runs through.

Run: ``pytest bench/test_micro.py`` (not collected by the normal suite, whose testpaths
is ``tests/``). Each benchmark also asserts its result, so a fast wrong answer fails.

They answer "how much of a request's budget is our own Python": at ~1,000-5,000
reservations/s per worker a request has 200-1000 us in all, and these pieces should stay
a few microseconds each.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import msgspec
import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from starlette.types import Message

from inventory.config import Settings
from inventory.domain.model import (
    RequestedLine,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockLevel,
    Warehouse,
    WarehouseStatus,
    allocate,
)
from inventory.http.api import reservation_out
from inventory.http.schemas import ReserveIn, decode
from inventory.ops.app import create_app, tune_gc
from inventory.service.inventory import InventoryService

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
RID = uuid.UUID(int=42)
WAREHOUSES = {
    f"wh-{i}": Warehouse(f"wh-{i}", f"Warehouse {i}", None, WarehouseStatus.ACTIVE)
    for i in range(3)
}


def _levels(products: list[str]) -> list[StockLevel]:
    return [
        StockLevel(p, w, quantity=1000 + 10 * i, reserved=5, version=7, updated_at=NOW)
        for p in products
        for i, w in enumerate(WAREHOUSES)
    ]


def test_stock_level_reserve(benchmark: BenchmarkFixture) -> None:
    level = StockLevel("sku-1", "wh-1", quantity=1000, reserved=10, version=3, updated_at=NOW)
    new, movement = benchmark(level.reserve, 2, RID)
    assert (new.reserved, new.version, movement.reserved_delta) == (12, 4, 2)


@pytest.mark.parametrize("lines", [1, 5])
def test_allocate(benchmark: BenchmarkFixture, lines: int) -> None:
    """Allocation over 3 warehouses per product, 1 or 5 unpinned lines."""
    products = [f"sku-{i}" for i in range(lines)]
    requested = [RequestedLine(p, 3) for p in products]
    levels = _levels(products)
    allocation = benchmark(allocate, requested, levels, WAREHOUSES)
    assert [x.warehouse_id for x in allocation.lines] == ["wh-2"] * lines


@pytest.mark.parametrize("lines", [1, 5])
def test_decode_reservation_body(benchmark: BenchmarkFixture, lines: int) -> None:
    """JSON parse plus schema conversion (``schemas.decode``), as the API does per request."""
    body = msgspec.json.encode(
        {
            "lines": [{"product_id": f"sku-{i}", "quantity": 1} for i in range(lines)],
            "ttl_seconds": 600,
            "reference": "order-123",
        }
    )
    parsed, raw = benchmark(decode, body, ReserveIn)
    assert len(parsed.lines) == lines
    assert raw["ttl_seconds"] == 600


def test_encode_reservation_response(benchmark: BenchmarkFixture) -> None:
    reservation = Reservation(
        RID,
        ReservationStatus.ACTIVE,
        (ReservationLine("sku-1", "wh-1", 2),),
        "order-123",
        NOW,
        NOW,
    )

    def encode() -> bytes:
        return msgspec.json.encode(reservation_out(reservation))

    body = benchmark(encode)
    assert body.startswith(b'{"id":"')


class _Reserved:
    """A service whose ``reserve`` answers at once: what is left is the HTTP layer."""

    async def reserve(self, *args: Any) -> Reservation:
        return Reservation(
            RID, ReservationStatus.ACTIVE, (ReservationLine("sku-1", "wh-1", 2),), None, NOW, NOW
        )


@pytest.mark.parametrize("tokens", [True, False], ids=["token", "loopback"])
def test_reserve_request_through_the_app(benchmark: BenchmarkFixture, tokens: bool) -> None:
    """100 ``POST /v1/reservations`` through the whole ASGI app (middleware, guards,
    routing, the scope check, body decoding and encoding) with a service that answers at
    once: the server's own per-request cost, without the network and the database."""
    token = b"bench-token"
    granted = {hashlib.sha256(token).hexdigest(): frozenset({"read", "reserve"})}
    app = create_app(Settings(tokens=granted if tokens else {}))
    app.state.runtime.service = cast(InventoryService, _Reserved())
    body = b'{"lines":[{"product_id":"sku-1","quantity":2}],"ttl_seconds":600}'
    headers = [
        (b"host", b"localhost:8000"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *([(b"authorization", b"Bearer " + token)] if tokens else []),
    ]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/reservations", "raw_path": b"/v1/reservations",
        "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    request: Message = {"type": "http.request", "body": body, "more_body": False}
    statuses: list[int] = []

    async def receive() -> Message:
        return request

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def hundred() -> None:
        for _ in range(100):
            await app(dict(scope), receive, send)

    tune_gc()  # as in a server process
    loop = asyncio.new_event_loop()
    try:
        benchmark(lambda: loop.run_until_complete(hundred()))
    finally:
        loop.close()
    assert set(statuses) == {201}


def test_conflation_offer_and_pop(benchmark: BenchmarkFixture) -> None:
    """One update through a subscriber's conflation buffer: offer, then pop."""
    conflation = pytest.importorskip("realtime.conflation")
    buffer = conflation.ConflationBuffer(4096)
    buffer.hold("sku-1")
    buffer.release("sku-1", {"wh-1": 0})
    version = iter(range(1, 10**9))

    def offer_pop() -> str | None:
        buffer.offer("sku-1", "wh-1", next(version), "message")
        return buffer.pop()  # type: ignore[no-any-return]

    assert benchmark(offer_pop) == "message"


def test_conflation_burst(benchmark: BenchmarkFixture) -> None:
    """A slow client: 100 updates of 10 rows arrive, 10 messages leave (conflated)."""
    conflation = pytest.importorskip("realtime.conflation")
    buffer = conflation.ConflationBuffer(4096)
    buffer.hold("sku-1")
    buffer.release("sku-1", {})
    version = iter(range(1, 10**9))

    def burst() -> int:
        for _ in range(10):
            v = next(version)
            for w in range(10):
                buffer.offer("sku-1", f"wh-{w}", v, "message")
        sent = 0
        while buffer.pop() is not None:
            sent += 1
        return sent

    assert benchmark(burst) == 10


def test_encode_stock_message(benchmark: BenchmarkFixture) -> None:
    """The ``stock`` WebSocket message, encoded once per change (not per client)."""
    protocol = pytest.importorskip("realtime.protocol")

    def encode() -> bytes:
        return protocol.encode_stock(  # type: ignore[no-any-return]
            product_id="sku-1",
            warehouse_id="wh-1",
            quantity=1000,
            reserved=12,
            version=13,
            event="reserved",
            ts=1767322800.123,
        )

    message = benchmark(encode)
    assert b'"available":988' in message
