"""Fuzzing the WebSocket endpoint ``/v1/ws`` of a real ``inventory serve`` process.

While misbehaving clients send random and malformed frames (binary, invalid UTF-8,
oversized, compressed bombs, deeply nested JSON, wrong types, unknown ops, 1,001 product
ids, bad ids, floods, rapid subscribe/unsubscribe), a well-behaved client on the same
server keeps receiving a ``stock`` message for every adjustment made through the HTTP
API, within a deadline, with versions never going backwards. Afterwards the process is
alive and ready and a new client can subscribe.

Expected answers (SPEC "WebSocket API"): a bad message gets ``{"type": "error", "code",
"message"}`` and the connection stays open; a frame over 64 KiB closes it with 1009; a
text frame that is not UTF-8 is a protocol violation (RFC 6455: close 1007).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import psutil
import pytest
import websockets
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as sync_connect

from realtime.protocol import ProtocolError, parse_command

from .conftest import wait_until as until

pytestmark = pytest.mark.asyncio

MakeStock = Callable[..., Awaitable[tuple[str, list[str]]]]

MAX_FRAME = 64 * 1024
DELIVERY_DEADLINE = 5.0  # an adjustment must reach the watcher within this
ERROR_CODES = {
    "invalid_json",
    "invalid_message",
    "unknown_op",
    "invalid_product_id",
    "too_many_subscriptions",
    "unsupported_frame",
    "unavailable",
}


@contextlib.asynccontextmanager
async def ws(url: str, **options: Any) -> AsyncIterator[ClientConnection]:
    options = {"open_timeout": 10, "close_timeout": 2, "proxy": None, **options}
    async with connect(url, **options) as conn:
        yield conn


def text(message: Any) -> str:
    """A command as a JSON text frame (bytes would go out as a binary frame)."""
    return orjson.dumps(message).decode()


async def recv_json(conn: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
    # races with a message arriving, leaving a cancelled reader waiting for ever.
    async with asyncio.timeout(timeout):
        raw = await conn.recv()
    assert isinstance(raw, str), f"binary frame from the server: {raw!r}"
    message = orjson.loads(raw)
    assert isinstance(message, dict), message
    assert isinstance(message.get("type"), str), message
    if message["type"] == "error":
        assert set(message) == {"type", "code", "message"}, message
        assert message["code"] in ERROR_CODES, message
        assert isinstance(message["message"], str), message
        assert message["message"], message
    return message


async def closed_with(conn: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read until the server closes; the close code it sent."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                await conn.recv()
    return conn.close_code


async def pong(conn: ClientConnection, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Ping and read up to the pong: proves the connection is open and answering."""
    await conn.send('{"op": "ping"}')
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            message = await recv_json(conn, timeout)
            if message["type"] == "pong":
                return seen
            seen.append(message)


# --- the well-behaved client ----------------------------------------------------------------


@dataclass
class Watcher:
    """Subscribed to one product; checks ordering on every message it reads."""

    conn: ClientConnection
    versions: dict[tuple[str, str], int] = field(default_factory=dict)
    stock_messages: int = 0
    task: asyncio.Task[None] | None = None  # runs :meth:`run`

    async def subscribe(self, product_id: str) -> None:
        await self.conn.send(text({"op": "subscribe", "product_ids": [product_id]}))
        got_snapshot = False
        while True:
            message = await recv_json(self.conn)
            self.check(message)
            if message["type"] == "snapshot":
                got_snapshot = True
            if message["type"] == "subscribed":
                assert got_snapshot, "subscribed before the snapshot"
                return

    def check(self, message: dict[str, Any]) -> None:
        assert message["type"] != "error", message
        if message["type"] == "snapshot":
            for level in message["levels"]:
                key = (message["product_id"], level["warehouse_id"])
                self.versions[key] = max(self.versions.get(key, 0), level["version"])
        elif message["type"] == "stock":
            key = (message["product_id"], message["warehouse_id"])
            assert message["version"] > self.versions.get(key, 0), (message, self.versions)
            assert message["available"] == message["quantity"] - message["reserved"], message
            self.versions[key] = message["version"]
            self.stock_messages += 1

    async def run(self) -> None:
        while True:
            self.check(await recv_json(self.conn, timeout=3600))


@dataclass
class Heartbeat:
    """Adjusts the watched row through HTTP and waits until the watcher has seen it."""

    http: httpx.AsyncClient
    base_url: str
    watcher: Watcher
    product_id: str
    warehouse_id: str
    beats: int = 0
    slowest: float = 0.0

    async def beat(self) -> None:
        r = await self.http.post(
            f"{self.base_url}/v1/products/{self.product_id}/stock/{self.warehouse_id}/adjustments",
            json={"delta": 1, "reason": "heartbeat"},
        )
        assert r.status_code == 200, r.text
        version = r.json()["version"]
        started = time.monotonic()
        key = (self.product_id, self.warehouse_id)
        task = self.watcher.task
        await until(
            lambda: (
                self.watcher.versions.get(key, 0) >= version or (task is not None and task.done())
            ),
            DELIVERY_DEADLINE,
            f"the watcher seeing version {version} of {key}",
        )
        if task is not None and task.done():
            task.result()  # raises what the watcher found
            pytest.fail("the watcher's connection ended")
        self.slowest = max(self.slowest, time.monotonic() - started)
        self.beats += 1

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.beat()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
async def ws_server(server_factory: Any) -> Any:
    server = await server_factory()
    try:
        async with ws(server.ws_url):
            pass
    except InvalidStatus as exc:
        pytest.skip(
            f"/v1/ws is not served by this build (handshake answered "
            f"{exc.response.status_code}): the WebSocket fuzz tests could not run"
        )
    return server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as c:
        yield c


# --- misbehaving clients ------------------------------------------------------------------


def malformed_frames(product_id: str) -> list[tuple[str | bytes, str | None]]:
    """(frame, the error code it must get; None: any error code)."""
    too_long = "a" * 129
    ids_1001 = [f"fuzz-{i}" for i in range(1001)]
    nested_list = "[" * 20_000 + "]" * 20_000
    nested_ids = '{"op": "subscribe", "product_ids": ' + "[" * 5_000 + "]" * 5_000 + "}"
    nested_obj = '{"a":' * 6_000 + "1" + "}" * 6_000
    pad = MAX_FRAME - len('{"op": "ping", "pad": ""}')
    exactly_max = '{"op": "ping", "pad": "' + "x" * pad + '"}'
    assert len(exactly_max.encode()) == MAX_FRAME

    def js(value: Any) -> str:
        return json.dumps(value)

    return [
        (b"\x00\x01binary", "unsupported_frame"),
        (b"", "unsupported_frame"),
        (js({"op": "ping"}).encode(), "unsupported_frame"),  # valid JSON, but binary
        ("", "invalid_json"),
        ("not json", "invalid_json"),
        ("{", "invalid_json"),
        ("{'op': 'ping'}", "invalid_json"),
        ('{"op": "ping"} trailing', "invalid_json"),
        ("NaN", None),
        ("\ud7ff\ue000\U0010ffff", "invalid_json"),
        ("null", None),
        ("42", None),
        ('"ping"', None),
        ("[]", None),
        (js([{"op": "ping"}]), None),
        ("{}", None),
        (js({"op": None}), None),
        (js({"op": 1}), None),
        (js({"op": ["ping"]}), None),
        (js({"op": "PING"}), "unknown_op"),
        (js({"op": "publish", "product_ids": [product_id]}), "unknown_op"),
        (js({"op": "ping", "extra": 1}), None),
        (js({"op": "subscribe"}), None),
        (js({"op": "subscribe", "product_ids": None}), None),
        (js({"op": "subscribe", "product_ids": product_id}), None),
        (js({"op": "subscribe", "product_ids": {product_id: 1}}), None),
        (js({"op": "subscribe", "product_ids": []}), None),
        (js({"op": "subscribe", "product_ids": [1, 2]}), None),
        (js({"op": "subscribe", "product_ids": [None]}), None),
        (js({"op": "subscribe", "product_ids": [[product_id]]}), None),
        (js({"op": "subscribe", "product_ids": [""]}), "invalid_product_id"),
        (js({"op": "subscribe", "product_ids": [too_long]}), "invalid_product_id"),
        (js({"op": "subscribe", "product_ids": ["bad id!"]}), "invalid_product_id"),
        (js({"op": "subscribe", "product_ids": ["a/b"]}), "invalid_product_id"),
        (js({"op": "subscribe", "product_ids": ["é"]}), "invalid_product_id"),
        (js({"op": "subscribe", "product_ids": ["a\u0000"]}), "invalid_product_id"),
        (js({"op": "subscribe", "product_ids": [product_id, "ok", "no way"]}), None),
        (js({"op": "subscribe", "product_ids": ids_1001}), "too_many_subscriptions"),
        (js({"op": "unsubscribe", "product_ids": ids_1001}), None),
        (js({"op": "unsubscribe", "product_ids": []}), None),
        (js({"op": "unsubscribe", "product_ids": ["bad id!"]}), None),
        (js({"op": "subscribe", "product_ids": [product_id], "since": []}), None),
        (js({"op": "subscribe", "product_ids": [product_id], "since": 5}), None),
        (js({"op": "subscribe", "product_ids": [product_id], "since": {"other": {}}}), None),
        (js({"op": "subscribe", "product_ids": [product_id], "since": {product_id: 1}}), None),
        (
            js({"op": "subscribe", "product_ids": [product_id], "since": {product_id: {"w": "1"}}}),
            None,
        ),
        (
            js({"op": "subscribe", "product_ids": [product_id], "since": {product_id: {"w": -1}}}),
            None,
        ),
        (
            js({"op": "subscribe", "product_ids": [product_id], "since": {product_id: {"w": 1.5}}}),
            None,
        ),
        (
            js(
                {"op": "subscribe", "product_ids": [product_id], "since": {product_id: {"w": True}}}
            ),
            None,
        ),
        (
            js(
                {
                    "op": "subscribe",
                    "product_ids": [product_id],
                    "since": {product_id: {"bad wh!": 1}},
                }
            ),
            None,
        ),
        (
            js(
                {
                    "op": "subscribe",
                    "product_ids": [product_id],
                    "since": {product_id: {"w": 2**70}},
                }
            ),
            None,
        ),
        (js({"op": "subscribe", "product_ids": [product_id], "sinse": {}}), None),
        (nested_list, None),
        (nested_ids, None),
        (nested_obj, None),
        (exactly_max, None),  # the largest frame allowed: an error, not a close
    ]


async def malformed_client(url: str, product_id: str) -> int:
    """Every malformed frame gets exactly one error; the connection stays open."""
    frames = malformed_frames(product_id)
    async with ws(url, compression=None, max_size=None) as conn:
        for frame, code in frames:
            await conn.send(frame)
            message = await recv_json(conn)
            assert message["type"] == "error", (frame[:200], message)
            if code is not None:
                assert message["code"] == code, (frame[:200], message)
        assert await pong(conn) == []
    return len(frames)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63), 2**64, rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e-308, 3.14])
    if kind == "str":
        return random_text(rng, rng.randint(0, 40))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    keys = ["op", "product_ids", "since", "subscribe", "ping", "unsubscribe", ""]
    return {
        rng.choice(keys) if rng.random() < 0.7 else random_text(rng, 8): random_json(rng, depth + 1)
        for _ in range(rng.randint(0, 4))
    }


def random_text(rng: random.Random, n: int) -> str:
    alphabet = 'abcXYZ019._:-/ "\\{}[],\t\n\u00e9\u4e2d\U0001f600\u200b\ufeff'
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_frame(rng: random.Random, product_id: str) -> str | bytes:
    roll = rng.random()
    if roll < 0.1:
        return rng.randbytes(rng.randint(0, 300))
    if roll < 0.2:
        return random_text(rng, rng.randint(0, 200))
    if roll < 0.6:
        return json.dumps(random_json(rng))
    # Nearly valid commands with one part mutated.
    op = rng.choice(["subscribe", "unsubscribe", "ping", "Subscribe", "sub", ""])
    message: dict[str, Any] = {"op": op}
    if rng.random() < 0.8:
        ids = [rng.choice([product_id, f"fz-{rng.randint(0, 50)}", random_text(rng, 5)])]
        message["product_ids"] = rng.choice([ids, ids * 3, random_json(rng), []])
    if rng.random() < 0.3:
        message["since"] = rng.choice([{product_id: {"w": rng.randint(-5, 5)}}, random_json(rng)])
    text = json.dumps(message)
    if rng.random() < 0.2:
        cut = rng.randint(0, len(text))
        text = text[:cut]
    return text


async def random_client(url: str, product_id: str, seed: int, frames: int) -> None:
    """Random frames; every answer is well-formed and the connection stays open."""
    rng = random.Random(seed)
    marker = f"marker-{seed}"
    async with ws(url, compression=None) as conn:
        done = asyncio.Event()

        async def read() -> None:
            # Replies are read concurrently: a valid subscribe answers with several messages.
            while True:
                message = await recv_json(conn, timeout=3600)
                if message["type"] == "subscribed" and message["product_ids"] == [marker]:
                    done.set()

        reader = asyncio.create_task(read())
        try:
            for _ in range(frames):
                await conn.send(random_frame(rng, product_id))
            await conn.send(text({"op": "subscribe", "product_ids": [marker]}))
            waiter = asyncio.create_task(done.wait())
            try:
                await asyncio.wait(
                    {reader, waiter}, timeout=10, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
            if reader.done():
                reader.result()  # raises what the reader found
            assert done.is_set(), "no answer to the final subscribe"
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def oversized_clients(url: str) -> None:
    """Frames above 64 KiB close with 1009; exactly 64 KiB does not (see malformed_client)."""
    cases: list[tuple[str | bytes, dict[str, Any]]] = [
        ("x" * (MAX_FRAME + 1), {"compression": None}),
        (b"\x00" * (MAX_FRAME + 1), {"compression": None}),
        ('{"op": "ping", "pad": "' + "y" * (MAX_FRAME * 4) + '"}', {"compression": None}),
        # A compression bomb when the server accepts deflate (it does not: then simply
        # 8 MiB that the server refuses while it is still arriving).
        ("z" * (8 * 1024 * 1024), {"compression": "deflate"}),
    ]
    for frame, options in cases:
        async with ws(url, max_size=None, **options) as conn:
            code: int | None
            try:
                await conn.send(frame)
            except websockets.ConnectionClosed as exc:  # refused while still sending
                code = exc.rcvd.code if exc.rcvd is not None else None
            else:
                code = await closed_with(conn)
            assert code == 1009, (len(frame), options)


async def invalid_utf8_client(url: str) -> None:
    async with ws(url, compression=None) as conn:
        await conn.send(b"\xff\xfe\xfd not utf-8", text=True)
        assert await closed_with(conn) == 1007


async def churn_client(url: str, http: httpx.AsyncClient, base_url: str, make: MakeStock) -> None:
    """Rapid subscribe/unsubscribe without waiting for answers, ending subscribed: the
    connection must then receive updates of a product only it watches."""
    own, [own_wh] = await make(10)
    rng = random.Random(7)
    final = [own, "churn-final"]
    async with ws(url, compression=None) as conn:
        stock: dict[tuple[str, str], int] = {}
        subscribed = asyncio.Event()

        async def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    message = await recv_json(conn, timeout=3600)
                    assert message["type"] != "error", message
                    if message["type"] == "stock":
                        key = (message["product_id"], message["warehouse_id"])
                        stock[key] = max(stock.get(key, 0), message["version"])
                    elif message["type"] == "subscribed" and message["product_ids"] == final:
                        subscribed.set()

        reader = asyncio.create_task(read())

        async def reader_saw(what: str, predicate: Callable[[], bool]) -> None:
            await until(lambda: predicate() or reader.done(), DELIVERY_DEADLINE * 2, what)
            if reader.done():
                reader.result()  # raises what the reader found
                pytest.fail("the connection was closed")

        try:
            for i in range(300):
                op = "subscribe" if i % 2 == 0 else "unsubscribe"
                ids = [own] + [f"churn-{rng.randint(0, 20)}" for _ in range(rng.randint(0, 3))]
                await conn.send(text({"op": op, "product_ids": ids}))
            await conn.send(text({"op": "subscribe", "product_ids": final}))
            await reader_saw("the answer to the last subscribe", subscribed.is_set)
            r = await http.post(
                f"{base_url}/v1/products/{own}/stock/{own_wh}/adjustments", json={"delta": 5}
            )
            assert r.status_code == 200, r.text
            version = r.json()["version"]
            await reader_saw(
                "the churned subscription receiving an update",
                lambda: stock.get((own, own_wh), 0) >= version,
            )
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def flooding_client(url: str) -> None:
    """Sends pings for a while and never reads: throttled, not buffered without bound."""
    async with ws(url, compression=None, close_timeout=1) as conn:
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while sent < 20_000:
                    await conn.send('{"op": "ping"}')
                    sent += 1
        assert sent > 0
        conn.transport.abort()


async def subscription_limit_client(url: str) -> None:
    """1,000 products per connection in total; the 1,001st is refused, the rest kept."""
    ids = [f"limit-{i}" for i in range(1000)]
    async with ws(url, compression=None, max_size=None) as conn:
        await conn.send(text({"op": "subscribe", "product_ids": ids}))
        snapshots = 0
        while True:
            message = await recv_json(conn, timeout=10)
            assert message["type"] != "error", message
            if message["type"] == "snapshot":
                snapshots += 1
            if message["type"] == "subscribed":
                break
        assert snapshots == 1000
        await conn.send(text({"op": "subscribe", "product_ids": ["limit-extra"]}))
        message = await recv_json(conn)
        assert message["type"] == "error", message
        assert message["code"] == "too_many_subscriptions", message
        # Subscribing again to products already held is no new subscription.
        await conn.send(text({"op": "subscribe", "product_ids": ids[:10]}))
        message = await recv_json(conn)
        assert message["type"] == "subscribed", message
        await conn.send(text({"op": "unsubscribe", "product_ids": ids}))
        assert (await recv_json(conn))["type"] == "unsubscribed"
        assert await pong(conn) == []


async def run_all(scenarios: dict[str, Awaitable[Any]], timeout: float) -> dict[str, Any]:
    """Run the clients concurrently; on a timeout, name the ones still running and where."""
    started = time.monotonic()
    took: dict[str, float] = {}

    async def timed(name: str, scenario: Awaitable[Any]) -> Any:
        try:
            return await scenario
        finally:
            took[name] = round(time.monotonic() - started, 2)

    tasks = {name: asyncio.ensure_future(timed(name, c)) for name, c in scenarios.items()}
    try:
        done, pending = await asyncio.wait(
            tasks.values(), timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
        )
        for task in done:
            task.result()  # the first failure, as it is
        if pending:
            stuck = {
                name: [f"{f.f_code.co_name}:{f.f_lineno}" for f in task.get_stack()]
                for name, task in tasks.items()
                if task in pending
            }
            pytest.fail(f"clients still running after {timeout}s: {stuck}")
        return {name: task.result() for name, task in tasks.items()}
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        print("seconds per client:", took)  # shown when the test fails


# --- the test -------------------------------------------------------------------------------


async def test_ws_fuzz_never_disturbs_a_well_behaved_client(
    ws_server: Any, http: httpx.AsyncClient, make_stock: MakeStock
) -> None:
    base_url, url = ws_server.base_url, ws_server.ws_url
    product_id, [warehouse_id] = await make_stock(100)
    key = (product_id, warehouse_id)
    async with ws(url) as conn:
        watcher = Watcher(conn)
        await watcher.subscribe(product_id)
        watcher.task = asyncio.create_task(watcher.run())
        heartbeat = Heartbeat(http, base_url, watcher, product_id, warehouse_id)
        stop = asyncio.Event()
        beating: asyncio.Task[None] | None = None
        try:
            await heartbeat.beat()  # the path works before any fuzzing
            beating = asyncio.create_task(heartbeat.run(stop))
            results = await run_all(
                {
                    "malformed": malformed_client(url, product_id),
                    **{
                        f"random-{seed}": random_client(url, product_id, seed, 200)
                        for seed in range(4)
                    },
                    "oversized": oversized_clients(url),
                    "invalid-utf8": invalid_utf8_client(url),
                    "churn": churn_client(url, http, base_url, make_stock),
                    "flood": flooding_client(url),
                    "subscription-limit": subscription_limit_client(url),
                },
                timeout=20,
            )
            assert results["malformed"] > 50
            stop.set()
            await asyncio.wait_for(beating, DELIVERY_DEADLINE + 5)
            beats_during = heartbeat.beats - 1
            await heartbeat.beat()  # and still receives updates afterwards
            assert not watcher.task.done()  # never saw an error or a close
        finally:
            stop.set()
            for task in (beating, watcher.task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    assert beats_during >= 3, f"only {beats_during} adjustments went through while fuzzing"
    assert heartbeat.slowest < DELIVERY_DEADLINE
    assert watcher.stock_messages >= heartbeat.beats  # each adjustment as a stock message
    assert ws_server.proc.poll() is None, "the server process died"
    assert (await http.get(f"{base_url}/ready")).status_code == 200
    # A new client is served normally.
    async with ws(url) as conn:
        fresh = Watcher(conn)
        await fresh.subscribe(product_id)
        assert fresh.versions[key] >= watcher.versions[key]


# --- Hypothesis: random frames and random op sequences ------------------------------------------

# Valid product ids of this test's own (nobody changes their stock), plus one with stock.
POOL = [f"hz-{i}" for i in range(6)]


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["op", "product_ids", "since", ""]) | st.text(max_size=8),
                inner,
                max_size=4,
            )
        ),
        max_leaves=12,
    )


def _near_commands() -> st.SearchStrategy[dict[str, Any]]:
    """Commands with one part wrong: ops, ids, since maps, extra fields."""
    ids = st.lists(st.sampled_from(POOL) | st.text(max_size=130), max_size=4) | _json_values()
    return st.fixed_dictionaries(
        {"op": st.sampled_from(["subscribe", "unsubscribe", "ping", "Subscribe", "", "pong"])},
        optional={
            "product_ids": ids,
            "since": st.dictionaries(
                st.sampled_from(POOL),
                st.dictionaries(st.text(max_size=70), st.integers() | st.floats() | st.text()),
            )
            | _json_values(),
            "extra": _json_values(),
        },
    )


BAD_FRAMES = st.one_of(
    st.text(max_size=200),
    _json_values().map(json.dumps),
    _near_commands().map(json.dumps),
    st.integers(1, 5_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 5_000).map(lambda n: '{"op": "subscribe", "product_ids": ' + "[" * n),
    st.binary(max_size=300),
)


class WsProtocolMachine(RuleBasedStateMachine):
    """One connection per example; a model of its subscriptions.

    Every bad frame gets exactly one ``error`` whose code is what the protocol's parser
    says (:func:`realtime.protocol.parse_command` is the oracle; frames it accepts are
    not bad frames), the connection stays open, and valid ops keep their contract:
    snapshots only for newly subscribed products and before ``subscribed``.
    """

    url = ""  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.conn = sync_connect(
            self.url, open_timeout=10, max_size=None, compression=None, ping_interval=None
        ).__enter__()  # left in teardown
        self.subscribed: set[str] = set()

    def recv(self) -> dict[str, Any]:
        raw = self.conn.recv(timeout=10)
        assert isinstance(raw, str), raw
        message = orjson.loads(raw)
        assert isinstance(message, dict), message
        if message["type"] == "error":
            assert set(message) == {"type", "code", "message"}, message
            assert message["code"] in ERROR_CODES, message
            assert message["message"], message
        return message

    @rule(ids=st.lists(st.sampled_from(POOL), min_size=1, max_size=4))
    def subscribe(self, ids: list[str]) -> None:
        self.conn.send(text({"op": "subscribe", "product_ids": ids}))
        snapshots = set()
        while (message := self.recv())["type"] == "snapshot":
            assert message["product_id"] in set(ids) - self.subscribed, message
            snapshots.add(message["product_id"])
        assert message["type"] == "subscribed", message
        assert set(message["product_ids"]) == set(ids), message
        assert snapshots == set(ids) - self.subscribed
        self.subscribed |= set(ids)

    @rule(ids=st.lists(st.sampled_from(POOL), min_size=1, max_size=4))
    def unsubscribe(self, ids: list[str]) -> None:
        self.conn.send(text({"op": "unsubscribe", "product_ids": ids}))
        message = self.recv()
        assert message["type"] == "unsubscribed", message
        self.subscribed -= set(ids)

    @rule()
    def ping(self) -> None:
        self.conn.send('{"op": "ping"}')
        assert self.recv()["type"] == "pong"

    @rule(frame=BAD_FRAMES)
    def bad_frame(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            expected = "unsupported_frame"
        else:
            try:
                parse_command(frame)
            except ProtocolError as error:
                expected = error.code.value
            else:
                assume(False)  # a valid command: not what this rule is about
        self.conn.send(frame)
        message = self.recv()
        assert message["type"] == "error", (frame[:200], message)
        assert message["code"] == expected, (frame[:200], message)

    @invariant()
    def still_open(self) -> None:
        assert self.conn.close_code is None

    def teardown(self) -> None:
        self.conn.__exit__(None, None, None)


async def test_ws_protocol_state_machine(ws_server: Any) -> None:
    """Hypothesis drives random op sequences with random bad frames; afterwards the
    server is alive and ready and its memory did not grow without bound."""
    process = psutil.Process(ws_server.pid)
    before = process.memory_info().rss
    WsProtocolMachine.url = ws_server.ws_url
    machine_settings = settings(
        max_examples=30,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    await asyncio.to_thread(run_state_machine_as_test, WsProtocolMachine, settings=machine_settings)
    grown = process.memory_info().rss - before
    assert grown < 64 << 20, f"server grew by {grown / 2**20:.1f} MiB"
    assert ws_server.proc.poll() is None
    async with httpx.AsyncClient(timeout=10) as c:
        assert (await c.get(f"{ws_server.base_url}/ready")).status_code == 200
