"""Pure tests of the real-time core: protocol parsing/encoding, conflation, hub logic.

No database or Redis: the hub is driven through its stream callback with a fake transport
and an in-memory level reader; its Redis client points at a socket path that does not
exist. The endpoint tests at the end serve it with uvicorn in-process, as ``inventory
serve`` does (websockets-sansio), to check the direct-write transport and the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode

from inventory.domain.model import PRODUCT_ID_RULE, WAREHOUSE_ID_RULE
from realtime import feed
from realtime.conflation import ConflationBuffer, Offer
from realtime.feed import AlertData, KitData, StockData
from realtime.hub import Hub, HubSettings
from realtime.keys import RedisKeys
from realtime.ports import LevelState, StockChange
from realtime.protocol import (
    MAX_SUBSCRIPTIONS,
    PONG,
    ErrorCode,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    encode_alert,
    encode_error,
    encode_kit,
    encode_snapshot,
    encode_stock,
    parse_command,
    stock_from_change,
    stock_from_level,
    text_frame,
    validate_product_ids,
)
from realtime.session import HubStats, TransportClosed
from realtime.ws import websocket_route

T0 = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)

# --- protocol -----------------------------------------------------------------------


def test_parse_valid_commands() -> None:
    assert parse_command('{"op":"ping"}') == Ping()
    assert parse_command('{"op":"unsubscribe","product_ids":["a"]}') == Unsubscribe(("a",))
    command = parse_command(
        '{"op":"subscribe","product_ids":["a","b:1","a"],"since":{"a":{"w-1":3}}}'
    )
    assert command == Subscribe(("a", "b:1"), {"a": {"w-1": 3}})


SINCE = '{"op":"subscribe","product_ids":["a"],"since":%s}'
NO_IDS = "product_ids must be a non-empty list of product ids"
MUST = f"must be {PRODUCT_ID_RULE}"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{", ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ("[1]", ErrorCode.INVALID_MESSAGE),
        ('{"product_ids":["a"]}', ErrorCode.INVALID_MESSAGE),
        ('{"op":3}', ErrorCode.INVALID_MESSAGE),
        ('{"op":"publish"}', ErrorCode.UNKNOWN_OP),
        ('{"op":"ping","x":1}', ErrorCode.INVALID_MESSAGE),
        ('{"op":"subscribe"}', ErrorCode.INVALID_MESSAGE),
        ('{"op":"subscribe","product_ids":[]}', ErrorCode.INVALID_MESSAGE),
        ('{"op":"subscribe","product_ids":"a"}', ErrorCode.INVALID_MESSAGE),
        ('{"op":"subscribe","product_ids":[1]}', ErrorCode.INVALID_PRODUCT_ID),
        ('{"op":"subscribe","product_ids":["a b"]}', ErrorCode.INVALID_PRODUCT_ID),
        ('{"op":"subscribe","product_ids":["a/b"]}', ErrorCode.INVALID_PRODUCT_ID),
        ('{"op":"subscribe","product_ids":[""]}', ErrorCode.INVALID_PRODUCT_ID),
        ('{"op":"subscribe","product_ids":["' + "x" * 129 + '"]}', ErrorCode.INVALID_PRODUCT_ID),
        ('{"op":"unsubscribe","product_ids":["*"]}', ErrorCode.INVALID_PRODUCT_ID),
        (SINCE % "[]", ErrorCode.INVALID_MESSAGE),
        (SINCE % '{"b":{}}', ErrorCode.INVALID_MESSAGE),
        (SINCE % '{"a":1}', ErrorCode.INVALID_MESSAGE),
        (SINCE % '{"a":{"w":-1}}', ErrorCode.INVALID_MESSAGE),
        (SINCE % '{"a":{"w":true}}', ErrorCode.INVALID_MESSAGE),
        (SINCE % '{"a":{"w":1.5}}', ErrorCode.INVALID_MESSAGE),
        (SINCE % '{"a":{"w:x":1}}', ErrorCode.INVALID_MESSAGE),
        ('{"a":' * 5000 + "1" + "}" * 5000, ErrorCode.INVALID_JSON),  # too deep to find "op"
        ('{"op":"subscribe","product_ids":' + "[" * 999 + "]" * 999 + "}",
         ErrorCode.INVALID_PRODUCT_ID),  # quoted back without exhausting the stack
    ],
)  # fmt: skip
def test_parse_rejects(text: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_command(text)
    assert info.value.code is code
    assert info.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "message must be a JSON object"),
        ('{"product_ids":["a"]}', "message needs a string field 'op'"),
        ('{"op":null}', "message needs a string field 'op'"),
        ('{"op":"publish"}', "unknown op 'publish'; expected subscribe, unsubscribe or ping"),
        ('{"op":"ping","b":1,"a":2}', "unknown field(s) for ping: ['a', 'b']"),
        ('{"op":"unsubscribe"}', NO_IDS),
        ('{"op":"subscribe","product_ids":[]}', NO_IDS),
        ('{"op":"subscribe","product_ids":["a",null]}', f"product id None {MUST}"),
        ('{"op":"subscribe","product_ids":["a\\n"]}', f"product id 'a\\n' {MUST}"),
        (SINCE % "[]", "since must be an object {product_id: {warehouse_id: version}}"),
        (SINCE % '{"b":{}}', "since names product 'b' that is not in product_ids"),
        (SINCE % '{"a":1}', "since values must be objects {warehouse_id: version}"),
        (SINCE % '{"a":{"w:x":1}}', f"warehouse id 'w:x' must be {WAREHOUSE_ID_RULE}"),
        (SINCE % '{"a":{"w":9223372036854775808}}', "since versions must be integers from 0 to "
                                                     "2^63-1"),
    ],
)  # fmt: skip
def test_parse_error_messages(text: str, message: str) -> None:
    """Each kind of refusal: msgspec's error location becomes the SPEC's message."""
    with pytest.raises(ProtocolError) as info:
        parse_command(text)
    assert info.value.message == message


def test_parse_accepts_null_since_and_the_largest_version() -> None:
    assert parse_command(SINCE % "null") == Subscribe(("a",))
    largest = parse_command(SINCE % '{"a":{"w":9223372036854775807}}')
    assert largest == Subscribe(("a",), {"a": {"w": 2**63 - 1}})
    assert validate_product_ids(["b", "a", "b"]) == ("b", "a")


def test_parse_limits_product_count() -> None:
    ids = [f"p{i}" for i in range(MAX_SUBSCRIPTIONS + 1)]
    text = orjson.dumps({"op": "subscribe", "product_ids": ids}).decode()
    with pytest.raises(ProtocolError) as info:
        parse_command(text)
    assert info.value.code is ErrorCode.TOO_MANY_SUBSCRIPTIONS
    ok = orjson.dumps({"op": "subscribe", "product_ids": ids[:-1]}).decode()
    assert isinstance(parse_command(ok), Subscribe)


def test_error_messages_do_not_echo_large_input() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_command(orjson.dumps({"op": "x" * 10_000}).decode())
    assert len(info.value.message) < 200
    assert orjson.loads(encode_error(info.value.code, info.value.message)) == {
        "type": "error",
        "code": "unknown_op",
        "message": info.value.message,
    }


def test_stock_message_from_change_and_level() -> None:
    change = StockChange(7, 9, "p", "w", "reserved", 10, 4, 3, T0)
    assert stock_from_change(change) == (
        b'{"type":"stock","product_id":"p","warehouse_id":"w","quantity":10,"reserved":4,'
        b'"available":6,"version":3,"event":"reserved","ts":1735787045.678}'
    )
    level = LevelState("p", "w", 10, 4, 3, T0)
    assert orjson.loads(stock_from_level(level, "resync"))["event"] == "resync"


def test_the_hub_builds_the_client_messages_from_published_data() -> None:
    """What goes over Redis is versioned data; the client frame is the protocol's."""
    change = StockChange(7, 9, "p", "w", "reserved", 10, 4, 3, T0)
    data = feed.encode(StockData.from_change(change))
    assert data == b'["stock.v1","w","reserved",10,4,3,1735787045.678]'
    decoded = feed.decode(data)
    assert isinstance(decoded, StockData)
    assert encode_stock("p", decoded) == stock_from_change(change)
    kit = feed.decode(feed.encode(KitData(5, 9)))
    assert isinstance(kit, KitData)
    assert encode_kit("k", kit) == b'{"type":"kit","product_id":"k","reservable":5,"seq":9}'
    alert = feed.decode(feed.encode(AlertData("stock.low", 3, 1.5)))
    assert isinstance(alert, AlertData)
    assert encode_alert("p", alert) == (
        b'{"type":"alert","product_id":"p","event":"stock.low","reservable":3,"ts":1.5}'
    )


def test_feed_versions_tolerate_added_fields() -> None:
    """A newer publisher's extra trailing field is ignored; an unknown kind is unreadable."""
    assert feed.decode(b'["kit.v1",5,9,"added later"]') == KitData(5, 9)
    assert feed.decode(b'["kit.v2",5]') is None


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b"{}", b'{"type":"stock"}', b'["stock.v1","w",1]', b"\xff", b"[" * 5000],
)
def test_feed_decode_rejects_malformed(data: bytes) -> None:
    assert feed.decode(data) is None


def test_snapshot_message() -> None:
    message = orjson.loads(encode_snapshot("p", [LevelState("p", "w", 5, 1, 2, T0)]))
    assert message == {
        "type": "snapshot",
        "product_id": "p",
        "levels": [
            {
                "warehouse_id": "w",
                "quantity": 5,
                "reserved": 1,
                "available": 4,
                "version": 2,
                "updated_at": "2025-01-02T03:04:05.678000Z",
            }
        ],
    }
    assert orjson.loads(encode_snapshot("p", []))["levels"] == []


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_text_frame_matches_websockets_serialization(size: int) -> None:
    payload = b"x" * size
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame(payload) == expected


# --- conflation ---------------------------------------------------------------------


def drain(buffer: ConflationBuffer) -> list[str]:
    out = []
    while (message := buffer.pop()) is not None:
        out.append(message)
    return out


def test_conflation_keeps_newest_in_first_queued_order() -> None:
    buffer = ConflationBuffer(10)
    buffer.hold("p")
    buffer.release("p", {})
    assert buffer.offer("p", "a", 1, "a1") is Offer.QUEUED
    assert buffer.offer("p", "b", 1, "b1") is Offer.QUEUED
    assert buffer.offer("p", "a", 3, "a3") is Offer.CONFLATED
    assert buffer.offer("p", "a", 2, "a2") is Offer.STALE
    assert buffer.offer("q", "a", 1, "q") is Offer.IGNORED
    assert drain(buffer) == ["a3", "b1"]
    assert buffer.offer("p", "a", 3, "a3") is Offer.STALE
    assert buffer.offer("p", "a", 4, "a4") is Offer.QUEUED


def test_hold_release_snapshot_order_and_since() -> None:
    buffer = ConflationBuffer(10)
    buffer.hold("p")
    assert buffer.offer("p", "a", 5, "a5") is Offer.HELD
    assert buffer.offer("p", "b", 2, "b2") is Offer.HELD
    assert buffer.offer("p", "c", 9, "c9") is Offer.HELD
    assert buffer.pop() is None  # nothing goes out before the snapshot
    buffer.release("p", {"a": 5, "b": 1, "c": 10})  # snapshot a=5, b=1; since c=10
    assert drain(buffer) == ["b2"]
    assert len(buffer) == 0


def test_forget_drops_pending() -> None:
    buffer = ConflationBuffer(10)
    for product in ("p", "q"):
        buffer.hold(product)
        buffer.release(product, {})
    buffer.offer("p", "a", 1, "p")
    buffer.offer("q", "a", 1, "q")
    buffer.forget("p")
    assert "p" not in buffer
    assert drain(buffer) == ["q"]
    assert buffer.offer("p", "a", 2, "p") is Offer.IGNORED


def test_hand_out_checks_versions_and_defers_held_products() -> None:
    """The fast path's bookkeeping: what offer() then pop() would record, or None when the
    update must be buffered."""
    buffer: ConflationBuffer[str] = ConflationBuffer(4)
    assert buffer.hand_out("p", "w", 1) is None  # not subscribed
    buffer.hold("p")
    assert buffer.hand_out("p", "w", 1) is None  # awaiting its snapshot
    buffer.release("p", {"w": 2})
    assert buffer.hand_out("p", "w", 2) is False  # the snapshot had it
    assert buffer.hand_out("p", "w", 3) is True
    assert buffer.hand_out("p", "w", 3) is False
    assert buffer.offer("p", "w", 3, "again") is Offer.STALE  # recorded as handed out
    assert buffer.hand_out("p", "x", 1) is True
    assert not buffer.sendable


def test_overflow_is_bounded_and_reported() -> None:
    buffer = ConflationBuffer(2)
    buffer.hold("p")
    buffer.release("p", {})
    assert buffer.offer("p", "a", 1, "a") is Offer.QUEUED
    assert buffer.offer("p", "b", 1, "b") is Offer.QUEUED
    assert buffer.offer("p", "c", 1, "c") is Offer.OVERFLOW
    assert buffer.offer("p", "a", 2, "a2") is Offer.CONFLATED  # existing keys still conflate
    assert len(buffer) == 2
    assert drain(buffer) == ["a2", "b"]
    assert buffer.take_overflow() == ["p"]
    assert buffer.take_overflow() == []
    assert buffer.offer("p", "c", 1, "c") is Offer.QUEUED


_keys = st.tuples(st.sampled_from(["p", "q"]), st.sampled_from(["a", "b", "c"]))
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), _keys, st.integers(1, 30)),
        st.tuples(st.just("pop"), st.integers(1, 4)),
        st.tuples(st.just("subscribe"), st.sampled_from(["p", "q"])),
        st.tuples(st.just("snapshot"), st.sampled_from(["p", "q"])),
        st.tuples(st.just("unsubscribe"), st.sampled_from(["p", "q"])),
    ),
    max_size=80,
)


@settings(max_examples=400, deadline=None)
@given(ops=_ops, capacity=st.integers(1, 6))
def test_conflation_property(ops: list[tuple[Any, ...]], capacity: int) -> None:
    """Whatever the interleaving: per key the client never sees a version go back, never
    gets an update of a product before its snapshot, and after draining (plus the resync
    the buffer asks for) ends on the newest version of every key."""
    buffer = ConflationBuffer(capacity)
    truth: dict[tuple[str, str], int] = {}  # the database: newest committed version per key
    seen: dict[tuple[str, str], int] = {}  # what the client has
    snapshotted: set[str] = set()

    def deliver(message: str) -> None:
        product, warehouse, version = message.split("/")
        key = (product, warehouse)
        assert product in snapshotted
        assert int(version) > seen.get(key, 0)
        seen[key] = int(version)

    def snapshot(product: str) -> None:
        rows = {w: v for (p, w), v in truth.items() if p == product}
        for w, v in rows.items():
            seen[(product, w)] = max(seen.get((product, w), 0), v)
        snapshotted.add(product)
        buffer.release(product, rows)

    def offer(product: str, warehouse: str, version: int) -> None:
        buffer.offer(product, warehouse, version, f"{product}/{warehouse}/{version}")

    for op in ops:
        if op[0] == "offer":
            (product, warehouse), version = op[1], op[2]
            truth[(product, warehouse)] = max(truth.get((product, warehouse), 0), version)
            offer(product, warehouse, version)
        elif op[0] == "pop":
            for _ in range(op[1]):
                if (message := buffer.pop()) is not None:
                    deliver(message)
        elif op[0] == "subscribe":
            if op[1] not in buffer:
                buffer.hold(op[1])
        elif op[0] == "snapshot":
            if op[1] in buffer and op[1] not in snapshotted:
                snapshot(op[1])
        else:
            buffer.forget(op[1])
            snapshotted.discard(op[1])
            for key in [k for k in seen if k[0] == op[1]]:
                del seen[key]
        assert len(buffer) <= capacity

    for product in buffer.products:
        if product not in snapshotted:
            snapshot(product)
    while True:
        while (message := buffer.pop()) is not None:
            deliver(message)
        overflowed = buffer.take_overflow()
        if not overflowed:
            break
        for (product, warehouse), version in truth.items():  # the resync re-offers the truth
            if product in overflowed:
                offer(product, warehouse, version)
    for (product, warehouse), version in truth.items():
        if product in buffer:
            assert seen.get((product, warehouse)) == version


# --- hub and session (fake transport, in-memory levels) ------------------------------


def parse_frames(data: bytes) -> list[bytes]:
    """Payloads of concatenated unmasked server frames (text frames, final)."""
    payloads = []
    pos = 0
    while pos < len(data):
        assert data[pos] == 0x81
        size, pos = data[pos + 1], pos + 2
        if size == 126:
            size, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif size == 127:
            size, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        payloads.append(data[pos : pos + size])
        pos += size
    return payloads


class FakeTransport:
    """Records what is sent; ``block`` cleared = a client that does not read. A blocked
    socket takes no close frame either unless ``close_passes``. With ``direct`` it takes
    direct frame writes while not blocked (as uvicorn's transport while writable), else
    everything goes through ``send_text``."""

    def __init__(self, *, close_passes: bool = False, direct: bool = True) -> None:
        self.sent: list[dict[str, Any]] = []
        self.writes = 0  # direct writes (system calls, on a real socket)
        self.closed: tuple[int, str] | None = None
        self.block = asyncio.Event()
        self.block.set()
        self.close_passes = close_passes
        self.direct = direct
        self.pause_after: int | None = None  # block after this many direct writes

    def ready(self) -> bool:
        return self.direct and self.block.is_set() and self.closed is None

    def write(self, frames: bytes) -> None:
        assert self.ready()
        self.writes += 1
        self.sent += [orjson.loads(payload) for payload in parse_frames(frames)]
        if self.pause_after is not None and self.writes >= self.pause_after:
            self.block.clear()  # as asyncio calls pause_writing() inside write()

    async def wait_ready(self) -> bool:
        if not self.direct:
            return False
        await self.block.wait()
        if self.closed is not None:
            raise TransportClosed
        return True

    async def send_text(self, text: str) -> None:
        await self.block.wait()
        if self.closed is not None:
            raise TransportClosed
        self.sent.append(orjson.loads(text))

    async def close(self, code: int, reason: str) -> None:
        if not self.close_passes:
            await self.block.wait()
        self.closed = (code, reason)

    def abort(self) -> None:
        self.closed = (1006, "aborted")
        self.block.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["type"] == kind]


class FakeLevels:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], LevelState] = {}
        self.reads: list[list[str]] = []
        self.fail = False

    def set(self, product: str, warehouse: str, version: int, quantity: int = 10) -> bytes:
        self.rows[(product, warehouse)] = LevelState(product, warehouse, quantity, 0, version, T0)
        change = StockChange(1, 1, product, warehouse, "adjusted", quantity, 0, version, T0)
        return feed.encode(StockData.from_change(change))

    async def read_levels(self, product_ids: Sequence[str]) -> dict[str, list[LevelState]]:
        self.reads.append(list(product_ids))
        await asyncio.sleep(0)  # a round trip: other subscribes arrive meanwhile
        if self.fail:
            raise ConnectionError("database unavailable")
        return {p: [r for (q, _), r in sorted(self.rows.items()) if q == p] for p in product_ids}


async def settle() -> None:
    """Let the writer tasks run."""
    for _ in range(50):
        await asyncio.sleep(0)


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


@pytest.fixture(params=[True, False], ids=["direct", "asgi"])
def direct(request: pytest.FixtureRequest) -> bool:
    """Whether the fake socket takes direct writes (uvicorn) or only ASGI sends."""
    return bool(request.param)


@pytest.fixture
def levels() -> FakeLevels:
    return FakeLevels()


def no_redis(tmp_path: Path) -> aioredis.Redis:
    """A client whose every connection attempt fails at once: no server is ever reached, so
    the hub's subscriber stays down and its flush answers "not confirmed"."""
    return aioredis.Redis(unix_socket_path=str(tmp_path / "absent.sock"))


@pytest.fixture
def hub(levels: FakeLevels, tmp_path: Path) -> Hub:
    return Hub(no_redis(tmp_path), levels, prefix="t", settings=HubSettings(buffer_capacity=8))


def channel(product: str) -> bytes:
    return RedisKeys("t").stock_channel(product).encode()


async def test_hub_snapshot_then_updates_in_order(
    hub: Hub, levels: FakeLevels, direct: bool
) -> None:
    levels.set("p", "w1", 3)
    transport = FakeTransport(direct=direct)
    session = hub.open(transport)
    await hub.execute(session, Subscribe(("p",), {}))
    hub.on_message(channel("p"), levels.set("p", "w1", 3))  # in flight before the read: stale
    hub.on_message(channel("p"), levels.set("p", "w1", 4))
    hub.on_message(channel("p"), levels.set("p", "w2", 1))
    await settle()
    kinds = [m["type"] for m in transport.sent]
    assert kinds == ["snapshot", "subscribed", "stock", "stock"]
    assert transport.sent[0]["levels"][0]["version"] == 3
    assert [(m["warehouse_id"], m["version"]) for m in transport.of_type("stock")] == [
        ("w1", 4),
        ("w2", 1),
    ]
    assert hub.stats.stale == 1
    await hub.execute(session, Unsubscribe(("p",)))
    hub.on_message(channel("p"), levels.set("p", "w1", 5))
    await settle()
    assert transport.sent[-1] == {"type": "unsubscribed", "product_ids": ["p"]}
    assert hub.stats.topics == 0
    assert hub.stats.subscriptions == 0
    await session.close(1000, "")


async def test_hub_coalesces_a_burst(hub: Hub, levels: FakeLevels, direct: bool) -> None:
    transport = FakeTransport(direct=direct)
    session = hub.open(transport)
    await hub.execute(session, Subscribe(("p",), {}))
    for version in range(1, 6):  # read back to back, as from one socket read
        hub.on_message(channel("p"), levels.set("p", "w", version))
    await settle()
    assert [(m["version"], m["event"]) for m in transport.of_type("stock")] == [(5, "adjusted")]
    assert hub.stats.coalesced == 4
    await session.close(1000, "")


async def test_hub_since_and_empty_snapshot(hub: Hub, levels: FakeLevels, direct: bool) -> None:
    levels.set("p", "w1", 3)
    levels.set("p", "w2", 7)
    transport = FakeTransport(direct=direct)
    session = hub.open(transport)
    await hub.execute(session, Subscribe(("p", "none"), {"p": {"w1": 3, "w2": 5}}))
    hub.on_message(channel("p"), levels.set("p", "w1", 3))
    await settle()
    snapshots = {m["product_id"]: m["levels"] for m in transport.of_type("snapshot")}
    assert [lv["warehouse_id"] for lv in snapshots["p"]] == ["w2"]
    assert snapshots["none"] == []
    assert transport.of_type("stock") == []
    await session.close(1000, "")


async def test_hub_gap_triggers_resync(hub: Hub, levels: FakeLevels, direct: bool) -> None:
    await hub.start()
    try:
        levels.set("p", "w1", 1)
        levels.set("p", "w2", 1)
        transport = FakeTransport(direct=direct)
        session = hub.open(transport)
        await hub.execute(session, Subscribe(("p",), {}))
        levels.set("p", "w2", 2)  # its message is "lost"
        levels.set("p", "w1", 2)
        hub.on_message(channel("p"), levels.set("p", "w1", 3))  # gap: 1 -> 3
        await eventually(lambda: any(m["warehouse_id"] == "w2" for m in transport.of_type("stock")))
        assert hub.stats.gaps == 1
        resent = [m for m in transport.of_type("stock") if m["warehouse_id"] == "w2"]
        assert resent[-1]["version"] == 2
        assert resent[-1]["event"] == "resync"
        assert [m["version"] for m in transport.of_type("stock") if m["warehouse_id"] == "w1"] == [
            3
        ]
    finally:
        await hub.stop()
    assert transport.closed == (1001, "server shutting down")


class FakeKits:
    """``extra_snapshots`` of one kit ``k`` made of ``p``: its current number, ``seq``
    counted per read (:class:`inventory.service.commerce_feed.KitSnapshots` counts it per
    change of the number; a count per read is as good for these tests)."""

    def __init__(self) -> None:
        self.reservable = 3
        self.seq = 0

    async def __call__(
        self, product_ids: Sequence[str], related: Sequence[str] = ()
    ) -> list[tuple[str, KitData]]:
        if "k" not in product_ids and "p" not in related:
            return []
        self.seq += 1
        return [("k", KitData(self.reservable, self.seq))]


async def test_resync_after_a_reconnect_sends_kit_numbers_again(
    levels: FakeLevels, tmp_path: Path, direct: bool
) -> None:
    """A kit message lost while Redis was away is made good by the resync that follows
    the reconnect, as stock rows are: every subscriber of the kit gets its current number."""
    kits = FakeKits()
    hub = Hub(no_redis(tmp_path), levels, prefix="t", extra_snapshots=kits)
    await hub.start()
    try:
        transports = [FakeTransport(direct=direct) for _ in range(2)]
        for transport in transports:
            await hub.execute(hub.open(transport), Subscribe(("k",), {}))
        await eventually(lambda: all(t.of_type("kit") for t in transports))
        assert [[(m["reservable"], m["seq"]) for m in t.of_type("kit")] for t in transports] == [
            [(3, 1)], [(3, 2)],
        ]  # fmt: skip
        kits.reservable = 1  # its kit message is "lost" with the connection
        hub.on_connected(True)
        await eventually(lambda: all(len(t.of_type("kit")) == 2 for t in transports))
        assert [t.of_type("kit")[-1]["reservable"] for t in transports] == [1, 1]
        assert hub.stats.redis_reconnects == 1
    finally:
        await hub.stop()


async def test_hub_rereads_a_product_whose_message_it_cannot_read(
    hub: Hub, levels: FakeLevels
) -> None:
    """A newer publisher's message kind (rolling upgrade): the row behind it is re-read
    from the database, so the client is not left on a stale value."""
    await hub.start()
    try:
        levels.set("p", "w", 1)
        transport = FakeTransport(direct=True)
        session = hub.open(transport)
        await hub.execute(session, Subscribe(("p",)))
        levels.set("p", "w", 2)
        hub.on_message(channel("p"), b'["stock.v2","w",2]')
        await eventually(lambda: bool(transport.of_type("stock")))
        [resent] = transport.of_type("stock")
        assert (resent["version"], resent["event"]) == (2, "resync")
    finally:
        await hub.stop()


async def test_a_gap_on_a_component_resyncs_the_kits_using_it(
    levels: FakeLevels, tmp_path: Path, direct: bool
) -> None:
    """Messages lost with a gap on component ``p`` may include those of kit ``k``: the
    resync of ``p`` also re-reads ``k`` (the hook's ``related``) for ``k``'s subscribers."""
    kits = FakeKits()
    hub = Hub(no_redis(tmp_path), levels, prefix="t", extra_snapshots=kits)
    await hub.start()
    try:
        levels.set("p", "w", 1)
        watcher, kit_fan = FakeTransport(direct=direct), FakeTransport(direct=direct)
        await hub.execute(hub.open(watcher), Subscribe(("p",), {}))
        await hub.execute(hub.open(kit_fan), Subscribe(("k",), {}))
        await eventually(lambda: bool(kit_fan.of_type("kit")))
        kits.reservable = 2  # its kit message is lost, like p's version 2
        levels.set("p", "w", 2)
        hub.on_message(channel("p"), levels.set("p", "w", 3))  # gap: 1 -> 3
        await eventually(lambda: len(kit_fan.of_type("kit")) == 2)
        assert kit_fan.of_type("kit")[-1]["reservable"] == 2
        assert watcher.of_type("kit") == []  # not subscribed to the kit
        assert hub.stats.gaps == 1
    finally:
        await hub.stop()


def writer_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "realtime-session-writer"]


async def test_writable_sessions_get_one_direct_write_per_burst_and_no_task(
    hub: Hub, levels: FakeLevels
) -> None:
    transports = [FakeTransport() for _ in range(3)]
    sessions = [hub.open(t) for t in transports]
    for session in sessions:
        await hub.execute(session, Subscribe(("p",), {}))
    writes = [t.writes for t in transports]
    for warehouse in ("w1", "w2", "w3"):  # one burst, three rows
        hub.on_message(channel("p"), levels.set("p", warehouse, 1))
    assert writer_tasks() == []
    await settle()
    for transport, before in zip(transports, writes, strict=True):
        assert transport.writes == before + 1
        stock = [(m["warehouse_id"], m["version"]) for m in transport.of_type("stock")]
        assert stock == [("w1", 1), ("w2", 1), ("w3", 1)]
    assert hub.stats.deliveries == 9
    assert writer_tasks() == []
    for session in sessions:
        await session.close(1000, "")


async def test_backpressure_moves_writes_to_a_writer_that_ends_on_the_newest(
    hub: Hub, levels: FakeLevels
) -> None:
    """The socket pushes back in the middle of a burst: the rest waits (conflated) for a
    writer task, which catches up once the client reads and then goes away; later
    updates are written directly again. Versions never go backwards on the way."""
    transport = FakeTransport()
    session = hub.open(transport)
    await hub.execute(session, Subscribe(("p", "q"), {}))
    transport.pause_after = transport.writes + 1
    hub.on_message(channel("p"), levels.set("p", "w", 1))  # written; the socket pauses
    await settle()
    assert writer_tasks() == []  # nothing is waiting yet
    for version in range(2, 40):
        hub.on_message(channel("p"), levels.set("p", "w", version))
        hub.on_message(channel("q"), levels.set("q", "w", version))
        await settle()
    assert len(writer_tasks()) == 1
    assert session.blocked_since is not None
    assert len(session.buffer) == 2  # one pending state per row
    assert hub.stats.conflated > 0
    transport.pause_after = None
    writes, sent = transport.writes, len(transport.sent)
    transport.block.set()  # the client reads again
    await settle()
    assert writer_tasks() == []
    assert session.blocked_since is None
    # The writer kept nothing aside while it waited: one direct write of the newest
    # state of each row, no step in between and no per-message send.
    assert transport.writes == writes + 1
    caught_up = [(m["product_id"], m["version"]) for m in transport.sent[sent:]]
    assert caught_up == [("p", 39), ("q", 39)]
    seen: dict[str, int] = {}
    for message in transport.of_type("stock"):
        assert message["version"] > seen.get(message["product_id"], 0)
        seen[message["product_id"]] = message["version"]
    assert seen == {"p": 39, "q": 39}
    writes = transport.writes
    hub.on_message(channel("p"), levels.set("p", "w", 40))
    await settle()
    assert transport.writes == writes + 1
    assert transport.of_type("stock")[-1]["version"] == 40
    await session.close(1000, "")


async def test_concurrent_subscribes_share_snapshot_reads(hub: Hub, levels: FakeLevels) -> None:
    """A subscribe storm costs a read per round, each product read once, not one read
    per client; every client still gets its snapshots before ``subscribed``."""
    for product in ("a", "b", "c"):
        levels.set(product, "w", 4)
    transports = [FakeTransport() for _ in range(30)]
    sessions = [hub.open(t) for t in transports]
    products = [("a", "b"), ("b", "c"), ("c", "a")]
    await asyncio.gather(
        *(hub.execute(s, Subscribe(products[i % 3], {})) for i, s in enumerate(sessions))
    )
    assert len(levels.reads) <= 2
    assert all(len(read) == len(set(read)) for read in levels.reads)
    for i, transport in enumerate(transports):
        assert [(m["type"], m.get("product_id")) for m in transport.sent] == [
            *(("snapshot", p) for p in products[i % 3]),
            ("subscribed", None),
        ]
        assert all(m["levels"][0]["version"] == 4 for m in transport.of_type("snapshot"))
    for session in sessions:
        await session.close(1000, "")


async def test_failed_snapshot_read_answers_unavailable_and_subscribes_nothing(
    hub: Hub, levels: FakeLevels
) -> None:
    levels.fail = True
    sessions = [hub.open(FakeTransport()) for _ in range(3)]
    outcomes = await asyncio.gather(
        *(hub.execute(s, Subscribe(("p",), {})) for s in sessions), return_exceptions=True
    )
    assert all(isinstance(o, ProtocolError) and o.code is ErrorCode.UNAVAILABLE for o in outcomes)
    assert hub.stats.topics == 0
    assert hub.stats.subscriptions == 0
    assert all("p" not in s.buffer for s in sessions)
    levels.fail = False
    await hub.execute(sessions[0], Subscribe(("p",), {}))  # the retry works
    assert hub.stats.subscriptions == 1
    for session in sessions:
        await session.close(1000, "")


async def test_too_many_subscriptions(levels: FakeLevels, tmp_path: Path) -> None:
    hub = Hub(no_redis(tmp_path), levels, settings=HubSettings(max_subscriptions=2))
    session = hub.open(FakeTransport())
    await hub.execute(session, Subscribe(("a", "b"), {}))
    with pytest.raises(ProtocolError) as info:
        await hub.execute(session, Subscribe(("c",), {}))
    assert info.value.code is ErrorCode.TOO_MANY_SUBSCRIPTIONS
    await hub.execute(session, Subscribe(("a",), {}))  # already subscribed: no new slot
    await session.close(1000, "")


async def test_slow_session_is_bounded_and_catches_up(
    hub: Hub, levels: FakeLevels, direct: bool
) -> None:
    await hub.start()
    try:
        transport = FakeTransport(direct=direct)
        session = hub.open(transport)
        products = [f"p{i}" for i in range(20)]
        await hub.execute(session, Subscribe(tuple(products), {}))
        await settle()
        transport.block.clear()  # the client stops reading
        for version in range(1, 51):
            for product in products:
                hub.on_message(channel(product), levels.set(product, "w", version))
            await settle()  # one burst per round
        assert len(session.buffer) <= 8
        assert hub.stats.overflows > 0
        assert hub.stats.conflated > 0
        transport.block.set()  # reads again: ends on the newest state of every row

        def latest() -> dict[Any, Any]:
            return {m["product_id"]: m["version"] for m in transport.of_type("stock")}

        await eventually(lambda: latest() == dict.fromkeys(products, 50))
    finally:
        await hub.stop()


async def test_control_messages_precede_updates_and_ping(hub: Hub, direct: bool) -> None:
    transport = FakeTransport(direct=direct)
    session = hub.open(transport)
    await hub.execute(session, Ping())
    await settle()
    assert transport.sent == [orjson.loads(PONG)]
    await session.close(1000, "")
    assert session.closed
    assert hub.stats.connections == 0


@pytest.mark.parametrize("close_passes", [True, False])
async def test_client_that_stops_reading_is_closed(
    levels: FakeLevels, tmp_path: Path, close_passes: bool, direct: bool
) -> None:
    settings = HubSettings(send_timeout=0.2, close_timeout=0.1)
    hub = Hub(no_redis(tmp_path), levels, prefix="t", settings=settings)
    await hub.start()
    try:
        transport = FakeTransport(close_passes=close_passes, direct=direct)
        session = hub.open(transport)
        await hub.execute(session, Subscribe(("p",), {}))
        await settle()
        transport.block.clear()
        hub.on_message(channel("p"), levels.set("p", "w", 1))
        await eventually(lambda: session.closed and transport.closed is not None)
        expected = (4008, "slow consumer: not reading for 0.2s")
        assert transport.closed == (expected if close_passes else (1006, "aborted"))
        assert hub.stats.slow_disconnects == 1
        assert hub.stats.connections == 0
        assert hub.stats.topics == 0
    finally:
        await hub.stop()


# --- the endpoint on uvicorn (in-process, websockets-sansio as `inventory serve`) ------


@contextlib.asynccontextmanager
async def served(hub: Hub, authenticate: Any = None, **options: Any) -> AsyncIterator[str]:
    """The hub's route on an in-process uvicorn; yields the WebSocket URL. ``options``:
    more ``uvicorn.Config`` arguments."""
    config = uvicorn.Config(
        Starlette(routes=[websocket_route(hub, authenticate)]),
        host="127.0.0.1",
        port=0,
        ws="websockets-sansio",
        ws_max_size=65536,
        ws_per_message_deflate=False,
        lifespan="off",
        log_level="warning",
        **options,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/ws"
    finally:
        server.should_exit = True
        await serving


async def test_uvicorn_connections_are_written_directly(levels: FakeLevels, tmp_path: Path) -> None:
    """On uvicorn's websockets-sansio protocol a delivery is a direct frame write: no
    writer task is created, and what arrives is what the ASGI send would have sent."""
    hub = Hub(no_redis(tmp_path), levels, prefix="t")
    levels.set("p", "w", 1)
    loop = asyncio.get_running_loop()
    created: list[str] = []

    def record(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with served(hub) as url, connect(url, compression=None) as client:
        await client.send('{"op":"subscribe","product_ids":["p"]}')
        snapshot = orjson.loads(await client.recv())
        assert (snapshot["type"], snapshot["levels"][0]["version"]) == ("snapshot", 1)
        assert orjson.loads(await client.recv())["type"] == "subscribed"
        loop.set_task_factory(record)
        try:
            hub.on_message(channel("p"), levels.set("p", "w", 2))
            hub.on_message(channel("p"), levels.set("p", "x", 1))
            received = [orjson.loads(await client.recv()) for _ in range(2)]
        finally:
            loop.set_task_factory(None)
        assert [(m["warehouse_id"], m["version"]) for m in received] == [("w", 2), ("x", 1)]
        published = feed.decode(levels.set("p", "w", 2))
        assert isinstance(published, StockData)
        assert received[0] == orjson.loads(encode_stock("p", published))
        assert "Session._write_loop" not in created
        await client.send('{"op":"ping"}')
        assert orjson.loads(await client.recv()) == {"type": "pong"}
    assert hub.stats.deliveries == 2
    await eventually(lambda: hub.stats.connections == 0)


async def test_handshake_is_refused_without_a_valid_token(
    levels: FakeLevels, tmp_path: Path
) -> None:
    hub = Hub(no_redis(tmp_path), levels, prefix="t")

    async def authenticate(
        websocket: WebSocket, refusal: Response | None = None
    ) -> Response | None:
        token = websocket.query_params.get("token")
        if token == "reader":
            return refusal
        return JSONResponse({"error": {"code": "x"}}, 401 if token is None else 403)

    async with served(hub, authenticate) as url:
        for query, status in (("", 401), ("?token=writer", 403)):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url + query):
                    pass
            assert refused.value.response.status_code == status
        assert hub.stats.connections_total == 0
        async with connect(url + "?token=reader") as client:
            await client.send('{"op":"ping"}')
            assert orjson.loads(await client.recv()) == {"type": "pong"}


def test_every_hub_counter_is_exported() -> None:
    from inventory.ops.app import _HUB_COUNTERS, _HUB_GAUGES

    exported = set(_HUB_COUNTERS) | set(_HUB_GAUGES)
    assert {f.name for f in dataclasses.fields(HubStats)} == exported
