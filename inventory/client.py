"""A typed Python client for the inventory server: sync (:class:`Client`) and async
(:class:`AsyncClient`), typed answers (msgspec Structs), a live stock stream that resumes,
and a webhook signature verifier. Core dependencies only (httpx, msgspec, websockets).

The two classes are typed facades over one core: every route is built once
(``_Calls``: method, path, body, how the answer decodes), and the retry policy
(``_Retries``) and the stream's resume policy (``_Resume``) are shared; a class only
does the I/O, blocking or awaited. Every operation of ``/openapi.json`` has a method in
both (``tests/test_client.py`` maps each ``operationId`` to one and walks them all
against a server). The models mirror the server's answers field for field; the client
imports nothing of the server, so this file can be copied into another program alone.

Policy on retries (both classes):

- a 503 (``contention`` / ``unavailable``) is retried after its ``Retry-After`` (capped
  by ``max_retry_wait``), up to ``retries`` times: the server wrote nothing;
- a request that never reached the server (connection refused, DNS) is retried the same
  way; one that may have reached it (a read timeout, a dropped connection) is retried
  only when repeating it is harmless: reads, PUTs, commit, release, extend, stream
  tickets, and reservations and waitlist joins, which always carry an
  ``Idempotency-Key`` (one is generated per call when none is given, and the same key is
  sent on every attempt, so a retry can never reserve or queue twice; a replay is marked
  ``replayed``). Adjustments and bulk changes (not idempotent) and deletes and waitlist
  cancels (a repeat would answer 404/409 for what succeeded) are not;
- ``ready()`` returns the readiness body for a 503 too (it says which check failed);
- anything else raises :class:`ApiError` with the server's ``code``, ``message`` and
  ``details``.

The stream (:meth:`Client.stream` / :meth:`AsyncClient.stream`) subscribes over
WebSocket with the ``Authorization`` header and remembers the newest version of every
(product, warehouse) it has seen; after a disconnect (a server restart included) it
reconnects with backoff and subscribes with ``since``, so the server sends only rows that
changed meanwhile and the caller never sees a version go backwards.

SSE fallback: with ``transport="auto"`` (the default) a WebSocket handshake answered with
an HTTP status other than 101 and other than 401/403/422 (a proxy that refuses the
upgrade: 400, 426, 502...) switches the stream to ``GET /v1/stream`` (Server-Sent
Events, same messages, same ``Authorization`` header) for the rest of its life, since
the same proxy would refuse again; ``transport="sse"`` uses it from the start,
``transport="websocket"`` never. SSE has no ``since``: a reconnect starts with fresh
snapshots, and the client drops the snapshot rows and ``stock`` messages not newer than
what it has already yielded, so the caller sees the same monotonic versions as over
WebSocket. 401/403/422 at either handshake raise :class:`ApiError` (retrying cannot help).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, cast
from urllib.parse import quote

import httpx
import msgspec
from msgspec import Struct
from websockets.asyncio.client import connect as ws_aconnect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect as ws_connect

__all__ = [
    "ApiError",
    "AsyncClient",
    "BulkItem",
    "BulkResult",
    "Client",
    "Component",
    "Delivery",
    "KitComponentStock",
    "Level",
    "Line",
    "Movement",
    "Page",
    "Product",
    "ProductStock",
    "Readiness",
    "ReadyChecks",
    "Reservation",
    "SignatureError",
    "StreamMessage",
    "StreamTicket",
    "StreamTransport",
    "WaitlistEntry",
    "WaitlistLength",
    "Warehouse",
    "Webhook",
    "WebhookEvent",
    "verify_signature",
]

T = TypeVar("T")

StreamTransport = Literal["auto", "websocket", "sse"]
WebhookEvent = Literal[
    "stock.changed", "stock.low", "stock.out", "stock.back", "reservation.created",
    "reservation.committed", "reservation.released", "reservation.expired",
    "waitlist.offered",
]  # fmt: skip

# --- models -----------------------------------------------------------------------------


class Warehouse(Struct):
    id: str
    name: str
    location: str | None
    status: str


class Level(Struct):
    warehouse_id: str
    quantity: int
    reserved: int
    available: int
    version: int
    updated_at: datetime | None


class ProductStock(Struct):
    """A stock body: a product's totals and levels, or a kit's (``kit`` true: only
    ``reservable`` and its ``components``' bodies; a kit has no rows)."""

    product_id: str
    quantity: int = 0
    reserved: int = 0
    available: int = 0
    reservable: int = 0
    levels: list[Level] = []
    low_stock: bool = False  # reservable <= the product's low_stock_threshold
    kit: bool = False
    components: list[KitComponentStock] | None = None


class KitComponentStock(Struct):
    product_id: str
    quantity: int  # units per kit
    stock: ProductStock | None  # None while the component has no stock row


class Component(Struct):
    product_id: str
    quantity: int


class Product(Struct):
    product_id: str
    name: str | None
    safety_stock: int
    low_stock_threshold: int | None
    max_per_customer: int | None
    components: list[Component] | None
    stock: ProductStock | None


class Line(Struct, omit_defaults=True):
    """A reservation line; ``warehouse_id`` None lets the server allocate. In answers,
    ``kit_id`` names the kit a line was expanded from (never sent)."""

    product_id: str
    quantity: int
    warehouse_id: str | None = None
    kit_id: str | None = None


class Reservation(Struct):
    id: str
    status: str
    lines: list[Line]
    reference: str | None
    created_at: datetime
    expires_at: datetime
    replayed: bool = False  # answered from a stored Idempotency-Key record


class WaitlistEntry(Struct):
    """A waitlist entry: ``waiting`` (``position`` 1 is the head), ``offered`` (its
    reservation is ``reservation_id``) or ``cancelled``."""

    id: str
    product_id: str
    customer_id: str
    quantity: int
    status: str
    position: int | None
    reservation_id: str | None
    created_at: datetime
    replayed: bool = False  # answered from a stored Idempotency-Key record


class WaitlistLength(Struct):
    product_id: str
    waiting: int  # entries waiting
    units: int  # their quantities added up: what new reservations cannot take


class Webhook(Struct):
    """A registered webhook (its secret is write-only: never in an answer)."""

    id: str
    url: str
    events: list[str]
    active: bool
    created_at: datetime
    updated_at: datetime


class Delivery(Struct):
    """One delivery attempt of the log; ``next_retry_at`` None: no retry follows."""

    id: int
    event_id: str
    type: str
    attempt: int
    status_code: int | None
    error: str | None
    at: datetime
    next_retry_at: datetime | None


class StreamTicket(Struct):
    """A single-use credential for a browser's stream (``?ticket=``), valid 30 s."""

    ticket: str
    expires_at: datetime


class ReadyChecks(Struct):
    postgres: bool
    redis: bool


class Readiness(Struct):
    status: str  # "ready" or "unavailable"
    checks: ReadyChecks


class Movement(Struct):
    id: int
    product_id: str
    warehouse_id: str
    kind: str
    quantity_delta: int
    reserved_delta: int
    quantity: int
    reserved: int
    version: int
    reservation_id: str | None
    reason: str | None
    created_at: datetime


class BulkItem(Struct, omit_defaults=True):
    """An adjustment (``delta``) or a set (``quantity``) for ``POST /v1/stock/bulk``."""

    product_id: str
    warehouse_id: str
    delta: int | None = None
    quantity: int | None = None
    expected_version: int | None = None
    reason: str | None = None


class ErrorBody(Struct):
    code: str
    message: str
    details: Any = None


class BulkResult(Struct):
    index: int
    status: int
    level: Level | None = None
    error: ErrorBody | None = None


class _Warehouses(Struct):
    warehouses: list[Warehouse]


class _Movements(Struct):
    movements: list[Movement]
    next_after: int | None


class _Products(Struct):
    products: list[Product]
    next_after: str | None


class _Reservations(Struct):
    reservations: list[Reservation]
    next_after: str | None


class _Stocks(Struct):
    products: list[ProductStock]
    missing: list[str]


class _Bulk(Struct):
    results: list[BulkResult]


class _Waitlist(Struct):
    entries: list[WaitlistEntry]
    next_after: int | None


class _WaitlistLengths(Struct):
    waitlists: list[WaitlistLength]


class _Webhooks(Struct):
    webhooks: list[Webhook]


class _Deliveries(Struct):
    deliveries: list[Delivery]
    next_after: str | None


class _Error(Struct):
    error: ErrorBody


class Page(Struct, Generic[T]):
    """One page of a listing and the ``after`` of the next one (None: the last page)."""

    items: list[T]
    next_after: Any


class ApiError(Exception):
    """The server answered with an error (``status``, ``code``, ``message``, ``details``)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


# --- stream messages -------------------------------------------------------------------


class StreamMessage(Struct):
    """A message of the live stream: ``type`` and the rest as sent (see docs/websocket.md).

    ``stock`` messages carry ``product_id``, ``warehouse_id``, ``quantity``, ``reserved``,
    ``available``, ``version``, ``event``, ``ts``; ``snapshot`` messages ``product_id``
    and ``levels``.
    """

    type: str
    data: dict[str, Any]


# --- calls: every route, built once for both clients ------------------------------------


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """What one API method sends and how its answer decodes (``decode``, then ``pick``
    for the part the method returns); run by either client's ``_run``.

    ``decode`` is the JSON body's type, ``str`` for a text body, or ``None`` for no
    body (204). ``answer_503``: a 503 is this route's answer (readiness), not a
    refusal to retry.
    """

    method: str
    path: str
    decode: type[Any] | None
    json: Any = None
    params: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    retry_unsent_only: bool = False  # not harmless to repeat once it may have arrived
    pick: Callable[[Any], T] | None = None
    answer_503: bool = False

    def request(self) -> dict[str, Any]:
        """The arguments of ``http.request``."""
        return {
            "method": self.method,
            "url": self.path,
            "json": self.json,
            "params": self.params,
            "headers": self.headers,
        }

    def result(self, response: httpx.Response) -> T:
        if response.status_code >= 400 and not (self.answer_503 and response.status_code == 503):
            raise _api_error(response)
        if self.decode is None:
            return cast(T, None)
        if self.decode is str:
            return cast(T, response.text)
        value = msgspec.json.decode(response.content, type=self.decode)
        if isinstance(value, Reservation | WaitlistEntry) and response.headers.get(
            "idempotent-replayed"
        ):
            value.replayed = True
        return cast(T, value if self.pick is None else self.pick(value))


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = msgspec.json.decode(response.content, type=_Error).error
        return ApiError(response.status_code, body.code, body.message, body.details)
    except msgspec.DecodeError:
        return ApiError(response.status_code, "http_error", response.text[:200])


def _p(value: str) -> str:
    return quote(value, safe="")


def _params(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _idempotency(key: str | None) -> dict[str, str]:
    """The ``Idempotency-Key`` header: the caller's key, or a new one for this call (the
    same on each of its attempts, so a retry can never act twice)."""
    return {"Idempotency-Key": key or f"client-{uuid.uuid4()}"}


class _Calls:
    """The routes, each as a :class:`_Call`: what :class:`Client` and
    :class:`AsyncClient` send, in one place (their methods only run these)."""

    @staticmethod
    def put_warehouse(
        warehouse_id: str, name: str, status: str, location: str | None
    ) -> _Call[Warehouse]:
        body = {"name": name, "status": status, "location": location}
        return _Call("PUT", f"/v1/warehouses/{_p(warehouse_id)}", Warehouse, body)

    @staticmethod
    def get_warehouse(warehouse_id: str) -> _Call[Warehouse]:
        return _Call("GET", f"/v1/warehouses/{_p(warehouse_id)}", Warehouse)

    @staticmethod
    def list_warehouses() -> _Call[list[Warehouse]]:
        return _Call("GET", "/v1/warehouses", _Warehouses, pick=lambda w: w.warehouses)

    @staticmethod
    def get_stock(product_id: str) -> _Call[ProductStock]:
        return _Call("GET", f"/v1/products/{_p(product_id)}/stock", ProductStock)

    @staticmethod
    def get_stocks(product_ids: Sequence[str]) -> _Call[list[ProductStock]]:
        params = {"product_ids": ",".join(product_ids)}
        return _Call("GET", "/v1/stock", _Stocks, params=params, pick=lambda s: s.products)

    @staticmethod
    def adjust(
        product_id: str,
        warehouse_id: str,
        delta: int,
        reason: str | None = None,
        expected_version: int | None = None,
    ) -> _Call[Level]:
        body = _params(delta=delta, reason=reason, expected_version=expected_version)
        path = f"/v1/products/{_p(product_id)}/stock/{_p(warehouse_id)}/adjustments"
        return _Call("POST", path, Level, body, retry_unsent_only=True)

    @staticmethod
    def set_quantity(
        product_id: str,
        warehouse_id: str,
        quantity: int,
        reason: str | None = None,
        expected_version: int | None = None,
    ) -> _Call[Level]:
        body = _params(quantity=quantity, reason=reason, expected_version=expected_version)
        return _Call("PUT", f"/v1/products/{_p(product_id)}/stock/{_p(warehouse_id)}", Level, body)

    @staticmethod
    def movements(product_id: str, after: int, limit: int) -> _Call[Page[Movement]]:
        path = f"/v1/products/{_p(product_id)}/movements"
        params = {"after": after, "limit": limit}
        return _Call(
            "GET", path, _Movements, params=params, pick=lambda m: Page(m.movements, m.next_after)
        )

    @staticmethod
    def bulk(items: Sequence[BulkItem], atomic: bool) -> _Call[list[BulkResult]]:
        body = {"items": [msgspec.to_builtins(x) for x in items], "atomic": atomic}
        return _Call(
            "POST", "/v1/stock/bulk", _Bulk, body, retry_unsent_only=True, pick=lambda b: b.results
        )

    @staticmethod
    def put_product(product_id: str, settings: dict[str, Any]) -> _Call[Product]:
        if settings.get("components") is not None:
            settings["components"] = [
                msgspec.to_builtins(c) if isinstance(c, Component) else c
                for c in settings["components"]
            ]
        return _Call("PUT", f"/v1/products/{_p(product_id)}", Product, settings)

    @staticmethod
    def get_product(product_id: str) -> _Call[Product]:
        return _Call("GET", f"/v1/products/{_p(product_id)}", Product)

    @staticmethod
    def list_products(after: str | None, limit: int) -> _Call[Page[Product]]:
        params = _params(after=after, limit=limit)
        return _Call(
            "GET",
            "/v1/products",
            _Products,
            params=params,
            pick=lambda p: Page(p.products, p.next_after),
        )

    @staticmethod
    def reserve(
        lines: Sequence[Line | Mapping[str, Any]],
        ttl_seconds: int | None,
        reference: str | None,
        idempotency_key: str | None,
        customer_id: str | None,
    ) -> _Call[Reservation]:
        body = _params(
            lines=[msgspec.to_builtins(x) if isinstance(x, Line) else dict(x) for x in lines],
            ttl_seconds=ttl_seconds,
            reference=reference,
            customer_id=customer_id,
        )
        return _Call(
            "POST", "/v1/reservations", Reservation, body, None, _idempotency(idempotency_key)
        )

    @staticmethod
    def get_reservation(reservation_id: str) -> _Call[Reservation]:
        return _Call("GET", f"/v1/reservations/{_p(reservation_id)}", Reservation)

    @staticmethod
    def finish(reservation_id: str, action: str) -> _Call[Reservation]:
        return _Call("POST", f"/v1/reservations/{_p(reservation_id)}/{action}", Reservation)

    @staticmethod
    def extend(reservation_id: str, ttl_seconds: int) -> _Call[Reservation]:
        path = f"/v1/reservations/{_p(reservation_id)}/extend"
        return _Call("POST", path, Reservation, {"ttl_seconds": ttl_seconds})

    @staticmethod
    def list_reservations(**filters: Any) -> _Call[Page[Reservation]]:
        params = _params(**filters)
        return _Call(
            "GET", "/v1/reservations", _Reservations, params=params,
            pick=lambda r: Page(r.reservations, r.next_after),
        )  # fmt: skip

    @staticmethod
    def join_waitlist(
        product_id: str,
        customer_id: str,
        quantity: int,
        hold_seconds: int | None,
        warehouse_id: str | None,
        idempotency_key: str | None,
    ) -> _Call[WaitlistEntry]:
        body = _params(
            customer_id=customer_id,
            quantity=quantity,
            hold_seconds=hold_seconds,
            warehouse_id=warehouse_id,
        )
        path = f"/v1/products/{_p(product_id)}/waitlist"
        return _Call("POST", path, WaitlistEntry, body, None, _idempotency(idempotency_key))

    @staticmethod
    def get_waitlist_entry(entry_id: str) -> _Call[WaitlistEntry]:
        return _Call("GET", f"/v1/waitlist/{_p(entry_id)}", WaitlistEntry)

    @staticmethod
    def cancel_waitlist_entry(entry_id: str) -> _Call[WaitlistEntry]:
        # A repeat after a lost answer would be 409 invalid_state for what did succeed.
        path = f"/v1/waitlist/{_p(entry_id)}"
        return _Call("DELETE", path, WaitlistEntry, retry_unsent_only=True)

    @staticmethod
    def list_waitlist(product_id: str, after: int, limit: int) -> _Call[Page[WaitlistEntry]]:
        return _Call(
            "GET", f"/v1/products/{_p(product_id)}/waitlist", _Waitlist,
            params={"after": after, "limit": limit},
            pick=lambda w: Page(w.entries, w.next_after),
        )  # fmt: skip

    @staticmethod
    def waitlist_lengths(product_ids: Sequence[str]) -> _Call[list[WaitlistLength]]:
        params = {"product_ids": ",".join(product_ids)}
        return _Call(
            "GET", "/v1/waitlists", _WaitlistLengths, params=params, pick=lambda w: w.waitlists
        )

    @staticmethod
    def put_webhook(
        webhook_id: str, url: str, events: Sequence[WebhookEvent], secret: str, active: bool
    ) -> _Call[Webhook]:
        body = {"url": url, "events": list(events), "secret": secret, "active": active}
        return _Call("PUT", f"/v1/webhooks/{_p(webhook_id)}", Webhook, body)

    @staticmethod
    def get_webhook(webhook_id: str) -> _Call[Webhook]:
        return _Call("GET", f"/v1/webhooks/{_p(webhook_id)}", Webhook)

    @staticmethod
    def list_webhooks() -> _Call[list[Webhook]]:
        return _Call("GET", "/v1/webhooks", _Webhooks, pick=lambda w: w.webhooks)

    @staticmethod
    def delete_webhook(webhook_id: str) -> _Call[None]:
        # A repeat after a lost answer would be 404 for what did succeed.
        path = f"/v1/webhooks/{_p(webhook_id)}"
        return _Call("DELETE", path, None, retry_unsent_only=True)

    @staticmethod
    def list_webhook_deliveries(
        webhook_id: str, after: str | None, limit: int
    ) -> _Call[Page[Delivery]]:
        return _Call(
            "GET", f"/v1/webhooks/{_p(webhook_id)}/deliveries", _Deliveries,
            params=_params(after=after, limit=limit),
            pick=lambda d: Page(d.deliveries, d.next_after),
        )  # fmt: skip

    @staticmethod
    def create_stream_ticket() -> _Call[StreamTicket]:
        # Repeating it is harmless: an unused ticket lapses after 30 s.
        return _Call("POST", "/v1/stream-tickets", StreamTicket)

    @staticmethod
    def ready() -> _Call[Readiness]:
        return _Call("GET", "/ready", Readiness, answer_503=True)

    @staticmethod
    def metrics() -> _Call[str]:
        return _Call("GET", "/metrics", str)

    @staticmethod
    def openapi() -> _Call[dict[str, Any]]:
        return _Call("GET", "/openapi.json", dict[str, Any])


class _Retries:
    """The retry policy of one call (see the module docstring), for either client: after
    each attempt, how long to wait before the next one."""

    __slots__ = ("_attempt", "_call", "_cap", "_retries")

    def __init__(self, call: _Call[Any], retries: int, cap: float) -> None:
        self._call = call
        self._retries = retries
        self._cap = cap
        self._attempt = 0

    def after_failure(self, exc: httpx.TransportError) -> float:
        """The wait before retrying a request that failed in transport; raises ``exc``
        when it must not be retried (too many attempts, or it may have arrived)."""
        attempt, self._attempt = self._attempt, self._attempt + 1
        unsent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        if attempt == self._retries or (self._call.retry_unsent_only and not unsent):
            raise exc
        return _backoff(attempt, self._cap)

    def after(self, response: httpx.Response) -> float | None:
        """The wait before retrying a 503, or ``None``: ``response`` is the answer."""
        attempt, self._attempt = self._attempt, self._attempt + 1
        if response.status_code != 503 or self._call.answer_503 or attempt == self._retries:
            return None
        raw = response.headers.get("retry-after", "")
        return min(self._cap, float(raw)) if raw.isdigit() else _backoff(attempt, self._cap)


def _backoff(attempt: int, cap: float) -> float:
    return min(cap, 0.05 * 2.0**attempt) * random.uniform(0.5, 1)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class _Since:
    """The newest version seen per (product, warehouse): the ``since`` of a resubscribe."""

    def __init__(self) -> None:
        self.versions: dict[str, dict[str, int]] = {}

    def fresh(self, message: dict[str, Any]) -> bool:
        """Record a message; False for a ``stock`` message not newer than what was seen.

        A snapshot keeps only its rows newer than what was seen (the server already does
        that with ``since`` over WebSocket; over SSE a reconnect re-sends every row).
        """
        kind = message.get("type")
        if kind == "snapshot":
            seen = self.versions.setdefault(message["product_id"], {})
            levels = [
                level
                for level in message["levels"]
                if level["version"] > seen.get(level["warehouse_id"], 0)
            ]
            for level in levels:
                seen[level["warehouse_id"]] = level["version"]
            message["levels"] = levels
        elif kind == "stock":
            seen = self.versions.setdefault(message["product_id"], {})
            if message["version"] <= seen.get(message["warehouse_id"], 0):
                return False
            seen[message["warehouse_id"]] = message["version"]
        return True

    def subscribe(self, product_ids: Sequence[str]) -> bytes:
        since = {p: self.versions[p] for p in product_ids if self.versions.get(p)}
        command: dict[str, Any] = {"op": "subscribe", "product_ids": list(product_ids)}
        if since:
            command["since"] = since
        return msgspec.json.encode(command)


def _ws_options(base_url: str, token: str | None) -> dict[str, Any]:
    """Arguments of ``websockets`` ``connect`` (the sync and the asyncio one alike)."""
    url = base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/v1/ws"
    return {
        "uri": url,
        "additional_headers": _headers(token),
        "max_size": 64 * 1024,
        "compression": None,
    }


def _message(raw: str | bytes) -> StreamMessage:
    data = msgspec.json.decode(raw)
    return StreamMessage(str(data.get("type")), data)


class _UseSse(Exception):
    """The WebSocket upgrade was refused with a status that SSE may get past."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the WebSocket upgrade was answered with HTTP {status}")
        self.status = status

    def api_error(self) -> ApiError:
        return ApiError(self.status, "upgrade_refused", str(self))


def _refused(refusal: InvalidStatus) -> Exception:
    """What a refused WebSocket handshake (status not 101) means for the stream:
    :class:`ApiError` for 401/403/422 (a credential or request problem SSE shares),
    otherwise :class:`_UseSse` (a proxy or server that does not upgrade)."""
    status, body = refusal.response.status_code, bytes(refusal.response.body or b"")
    if status in (401, 403, 422):
        return _api_error(httpx.Response(status, content=body))
    return _UseSse(status)


def _sse_request(product_ids: Sequence[str], token: str | None) -> dict[str, Any]:
    """Arguments of ``http.stream(...)`` for ``GET /v1/stream``: no read timeout (the
    server sends nothing while nothing changes), the token even on a caller's client."""
    return {
        "method": "GET",
        "url": "/v1/stream",
        "params": {"product_ids": ",".join(product_ids)},
        "headers": {"Accept": "text/event-stream", **_headers(token)},
        "timeout": httpx.Timeout(10.0, read=None),
    }


def _sse_check(response: httpx.Response) -> None:
    """Raise for a refused SSE handshake: :class:`ApiError` for 4xx (the body is read by
    the caller first), :class:`httpx.TransportError` for anything else (reconnect)."""
    if response.status_code == 200:
        return
    if 400 <= response.status_code < 500:
        raise _api_error(response)
    raise httpx.RemoteProtocolError(f"stream refused with HTTP {response.status_code}")


class _SseEvents:
    """Incremental ``text/event-stream`` parser: :meth:`line` returns an event's message
    when a blank line ends it. Comments and fields other than ``data`` are ignored (the
    server sends no ids: a reconnect starts afresh)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: list[str] = []

    def line(self, line: str) -> StreamMessage | None:
        if not line:
            data, self._data = self._data, []
            return _message("\n".join(data)) if data else None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None


# A connection's end that a reconnect may get past.
_DROPPED = (_UseSse, ConnectionClosed, InvalidHandshake, OSError, httpx.TransportError)


class _Resume:
    """The stream's policy (see the module docstring), for either client: the versions
    seen, the transport to open next, and what the end of a connection means."""

    __slots__ = ("_attempt", "_auto", "_cap", "_reconnect", "since", "sse")

    def __init__(self, transport: StreamTransport, reconnect: bool, max_backoff: float) -> None:
        self.since = _Since()
        self.sse = transport == "sse"
        self._auto = transport == "auto"
        self._reconnect = reconnect
        self._cap = max_backoff
        self._attempt = 0

    def fresh(self, message: StreamMessage) -> bool:
        """Whether the caller gets ``message`` (a delivering connection resets the backoff)."""
        self._attempt = 0
        return self.since.fresh(message.data)

    def ended(self, error: Exception | None) -> float | None:
        """After a connection ended (``error``: how, ``None`` if closed cleanly): the
        seconds to wait before the next one, or ``None`` when the stream is over. Raises
        what the caller must see when it does not reconnect."""
        if isinstance(error, _UseSse):
            if self._auto:  # the same proxy would refuse again: SSE from now on, at once
                self.sse = True
                return 0.0
            if not self._reconnect:
                raise error.api_error() from None
        elif error is not None and not self._reconnect:
            raise error
        if not self._reconnect:
            return None
        self._attempt += 1
        return _backoff(self._attempt - 1, self._cap)


class _Base:
    """What both clients hold; their methods run the :class:`_Calls` routes."""

    def __init__(
        self, base_url: str, token: str | None, retries: int, max_retry_wait: float
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.retries = retries
        self.max_retry_wait = max_retry_wait

    def _http_options(self, timeout: float) -> dict[str, Any]:
        """Arguments of the ``httpx`` client made when the caller gives none."""
        return {
            "base_url": self.base_url,
            "headers": _headers(self.token),
            "timeout": timeout,
            "trust_env": False,
        }


# --- the sync client -------------------------------------------------------------------


class Client(_Base):
    """Blocking client. ``with Client("http://127.0.0.1:8000", token=...) as c: ...``"""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        max_retry_wait: float = 5.0,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(base_url, token, retries, max_retry_wait)
        self.http = http or httpx.Client(**self._http_options(timeout))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _run(self, call: _Call[T]) -> T:
        retries = _Retries(call, self.retries, self.max_retry_wait)
        while True:
            try:
                response = self.http.request(**call.request())
            except httpx.TransportError as exc:
                time.sleep(retries.after_failure(exc))
                continue
            wait = retries.after(response)
            if wait is None:
                return call.result(response)
            time.sleep(wait)

    # warehouses
    def put_warehouse(
        self, warehouse_id: str, name: str, status: str = "active", location: str | None = None
    ) -> Warehouse:
        return self._run(_Calls.put_warehouse(warehouse_id, name, status, location))

    def get_warehouse(self, warehouse_id: str) -> Warehouse:
        return self._run(_Calls.get_warehouse(warehouse_id))

    def list_warehouses(self) -> list[Warehouse]:
        return self._run(_Calls.list_warehouses())

    # stock
    def get_stock(self, product_id: str) -> ProductStock:
        return self._run(_Calls.get_stock(product_id))

    def get_stocks(self, product_ids: Sequence[str]) -> list[ProductStock]:
        return self._run(_Calls.get_stocks(product_ids))

    def adjust(self, product_id: str, warehouse_id: str, delta: int, **kw: Any) -> Level:
        return self._run(_Calls.adjust(product_id, warehouse_id, delta, **kw))

    def set_quantity(self, product_id: str, warehouse_id: str, quantity: int, **kw: Any) -> Level:
        return self._run(_Calls.set_quantity(product_id, warehouse_id, quantity, **kw))

    def movements(self, product_id: str, after: int = 0, limit: int = 100) -> Page[Movement]:
        return self._run(_Calls.movements(product_id, after, limit))

    def bulk(self, items: Sequence[BulkItem], *, atomic: bool = False) -> list[BulkResult]:
        return self._run(_Calls.bulk(items, atomic))

    # products
    def put_product(self, product_id: str, **settings: Any) -> Product:
        return self._run(_Calls.put_product(product_id, settings))

    def get_product(self, product_id: str) -> Product:
        return self._run(_Calls.get_product(product_id))

    def list_products(self, after: str | None = None, limit: int = 100) -> Page[Product]:
        return self._run(_Calls.list_products(after, limit))

    def iter_products(self, limit: int = 1000) -> Iterator[Product]:
        """Every product, page by page (bounded memory)."""
        page = self.list_products(None, limit)
        yield from page.items
        while page.next_after is not None:
            page = self.list_products(page.next_after, limit)
            yield from page.items

    # reservations
    def reserve(
        self,
        lines: Sequence[Line | Mapping[str, Any]],
        *,
        ttl_seconds: int | None = None,
        reference: str | None = None,
        idempotency_key: str | None = None,
        customer_id: str | None = None,
    ) -> Reservation:
        call = _Calls.reserve(lines, ttl_seconds, reference, idempotency_key, customer_id)
        return self._run(call)

    def get_reservation(self, reservation_id: str) -> Reservation:
        return self._run(_Calls.get_reservation(reservation_id))

    def commit(self, reservation_id: str) -> Reservation:
        return self._run(_Calls.finish(reservation_id, "commit"))

    def release(self, reservation_id: str) -> Reservation:
        return self._run(_Calls.finish(reservation_id, "release"))

    def extend(self, reservation_id: str, ttl_seconds: int) -> Reservation:
        return self._run(_Calls.extend(reservation_id, ttl_seconds))

    def list_reservations(
        self,
        *,
        reference: str | None = None,
        customer_id: str | None = None,
        status: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Page[Reservation]:
        filters = {"reference": reference, "customer_id": customer_id, "status": status}
        return self._run(_Calls.list_reservations(**filters, after=after, limit=limit))

    # waitlist
    def join_waitlist(
        self,
        product_id: str,
        customer_id: str,
        quantity: int,
        *,
        hold_seconds: int | None = None,
        warehouse_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> WaitlistEntry:
        call = _Calls.join_waitlist(
            product_id, customer_id, quantity, hold_seconds, warehouse_id, idempotency_key
        )
        return self._run(call)

    def get_waitlist_entry(self, entry_id: str) -> WaitlistEntry:
        return self._run(_Calls.get_waitlist_entry(entry_id))

    def cancel_waitlist_entry(self, entry_id: str) -> WaitlistEntry:
        return self._run(_Calls.cancel_waitlist_entry(entry_id))

    def list_waitlist(
        self, product_id: str, after: int = 0, limit: int = 100
    ) -> Page[WaitlistEntry]:
        return self._run(_Calls.list_waitlist(product_id, after, limit))

    def waitlist_lengths(self, product_ids: Sequence[str]) -> list[WaitlistLength]:
        return self._run(_Calls.waitlist_lengths(product_ids))

    # webhooks
    def put_webhook(
        self,
        webhook_id: str,
        url: str,
        events: Sequence[WebhookEvent],
        secret: str,
        *,
        active: bool = True,
    ) -> Webhook:
        return self._run(_Calls.put_webhook(webhook_id, url, events, secret, active))

    def get_webhook(self, webhook_id: str) -> Webhook:
        return self._run(_Calls.get_webhook(webhook_id))

    def list_webhooks(self) -> list[Webhook]:
        return self._run(_Calls.list_webhooks())

    def delete_webhook(self, webhook_id: str) -> None:
        self._run(_Calls.delete_webhook(webhook_id))

    def list_webhook_deliveries(
        self, webhook_id: str, after: str | None = None, limit: int = 100
    ) -> Page[Delivery]:
        return self._run(_Calls.list_webhook_deliveries(webhook_id, after, limit))

    # operations
    def health(self) -> bool:
        return self.http.get("/health").status_code == 200

    def ready(self) -> Readiness:
        """Readiness (``status`` "unavailable" says which check failed; not an error)."""
        return self._run(_Calls.ready())

    def metrics(self) -> str:
        return self._run(_Calls.metrics())

    def openapi(self) -> dict[str, Any]:
        return self._run(_Calls.openapi())

    def create_stream_ticket(self) -> StreamTicket:
        """A ticket for a browser's stream (``?ticket=``); this client's own
        :meth:`stream` sends its token instead."""
        return self._run(_Calls.create_stream_ticket())

    def stream(
        self,
        product_ids: Sequence[str],
        *,
        reconnect: bool = True,
        max_backoff: float = 5.0,
        transport: StreamTransport = "auto",
    ) -> Iterator[StreamMessage]:
        """Live messages for ``product_ids``, resuming after a disconnect: WebSocket with
        ``since``, or SSE (fallback or ``transport="sse"``) dropping rows already seen."""
        resume = _Resume(transport, reconnect, max_backoff)
        while True:
            source = self._sse(product_ids) if resume.sse else self._ws(product_ids, resume)
            error: Exception | None = None
            try:
                with contextlib.closing(source):
                    for message in source:
                        if resume.fresh(message):
                            yield message
            except _DROPPED as exc:
                error = exc
            wait = resume.ended(error)
            if wait is None:
                return
            time.sleep(wait)

    def _ws(self, product_ids: Sequence[str], resume: _Resume) -> Generator[StreamMessage]:
        """One WebSocket connection's messages (subscribed with ``since``)."""
        try:
            with ws_connect(**_ws_options(self.base_url, self.token)) as ws:
                ws.send(resume.since.subscribe(product_ids).decode())
                for raw in ws:
                    yield _message(raw)
        except InvalidStatus as exc:
            raise _refused(exc) from None

    def _sse(self, product_ids: Sequence[str]) -> Generator[StreamMessage]:
        """One SSE response's messages (fresh snapshots first)."""
        with self.http.stream(**_sse_request(product_ids, self.token)) as response:
            if response.status_code != 200:
                response.read()
                _sse_check(response)
            events = _SseEvents()
            for line in response.iter_lines():
                if (message := events.line(line)) is not None:
                    yield message


# --- the async client ------------------------------------------------------------------


class AsyncClient(_Base):
    """The same API as :class:`Client`, awaitable. ``async with AsyncClient(...) as c:``"""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        max_retry_wait: float = 5.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, token, retries, max_retry_wait)
        self.http = http or httpx.AsyncClient(**self._http_options(timeout))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _run(self, call: _Call[T]) -> T:
        retries = _Retries(call, self.retries, self.max_retry_wait)
        while True:
            try:
                response = await self.http.request(**call.request())
            except httpx.TransportError as exc:
                await asyncio.sleep(retries.after_failure(exc))
                continue
            wait = retries.after(response)
            if wait is None:
                return call.result(response)
            await asyncio.sleep(wait)

    # warehouses
    async def put_warehouse(
        self, warehouse_id: str, name: str, status: str = "active", location: str | None = None
    ) -> Warehouse:
        return await self._run(_Calls.put_warehouse(warehouse_id, name, status, location))

    async def get_warehouse(self, warehouse_id: str) -> Warehouse:
        return await self._run(_Calls.get_warehouse(warehouse_id))

    async def list_warehouses(self) -> list[Warehouse]:
        return await self._run(_Calls.list_warehouses())

    # stock
    async def get_stock(self, product_id: str) -> ProductStock:
        return await self._run(_Calls.get_stock(product_id))

    async def get_stocks(self, product_ids: Sequence[str]) -> list[ProductStock]:
        return await self._run(_Calls.get_stocks(product_ids))

    async def adjust(self, product_id: str, warehouse_id: str, delta: int, **kw: Any) -> Level:
        return await self._run(_Calls.adjust(product_id, warehouse_id, delta, **kw))

    async def set_quantity(
        self, product_id: str, warehouse_id: str, quantity: int, **kw: Any
    ) -> Level:
        return await self._run(_Calls.set_quantity(product_id, warehouse_id, quantity, **kw))

    async def movements(self, product_id: str, after: int = 0, limit: int = 100) -> Page[Movement]:
        return await self._run(_Calls.movements(product_id, after, limit))

    async def bulk(self, items: Sequence[BulkItem], *, atomic: bool = False) -> list[BulkResult]:
        return await self._run(_Calls.bulk(items, atomic))

    # products
    async def put_product(self, product_id: str, **settings: Any) -> Product:
        return await self._run(_Calls.put_product(product_id, settings))

    async def get_product(self, product_id: str) -> Product:
        return await self._run(_Calls.get_product(product_id))

    async def list_products(self, after: str | None = None, limit: int = 100) -> Page[Product]:
        return await self._run(_Calls.list_products(after, limit))

    async def iter_products(self, limit: int = 1000) -> AsyncIterator[Product]:
        """Every product, page by page (bounded memory)."""
        page = await self.list_products(None, limit)
        for product in page.items:
            yield product
        while page.next_after is not None:
            page = await self.list_products(page.next_after, limit)
            for product in page.items:
                yield product

    # reservations
    async def reserve(
        self,
        lines: Sequence[Line | Mapping[str, Any]],
        *,
        ttl_seconds: int | None = None,
        reference: str | None = None,
        idempotency_key: str | None = None,
        customer_id: str | None = None,
    ) -> Reservation:
        call = _Calls.reserve(lines, ttl_seconds, reference, idempotency_key, customer_id)
        return await self._run(call)

    async def get_reservation(self, reservation_id: str) -> Reservation:
        return await self._run(_Calls.get_reservation(reservation_id))

    async def commit(self, reservation_id: str) -> Reservation:
        return await self._run(_Calls.finish(reservation_id, "commit"))

    async def release(self, reservation_id: str) -> Reservation:
        return await self._run(_Calls.finish(reservation_id, "release"))

    async def extend(self, reservation_id: str, ttl_seconds: int) -> Reservation:
        return await self._run(_Calls.extend(reservation_id, ttl_seconds))

    async def list_reservations(
        self,
        *,
        reference: str | None = None,
        customer_id: str | None = None,
        status: str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Page[Reservation]:
        filters = {"reference": reference, "customer_id": customer_id, "status": status}
        return await self._run(_Calls.list_reservations(**filters, after=after, limit=limit))

    # waitlist
    async def join_waitlist(
        self,
        product_id: str,
        customer_id: str,
        quantity: int,
        *,
        hold_seconds: int | None = None,
        warehouse_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> WaitlistEntry:
        call = _Calls.join_waitlist(
            product_id, customer_id, quantity, hold_seconds, warehouse_id, idempotency_key
        )
        return await self._run(call)

    async def get_waitlist_entry(self, entry_id: str) -> WaitlistEntry:
        return await self._run(_Calls.get_waitlist_entry(entry_id))

    async def cancel_waitlist_entry(self, entry_id: str) -> WaitlistEntry:
        return await self._run(_Calls.cancel_waitlist_entry(entry_id))

    async def list_waitlist(
        self, product_id: str, after: int = 0, limit: int = 100
    ) -> Page[WaitlistEntry]:
        return await self._run(_Calls.list_waitlist(product_id, after, limit))

    async def waitlist_lengths(self, product_ids: Sequence[str]) -> list[WaitlistLength]:
        return await self._run(_Calls.waitlist_lengths(product_ids))

    # webhooks
    async def put_webhook(
        self,
        webhook_id: str,
        url: str,
        events: Sequence[WebhookEvent],
        secret: str,
        *,
        active: bool = True,
    ) -> Webhook:
        return await self._run(_Calls.put_webhook(webhook_id, url, events, secret, active))

    async def get_webhook(self, webhook_id: str) -> Webhook:
        return await self._run(_Calls.get_webhook(webhook_id))

    async def list_webhooks(self) -> list[Webhook]:
        return await self._run(_Calls.list_webhooks())

    async def delete_webhook(self, webhook_id: str) -> None:
        await self._run(_Calls.delete_webhook(webhook_id))

    async def list_webhook_deliveries(
        self, webhook_id: str, after: str | None = None, limit: int = 100
    ) -> Page[Delivery]:
        return await self._run(_Calls.list_webhook_deliveries(webhook_id, after, limit))

    # operations
    async def health(self) -> bool:
        return (await self.http.get("/health")).status_code == 200

    async def ready(self) -> Readiness:
        """Readiness (``status`` "unavailable" says which check failed; not an error)."""
        return await self._run(_Calls.ready())

    async def metrics(self) -> str:
        return await self._run(_Calls.metrics())

    async def openapi(self) -> dict[str, Any]:
        return await self._run(_Calls.openapi())

    async def create_stream_ticket(self) -> StreamTicket:
        """A ticket for a browser's stream (``?ticket=``); this client's own
        :meth:`stream` sends its token instead."""
        return await self._run(_Calls.create_stream_ticket())

    async def stream(
        self,
        product_ids: Sequence[str],
        *,
        reconnect: bool = True,
        max_backoff: float = 5.0,
        transport: StreamTransport = "auto",
    ) -> AsyncIterator[StreamMessage]:
        """Live messages for ``product_ids``, resuming after a disconnect: WebSocket with
        ``since``, or SSE (fallback or ``transport="sse"``) dropping rows already seen."""
        resume = _Resume(transport, reconnect, max_backoff)
        while True:
            source = self._sse(product_ids) if resume.sse else self._ws(product_ids, resume)
            error: Exception | None = None
            try:
                async with contextlib.aclosing(source):
                    async for message in source:
                        if resume.fresh(message):
                            yield message
            except _DROPPED as exc:
                error = exc
            wait = resume.ended(error)
            if wait is None:
                return
            await asyncio.sleep(wait)

    async def _ws(
        self, product_ids: Sequence[str], resume: _Resume
    ) -> AsyncGenerator[StreamMessage]:
        """One WebSocket connection's messages (subscribed with ``since``)."""
        try:
            async with ws_aconnect(**_ws_options(self.base_url, self.token)) as ws:
                await ws.send(resume.since.subscribe(product_ids).decode())
                async for raw in ws:
                    yield _message(raw)
        except InvalidStatus as exc:
            raise _refused(exc) from None

    async def _sse(self, product_ids: Sequence[str]) -> AsyncGenerator[StreamMessage]:
        """One SSE response's messages (fresh snapshots first)."""
        async with self.http.stream(**_sse_request(product_ids, self.token)) as response:
            if response.status_code != 200:
                await response.aread()
                _sse_check(response)
            events = _SseEvents()
            async for line in response.aiter_lines():
                if (message := events.line(line)) is not None:
                    yield message


# --- webhooks --------------------------------------------------------------------------


class SignatureError(Exception):
    """An ``Inventory-Signature`` header that is malformed, stale or does not match."""


def verify_signature(
    secret: str | bytes,
    header: str,
    body: bytes,
    *,
    tolerance: float = 300.0,
    now: float | None = None,
) -> int:
    """Check a webhook delivery's ``Inventory-Signature: t=<unix>,v1=<hex>`` over the raw
    body (``HMAC-SHA256(secret, "<t>.<body>")``); returns ``t``.

    Raises :class:`SignatureError` when the header is malformed, no ``v1`` matches
    (compared in constant time) or ``t`` is more than ``tolerance`` seconds from ``now``
    (a replayed old delivery).
    """
    key = secret.encode() if isinstance(secret, str) else secret
    stamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            stamp = int(value)
        elif name == "v1" and value:
            signatures.append(value)
    if stamp is None or not signatures:
        raise SignatureError("the header needs t=<unix seconds> and v1=<hex>")
    if abs((time.time() if now is None else now) - stamp) > tolerance:
        raise SignatureError("the signature is too old (or from the future)")
    expected = hmac.new(key, f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise SignatureError("no signature matches")
    return stamp
