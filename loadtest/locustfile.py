"""Locust load test: shoppers reserving stock, dashboards watching it, an admin restocking.

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 60s \\
        --host http://127.0.0.1:8000

then ``inventory check`` against the same database: the invariants must hold.

Users (weights give the mix; ``AdminUser`` is always exactly one):

* ``ShopperUser``: reserves 1-3 units of one product (a fifth of the time one of the few
  hot products) with an ``Idempotency-Key``, then commits (50 %), releases (35 %) or
  abandons it with a 2 s TTL so the server's sweeper expires it (15 %). One reservation
  in 20 is sent twice with the same key and body, and the replay must return the same
  reservation. ``409`` (sold out) and ``503`` (contention, retry later) are outcomes the
  API promises, not failures: they are reported under their own names
  (``reserve [409]``) so their share is visible.
* ``WatcherUser``: one WebSocket on ``/v1/ws`` subscribed to the hot products and a few
  random ones; each ``stock`` message is reported as a ``WS stock delay`` request whose
  response time is receipt time minus the message's ``ts`` (the change's commit-side
  timestamp), i.e. change-to-screen latency.
* ``FlashSaleUser``: a flash-sale crowd, bots included, on ``flash-drop`` (1,000 units,
  ``max_per_customer`` 2, a waitlist); see the class.
* ``AdminUser``: restocks a hot product every few seconds (``POST .../adjustments``).

Guard rails: only loopback hosts are accepted, and a headless run needs ``--run-time``.
The catalogue is seeded on ``test_start`` (:mod:`loadtest.seed`, through
:mod:`inventory.client`) unless ``--no-seed``. The HTTP users send their requests
with Locust's ``HttpUser`` client, not :mod:`inventory.client`, on purpose: Locust's
statistics (rates, percentiles, failures per request name) are fed by that client's
request events, and a user must see every 409 and 503 as it came (the typed client would
retry a 503 and raise on a 409 without Locust recording either).
Locust runs on gevent; the WebSocket client is ``websockets.sync.client``, whose
background reader thread becomes a greenlet under Locust's monkey-patching.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar, cast

from locust import HttpUser, User, between, constant, events, task
from locust.env import Environment
from locust.event import EventHook
from locust.runners import WorkerRunner
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from loadtest.seed import WAREHOUSES, hot_products, is_loopback_url, products, seed

EXPECTED = {409, 503}  # refusals the API promises under load

_Handler = TypeVar("_Handler", bound=Callable[..., None])


def _listener(hook: EventHook) -> Callable[[_Handler], _Handler]:
    """``hook.add_listener`` as a typed decorator (Locust's event hooks are untyped)."""
    return cast(Callable[[_Handler], _Handler], hook.add_listener)


def _fire(hook: EventHook, **kwargs: Any) -> None:
    """``hook.fire(**kwargs)`` through a typed call (Locust's ``fire`` is untyped)."""
    cast(Callable[..., None], hook.fire)(**kwargs)


@_listener(events.init_command_line_parser)
def _options(parser: Any) -> None:
    parser.add_argument("--catalog-size", type=int, default=200, help="products to seed/use")
    parser.add_argument("--no-seed", action="store_true", help="skip seeding the catalogue")
    parser.add_argument("--token", default="", help="bearer token (admin scope) if required")


def _options_of(environment: Environment) -> Any:
    return environment.parsed_options


@_listener(events.init)
def _guard(environment: Environment, **_: Any) -> None:
    """Refuse non-loopback targets and unbounded headless runs before anything starts."""
    options = _options_of(environment)
    if options is None:
        return
    if options.host and not is_loopback_url(options.host):
        raise SystemExit(f"refusing to load {options.host}: targets must be 127.0.0.1")
    if options.headless and not options.run_time:
        raise SystemExit("a headless load test needs --run-time (-t), e.g. -t 60s")


@_listener(events.test_start)
def _seed(environment: Environment, **_: Any) -> None:
    options = _options_of(environment)
    host = environment.host or ""
    if not is_loopback_url(host):
        raise SystemExit(f"refusing to load {host!r}: targets must be 127.0.0.1")
    if isinstance(environment.runner, WorkerRunner) or (options and options.no_seed):
        return
    started = time.monotonic()
    rows = seed(host, options.catalog_size if options else 200, (options and options.token) or None)
    print(f"seeded {rows} stock rows in {time.monotonic() - started:.1f}s")


def _catalog(user: User) -> tuple[list[str], list[str]]:
    options = _options_of(user.environment)
    return products(options.catalog_size if options else 200), hot_products()


def _headers(user: User) -> dict[str, str]:
    options = _options_of(user.environment)
    token = options.token if options else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


class ShopperUser(HttpUser):
    weight = 10
    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        self.products, self.hot = _catalog(self)
        self.headers = _headers(self)

    def _reserve(self, body: dict[str, Any], key: str, name: str) -> dict[str, Any] | None:
        """POST a reservation; returns its body on 201, None on an expected refusal."""
        headers = {**self.headers, "Idempotency-Key": key}
        with self.client.post(
            "/v1/reservations", json=body, headers=headers, name=name, catch_response=True
        ) as answer:
            answer.request_meta["name"] = f"{name} [{answer.status_code}]"
            if answer.status_code == 201:
                return answer.json()  # type: ignore[no-any-return]
            if answer.status_code in EXPECTED:
                answer.success()
            else:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
        return None

    def _finish(self, reservation_id: str, action: str) -> None:
        with self.client.post(
            f"/v1/reservations/{reservation_id}/{action}",
            headers=self.headers,
            name=action,
            catch_response=True,
        ) as answer:
            answer.request_meta["name"] = f"{action} [{answer.status_code}]"
            if answer.status_code == 200 or answer.status_code in EXPECTED:
                answer.success()
            else:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")

    @task
    def shop(self) -> None:
        product = random.choice(self.hot if random.random() < 0.2 else self.products)
        outcome = random.choices(("commit", "release", "abandon"), (50, 35, 15))[0]
        body: dict[str, Any] = {
            "lines": [{"product_id": product, "quantity": random.randint(1, 3)}],
            "ttl_seconds": 2 if outcome == "abandon" else 300,
            "reference": f"locust-{uuid.uuid4().hex[:12]}",
        }
        key = uuid.uuid4().hex
        reservation = self._reserve(body, key, "reserve")
        if reservation is None:
            return
        if random.random() < 0.05:  # a client that lost the answer retries
            replay = self._reserve(body, key, "reserve replay")
            if replay is not None and replay["id"] != reservation["id"]:
                _fire(
                    events.request,
                    request_type="CHECK",
                    name="idempotent replay",
                    response_time=0,
                    response_length=0,
                    exception=AssertionError("a replay created a second reservation"),
                )
        if outcome != "abandon":
            self._finish(reservation["id"], outcome)


class WatcherUser(User):
    """A dashboard: one WebSocket, subscribed to the hot products and some others."""

    weight = 2
    wait_time = constant(0)

    def on_start(self) -> None:
        catalog, hot = _catalog(self)
        self.product_ids = hot + random.sample(catalog, min(5, len(catalog)))
        self.url = (self.host or "").replace("http", "ws", 1).rstrip("/") + "/v1/ws"
        self.ws: ClientConnection | None = None
        self.stack = contextlib.ExitStack()  # owns the open connection

    def on_stop(self) -> None:
        self._drop()

    def _drop(self) -> None:
        self.ws = None
        self.stack.close()

    def _fire(self, name: str, ms: float, size: int, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="WS", name=name, response_time=ms, response_length=size,
            exception=error, context={},
        )  # fmt: skip

    def _connect(self) -> ClientConnection:
        started = time.perf_counter()
        ws = self.stack.enter_context(
            connect(self.url, open_timeout=10, close_timeout=1, additional_headers=_headers(self))
        )
        ws.send(json.dumps({"op": "subscribe", "product_ids": self.product_ids}))
        self._fire("connect+subscribe", (time.perf_counter() - started) * 1000, 0, None)
        return ws

    @task
    def watch(self) -> None:
        try:
            if self.ws is None:
                self.ws = self._connect()
            raw = self.ws.recv(timeout=1.0)
        except TimeoutError:
            return
        except (ConnectionClosed, InvalidHandshake, OSError) as exc:
            reason = (
                f"handshake refused: HTTP {exc.response.status_code}"
                if isinstance(exc, InvalidStatus)
                else type(exc).__name__
            )
            self._fire("connection", 0, 0, RuntimeError(reason))
            self._drop()
            time.sleep(1)
            return
        message = json.loads(raw)
        kind = message.get("type")
        if kind == "stock":
            delay_ms = max(0.0, (time.time() - float(message["ts"])) * 1000)
            self._fire("stock delay", delay_ms, len(raw), None)
        elif kind == "error":
            self._fire("error message", 0, len(raw), RuntimeError(str(message)[:200]))


FLASH = "flash-drop"
FLASH_UNITS = 1000


class FlashSaleUser(HttpUser):
    """A flash-sale crowd on one product with ``max_per_customer`` 2 and a waitlist.

    Customers ask 1-2 units once in a while; one user in five is a bot spreading 20
    customer ids over many requests to get past the limit. A refusal for stock joins
    the waitlist one time in ten. ``purchase_limit_exceeded``, ``insufficient_stock``
    and ``already_waiting`` (409) are promised refusals, reported under their codes;
    ``inventory check`` afterwards verifies that no customer holds more than the limit.
    The product is set up once per Locust process (1,000 units on the first warehouse).
    """

    weight = 5
    wait_time = between(0.05, 0.5)
    _ready = False

    def on_start(self) -> None:
        self.headers = _headers(self)
        self.bot = random.random() < 0.2
        self.customer = f"locust-{uuid.uuid4().hex[:10]}"
        if not FlashSaleUser._ready:
            FlashSaleUser._ready = True
            self.client.put(f"/v1/products/{FLASH}/stock/{WAREHOUSES[0]}",
                            json={"quantity": FLASH_UNITS}, headers=self.headers,
                            name="flash setup")  # fmt: skip
            self.client.put(f"/v1/products/{FLASH}", json={"max_per_customer": 2},
                            headers=self.headers, name="flash setup")  # fmt: skip

    def _post(self, path: str, body: dict[str, Any], name: str) -> str:
        """POST and report under the status and error code; returns the error code
        (``""`` on success)."""
        with self.client.post(
            path, json=body, headers=self.headers, name=name, catch_response=True
        ) as answer:
            code = ""
            if answer.status_code == 409:
                code = " " + answer.json()["error"]["code"]
            answer.request_meta["name"] = f"{name} [{answer.status_code}{code}]"
            if answer.status_code in (200, 201) or answer.status_code in EXPECTED:
                answer.success()
            else:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
            return code.strip()

    @task
    def buy(self) -> None:
        # A shopper user stands for many buyers (a new customer most of the time).
        if self.bot:
            customer = f"bot-{random.randrange(20)}"
        elif random.random() < 0.8:
            customer = f"locust-{uuid.uuid4().hex[:10]}"
        else:
            customer = self.customer
        body = {"lines": [{"product_id": FLASH, "quantity": random.randint(1, 2)}],
                "customer_id": customer, "ttl_seconds": 30}  # fmt: skip
        refused = self._post("/v1/reservations", body, "flash reserve")
        if refused == "insufficient_stock" and random.random() < 0.1:
            self._post(f"/v1/products/{FLASH}/waitlist",
                       {"customer_id": customer, "quantity": 1, "hold_seconds": 30},
                       "flash waitlist")  # fmt: skip


class AdminUser(HttpUser):
    """Restocks hot products so the shoppers keep finding some."""

    fixed_count = 1
    wait_time = between(2, 4)

    def on_start(self) -> None:
        _, self.hot = _catalog(self)
        self.headers = _headers(self)

    @task
    def restock(self) -> None:
        product = random.choice(self.hot)
        warehouse = random.choice(WAREHOUSES)
        self.client.post(
            f"/v1/products/{product}/stock/{warehouse}/adjustments",
            json={"delta": random.randint(10, 30), "reason": "locust restock"},
            headers=self.headers,
            name="restock",
        )
