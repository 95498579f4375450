"""``inventory demo``: seed demo data and run a bounded shopper load against a running server.

It talks to one server, the ``--url`` given (default ``http://127.0.0.1:8000``), over the
public HTTP API only, through the typed client :mod:`inventory.client`:

1. seeds ``--warehouses`` warehouses (``PUT /v1/warehouses/{id}``) and ``--products``
   products with stock in each (``PUT /v1/products/{p}/stock/{w}``);
2. prints the dashboard URL with ``?products=...``;
3. for ``--duration`` seconds, shoppers arrive at about ``--rate`` per second (at most
   ``--concurrency`` at once); each reserves one to three units of a product (popular ones
   more often) with a short TTL, thinks, then commits, releases, or walks away and lets the
   reservation expire. A restocker tops up products that run low. One summary line per
   second.

The load is bounded in time and concurrency and stops by itself. An unreachable server or
a refused token ends with one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import httpx

from ..client import ApiError, AsyncClient, Line

__all__ = ["DemoError", "build_parser", "main", "product_ids", "warehouse_ids"]

T = TypeVar("T")

PRODUCT_NAMES = (
    "tee-black-m", "tee-white-l", "hoodie-grey-m", "cap-navy", "mug-classic", "socks-3pack",
    "jeans-32-32", "sneaker-42", "backpack-20l", "bottle-750ml", "scarf-wool", "beanie-red",
    "jacket-rain-l", "shorts-khaki", "belt-leather", "gloves-m", "umbrella-compact",
    "notebook-a5", "pen-gel-blue", "tote-canvas",
)  # fmt: skip
WAREHOUSES = (
    ("demo-east", "East fulfilment centre", "Leipzig"),
    ("demo-west", "West fulfilment centre", "Rotterdam"),
    ("demo-south", "South hub", "Milan"),
    ("demo-north", "North hub", "Malmö"),
    ("demo-central", "Central store", "Vienna"),
)
MAX_PRODUCTS = 500  # one GET /v1/stock, and what the dashboard shows comfortably
MAX_DURATION = 3600.0
# What a shopper does after reserving: (weight, outcome).
OUTCOMES = ((0.6, "commit"), (0.25, "release"), (0.15, "abandon"))


class DemoError(Exception):
    """A failure reported as one line and exit status 1."""


def product_ids(count: int) -> list[str]:
    """The demo's product ids: readable names first, then numbered ones."""
    ids = [f"demo-{name}" for name in PRODUCT_NAMES[:count]]
    ids += [f"demo-item-{n:03d}" for n in range(len(ids) + 1, count + 1)]
    return ids


def warehouse_ids(count: int) -> list[str]:
    return [w[0] for w in WAREHOUSES[:count]]


@dataclass
class Window:
    """Counters for one second of the run (and, summed, for the whole run)."""

    reserved: int = 0
    sold_out: int = 0
    committed: int = 0
    released: int = 0
    abandoned: int = 0
    late: int = 0  # commit/release after the reservation had already expired
    restocked: int = 0
    errors: int = 0
    limited: int = 0  # flash sale: refused by the purchase limit
    waiting: int = 0  # flash sale: joined the waitlist
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Window) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    def p95_ms(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000

    def line(self, elapsed: float) -> str:
        p95 = self.p95_ms()
        return (
            f"[{elapsed:5.0f}s] reserved {self.reserved}/s"
            f" | committed {self.committed} | released {self.released}"
            f" | left to expire {self.abandoned} | sold out {self.sold_out}"
            f" | restocked {self.restocked} | errors {self.errors}"
            f" | reserve p95 {'-' if p95 is None else f'{p95:.0f} ms'}"
            + (f" | over limit {self.limited} | joined waitlist {self.waiting}"
               if self.limited or self.waiting else "")
        )  # fmt: skip


class Demo:
    def __init__(self, client: AsyncClient, args: argparse.Namespace) -> None:
        self.client = client
        self.args = args
        self.random = random.Random(args.seed)
        self.products = product_ids(args.products)
        self.warehouses = warehouse_ids(args.warehouses)
        # A long tail: the first products are much more popular than the last.
        self.weights = [1 / (rank + 1) ** 0.8 for rank in range(len(self.products))]
        self.window = Window()
        self.total = Window()
        self.last_ok = time.monotonic()
        self.tasks: set[asyncio.Task[None]] = set()
        self.failure: DemoError | None = None

    # --- HTTP -------------------------------------------------------------------------

    async def call(self, what: str, request: Awaitable[T]) -> T:
        """Run one client call: an unreachable server or a refused token is a
        :class:`DemoError`; other API errors (:class:`ApiError`) are the caller's."""
        try:
            result = await request
        except httpx.TransportError as exc:
            raise DemoError(
                f"cannot reach the server at {self.args.url} ({type(exc).__name__}: {exc})"
            ) from None
        except ApiError as exc:
            if exc.status in (401, 403):
                raise DemoError(
                    f"the server refused the token for {what} ({exc.status} {exc.code}); "
                    "pass --token with the admin scope"
                ) from None
            if exc.status < 500:
                self.last_ok = time.monotonic()
            raise
        self.last_ok = time.monotonic()
        return result

    # --- seeding ----------------------------------------------------------------------

    async def check_reachable(self) -> None:
        if not await self.call("GET /health", self.client.health()):
            raise DemoError(f"{self.args.url} does not look like an inventory server")

    async def seed(self) -> None:
        for warehouse_id, name, location in WAREHOUSES[: self.args.warehouses]:
            await _expect(
                self.call(
                    "PUT /v1/warehouses",
                    self.client.put_warehouse(warehouse_id, name, "active", location),
                ),
                f"creating warehouse {warehouse_id}",
            )
        semaphore = asyncio.Semaphore(8)

        async def stock(product_id: str, warehouse_id: str, quantity: int) -> None:
            async with semaphore:
                # 409: an earlier run still holds more reserved than this count; keep it.
                await _expect(
                    self.call(
                        "PUT stock", self.client.set_quantity(product_id, warehouse_id, quantity)
                    ),
                    f"stocking {product_id} in {warehouse_id}",
                    allow=(409,),
                )

        await asyncio.gather(
            *(
                stock(p, w, self.random.randint(20, 120))
                for p in self.products
                for w in self.warehouses
            )
        )

    # --- load -------------------------------------------------------------------------

    async def shopper(self) -> None:
        product_id = self.random.choices(self.products, self.weights)[0]
        quantity = self.random.choice((1, 1, 1, 2, 2, 3))
        ttl = self.random.randint(2, 6)
        started = time.perf_counter()
        try:
            reservation = await self.call(
                "POST /v1/reservations",
                self.client.reserve(
                    [Line(product_id, quantity)],
                    ttl_seconds=ttl,
                    reference=f"demo-order-{self.random.getrandbits(32):08x}",
                ),
            )
        except ApiError as exc:
            self.window.latencies.append(time.perf_counter() - started)
            if exc.status == 409:
                self.window.sold_out += 1
            else:
                self.window.errors += 1
            return
        self.window.latencies.append(time.perf_counter() - started)
        self.window.reserved += 1
        outcome = self.random.choices([o for _, o in OUTCOMES], [w for w, _ in OUTCOMES])[0]
        if outcome == "abandon":
            self.window.abandoned += 1  # the server expires it within ttl + 2 s
            return
        await asyncio.sleep(self.random.uniform(0.2, ttl * 0.6))
        finish = self.client.commit if outcome == "commit" else self.client.release
        try:
            await self.call(f"POST {outcome}", finish(reservation.id))
        except ApiError as exc:
            if exc.status == 409:
                self.window.late += 1
            else:
                self.window.errors += 1
            return
        if outcome == "commit":
            self.window.committed += 1
        else:
            self.window.released += 1

    async def restocker(self, deadline: float) -> None:
        """Every half second, top up the products that are running low."""
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            chunk = self.products[:MAX_PRODUCTS]
            try:
                stocks = await self.call("GET /v1/stock", self.client.get_stocks(chunk))
            except ApiError:
                self.window.errors += 1
                continue
            for product in stocks:
                for level in product.levels:
                    if level.available < 8 and self.random.random() < 0.5:
                        delta = self.random.randint(20, 60)
                        try:
                            await self.call(
                                "POST adjustments",
                                self.client.adjust(
                                    product.product_id, level.warehouse_id, delta,
                                    reason="restock",
                                ),
                            )  # fmt: skip
                        except ApiError:
                            self.window.errors += 1
                        else:
                            self.window.restocked += 1

    def spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, DemoError):
            self.failure = exc
        elif exc is not None:
            self.window.errors += 1

    async def run(self, out: Any) -> Window:
        start = time.monotonic()
        deadline = start + self.args.duration
        restock = asyncio.create_task(self.restocker(deadline))
        next_report = start + 1.0
        next_arrival = start
        try:
            while (now := time.monotonic()) < deadline:
                if restock.done():
                    restock.result()  # raises what stopped the restocker
                if self.failure is not None:
                    raise self.failure
                if now - self.last_ok > 5.0:
                    raise DemoError(f"the server at {self.args.url} stopped answering")
                while next_arrival <= now and len(self.tasks) < self.args.concurrency:
                    self.spawn(self.shopper())
                    next_arrival += self.random.expovariate(self.args.rate)
                if next_arrival <= now:  # at the concurrency cap: drop the backlog
                    next_arrival = now
                if now >= next_report:
                    print(self.window.line(now - start), file=out, flush=True)
                    self.total.add(self.window)
                    self.window = Window()
                    next_report += 1.0
                await asyncio.sleep(min(0.02, max(0.0, deadline - now)))
            # Let shoppers in their think time finish (bounded by the longest TTL).
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=4.0)
            if self.failure is not None:
                raise self.failure
        finally:
            restock.cancel()
            for task in list(self.tasks):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, DemoError):
                await restock
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.total.add(self.window)
        return self.total


class FlashSaleDemo(Demo):
    """``--flash-sale``: one hot product with a purchase limit and a waitlist.

    ``flash-drop`` gets ``--flash-units`` units and ``max_per_customer`` 2. Thousands of
    simulated buyers (a new customer id each) ask 1-2 units; one in ten is a bot reusing
    one of 20 customer ids to get past the limit. A buyer refused for stock joins the
    waitlist (one unit, held 30 s) one time in four; a fifth of the winners release
    their reservation after a moment, and a restock arrives halfway, so the queue is
    served while the sale runs. The summary line counts limit refusals and waitlist
    joins; run ``inventory check`` afterwards: no customer holds more than the limit.
    """

    PRODUCT = "flash-drop"

    def __init__(self, client: AsyncClient, http: httpx.AsyncClient, args: argparse.Namespace):
        super().__init__(client, args)
        self.http = http
        self.products = [self.PRODUCT]
        self.weights = [1.0]

    async def seed(self) -> None:
        for warehouse_id, name, location in WAREHOUSES[: self.args.warehouses]:
            await _expect(
                self.call("PUT /v1/warehouses",
                          self.client.put_warehouse(warehouse_id, name, "active", location)),
                f"creating warehouse {warehouse_id}",
            )  # fmt: skip
        share = self.args.flash_units // len(self.warehouses)
        for warehouse_id in self.warehouses:
            await _expect(
                self.call("PUT stock", self.client.set_quantity(self.PRODUCT, warehouse_id, share)),
                f"stocking {self.PRODUCT}",
                allow=(409,),
            )
        await _expect(
            self.call(
                "PUT /v1/products", self.client.put_product(self.PRODUCT, max_per_customer=2)
            ),
            "setting the purchase limit",
        )

    async def shopper(self) -> None:
        bot = self.random.random() < 0.1
        customer = (
            f"bot-{self.random.randrange(20)}" if bot else f"buyer-{self.random.getrandbits(40):x}"
        )
        started = time.perf_counter()
        try:
            reservation = await self.call(
                "POST /v1/reservations",
                self.client.reserve(
                    [Line(self.PRODUCT, self.random.choice((1, 1, 2)))],
                    ttl_seconds=60,
                    customer_id=customer,
                ),
            )
        except ApiError as exc:
            self.window.latencies.append(time.perf_counter() - started)
            if exc.code == "purchase_limit_exceeded":
                self.window.limited += 1
            elif exc.code == "insufficient_stock":
                self.window.sold_out += 1
                if self.random.random() < 0.25:
                    await self._join(customer)
            else:
                self.window.errors += 1
            return
        self.window.latencies.append(time.perf_counter() - started)
        self.window.reserved += 1
        if self.random.random() < 0.2:
            await asyncio.sleep(self.random.uniform(0.5, 2.0))
            with contextlib.suppress(ApiError):
                await self.call("POST release", self.client.release(reservation.id))
                self.window.released += 1

    async def _join(self, customer: str) -> None:
        body = {"customer_id": customer, "quantity": 1, "hold_seconds": 30}
        try:
            answer = await self.http.post(f"/v1/products/{self.PRODUCT}/waitlist", json=body)
        except httpx.TransportError as exc:
            raise DemoError(f"cannot reach the server at {self.args.url} ({exc})") from None
        if answer.status_code == 201:
            self.window.waiting += 1
        elif answer.status_code != 409:  # 409: already waiting, or over the limit
            self.window.errors += 1

    async def restocker(self, deadline: float) -> None:
        """One restock halfway through: the queue is served before new buyers."""
        await asyncio.sleep(max(0.0, (deadline - time.monotonic()) / 2))
        try:
            delta = max(1, self.args.flash_units // 5)
            await self.call(
                "POST adjustments",
                self.client.adjust(self.PRODUCT, self.warehouses[0], delta, reason="flash restock"),
            )
            self.window.restocked += 1
        except ApiError:
            self.window.errors += 1


async def _expect(request: Awaitable[object], what: str, allow: Sequence[int] = ()) -> None:
    try:
        await request
    except ApiError as exc:
        if exc.status not in allow:
            raise DemoError(f"{what} failed: {exc.status} {exc.code}") from None


async def _main(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    http = httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=5.0, limits=limits, trust_env=False
    )
    async with AsyncClient(
        args.url, args.token, retries=2, max_retry_wait=1.0, http=http
    ) as client:
        demo = FlashSaleDemo(client, http, args) if args.flash_sale else Demo(client, args)
        await demo.check_reachable()
        await demo.seed()
        dashboard = f"{args.url}/?products={','.join(demo.products)}"
        print(
            f"seeded {len(demo.warehouses)} warehouses and {len(demo.products)} products "
            f"at {args.url}",
            flush=True,
        )
        print(f"dashboard: {dashboard}", flush=True)
        print(
            f"running ~{args.rate:g} shoppers/s for {args.duration:g}s "
            f"(at most {args.concurrency} at once)",
            flush=True,
        )
        total = await demo.run(sys.stdout)
        print(
            f"done: {total.reserved} reserved, {total.committed} committed, "
            f"{total.released} released, {total.abandoned} left to expire, "
            f"{total.sold_out} sold out, {total.restocked} restocks, {total.errors} errors",
            flush=True,
        )
        print(f"dashboard: {dashboard}", flush=True)
    return 0


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected http://host[:port], got {text!r}")
    if parts.query or parts.fragment or parts.path not in ("", "/"):
        raise argparse.ArgumentTypeError(f"expected the server's base URL only, got {text!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
    return f"{parts.scheme}://{parts.netloc}"


def _bounded(kind: type[int] | type[float], lo: float, hi: float) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A wrong option is one line on stderr (and status 2), like the other commands."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="inventory demo",
        description="Seed demo warehouses and products into a running server and run a "
        "bounded simulated shopper load (reserve, then commit, release or let expire; "
        "restock when low), printing one summary line per second and the dashboard URL.",
    )
    parser.add_argument(
        "--url", type=_url, default="http://127.0.0.1:8000",
        help="the server's base URL (default http://127.0.0.1:8000)",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=_bounded(float, 0.5, MAX_DURATION), default=60.0,
        help="seconds of load (default 60, at most 3600)",
    )  # fmt: skip
    parser.add_argument(
        "--products", type=_bounded(int, 1, MAX_PRODUCTS), default=12,
        help=f"demo products to seed (default 12, at most {MAX_PRODUCTS})",
    )  # fmt: skip
    parser.add_argument(
        "--warehouses", type=_bounded(int, 1, len(WAREHOUSES)), default=3,
        help=f"demo warehouses to seed (default 3, at most {len(WAREHOUSES)})",
    )  # fmt: skip
    parser.add_argument(
        "--rate", type=_bounded(float, 0.1, 2000), default=40.0,
        help="shoppers arriving per second (default 40)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=_bounded(int, 1, 256), default=32,
        help="shoppers active at once, at most (default 32)",
    )  # fmt: skip
    parser.add_argument(
        "--token", default=None,
        help="API token with the admin scope (seeding) and reserve scope (the load)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")
    parser.add_argument(
        "--flash-sale", action="store_true",
        help="flash-sale mode: one product with a purchase limit and a waitlist, buyers and bots",
    )  # fmt: skip
    parser.add_argument(
        "--flash-units", type=_bounded(int, 1, 1_000_000), default=1000,
        help="units of the flash-sale product (default 1000)",
    )  # fmt: skip
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except DemoError as exc:
        print(f"inventory demo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
