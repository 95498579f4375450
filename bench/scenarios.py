"""The HTTP scenarios: what each client sends, the data they need, how success is counted.

Data (seeded through the HTTP API, the same in the pgbench database): one warehouse
``wh-1``; products ``sku-1`` .. ``sku-<products>`` with 1,000,000 units each; ``hot``
with 10^9 units (it cannot sell out during a run); ``soldout`` with none.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from bench.loadgen import Client, Session

__all__ = ["HOT", "SCENARIOS", "SOLD_OUT", "WAREHOUSE", "Scenario", "seed"]

WAREHOUSE = "wh-1"
HOT = "hot"
SOLD_OUT = "soldout"
QUANTITY = 1_000_000
HOT_QUANTITY = 1_000_000_000

_RESERVE = b"/v1/reservations"


def _one_line(product: bytes) -> bytes:
    return b'{"lines":[{"product_id":"%s","quantity":1}]}' % product


def _spread(products: int) -> Session:
    async def session(client: Client, index: int) -> None:
        body = _one_line(b"sku-%d" % random.randint(1, products))
        await client.request(b"POST", _RESERVE, body, label="reserve")

    return session


def _fixed(product: str) -> Callable[[int], Session]:
    body = _one_line(product.encode())

    def make(products: int) -> Session:
        async def session(client: Client, index: int) -> None:
            await client.request(b"POST", _RESERVE, body, label="reserve")

        return session

    return make


def _multi_line(products: int) -> Session:
    """Five lines, products spread a fifth of the catalogue apart (always distinct)."""
    stride = products // 5

    async def session(client: Client, index: int) -> None:
        n = random.randrange(products)
        lines = b",".join(
            b'{"product_id":"sku-%d","quantity":1}' % ((n + k * stride) % products + 1)
            for k in range(5)
        )
        await client.request(b"POST", _RESERVE, b'{"lines":[%s]}' % lines, label="reserve")

    return session


def _reservation_id(body: bytes) -> bytes:
    """The ``id`` of a reservation answer (the first field, so usually a slice)."""
    if body.startswith(b'{"id":"'):
        return body[7:43]
    return str(msgspec.json.decode(body)["id"]).encode()


def _cycle(products: int) -> Session:
    """Reserve one unit, then commit it; the pair is also recorded as ``cycle``."""

    async def session(client: Client, index: int) -> None:
        began = time.perf_counter()
        body = _one_line(b"sku-%d" % random.randint(1, products))
        status, answer = await client.request(b"POST", _RESERVE, body, label="reserve")
        if status != 201:
            return
        path = b"/v1/reservations/%s/commit" % _reservation_id(answer)
        status, _ = await client.request(b"POST", path, label="commit")
        if client.recorder is not None:
            client.recorder.record("cycle", status, began, time.perf_counter())

    return session


def _stock_read(products: int) -> Session:
    async def session(client: Client, index: int) -> None:
        path = b"/v1/products/sku-%d/stock" % random.randint(1, products)
        await client.request(b"GET", path, label="read")

    return session


@dataclass(frozen=True)
class Scenario:
    """One HTTP scenario and how to read its result.

    ``label`` / ``ok`` pick the requests that count as throughput (e.g. 201 reserves);
    ``shape`` names the bare-endpoint request its HTTP-overhead ceiling uses and
    ``per_unit`` how many such requests one unit of work takes. A paced scenario
    (``rate``) drives the bare endpoint at the same pace.
    """

    name: str
    clients: int
    make: Callable[[int], Session]
    label: str
    ok: int
    writes: bool
    strategy_dependent: bool
    shape: str  # "post" or "get"
    per_unit: int
    summary: str
    rate: float | None = None  # paced (open loop) at this many units/s; None: closed loop


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("spread", 64, _spread, "reserve", 201, True, True, "post", 1,
                 "1-line reservations over 10,000 products"),
        Scenario("hot", 128, _fixed(HOT), "reserve", 201, True, True, "post", 1,
                 "1-line reservations of one product (stock never runs out)"),
        Scenario("sold-out", 128, _fixed(SOLD_OUT), "reserve", 409, True, True, "post", 1,
                 "1-line reservations of a product with nothing left: refusals"),
        Scenario("sold-out-paced", 128, _fixed(SOLD_OUT), "reserve", 409, True, True, "post", 1,
                 "the same refusals at a steady 2,000/s: latency without a queue", 2000),
        Scenario("cycle", 64, _cycle, "cycle", 200, True, True, "post", 2,
                 "reserve one unit, then commit it (rate in cycles)"),
        Scenario("multi-line", 64, _multi_line, "reserve", 201, True, True, "post", 1,
                 "5-line reservations over 10,000 products"),
        Scenario("stock-read", 64, _stock_read, "read", 200, False, False, "get", 1,
                 "GET /v1/products/{id}/stock over 10,000 products"),
    )
}  # fmt: skip

BARE_SESSIONS: dict[str, Callable[[int], Session]] = {"post": _spread, "get": _stock_read}


async def seed(host: str, port: int, products: int, concurrency: int = 32) -> None:
    """Create the warehouse and every product's stock through the HTTP API."""
    client = Client(host, port)
    status, body = await client.request(
        b"PUT", b"/v1/warehouses/" + WAREHOUSE.encode(), b'{"name":"bench","status":"active"}'
    )
    client.close()
    if status not in (200, 201):
        raise RuntimeError(f"creating the warehouse answered {status}: {body[:200]!r}")
    todo = [(f"sku-{n}", QUANTITY) for n in range(1, products + 1)]
    todo += [(HOT, HOT_QUANTITY), (SOLD_OUT, 0)]
    queue = iter(todo)

    async def worker() -> None:
        client = Client(host, port)
        try:
            for product, quantity in queue:
                path = f"/v1/products/{product}/stock/{WAREHOUSE}".encode()
                status, body = await client.request(b"PUT", path, b'{"quantity":%d}' % quantity)
                if status != 200:
                    raise RuntimeError(f"seeding {product} answered {status}: {body[:200]!r}")
        finally:
            client.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
