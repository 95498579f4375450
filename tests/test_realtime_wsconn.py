"""The handed-off WebSocket connection (realtime/wsconn.py, realtime/handoff.py).

The hub's route is served by an in-process uvicorn exactly as ``inventory serve`` runs it
(websockets-sansio), with an in-memory level reader; clients are raw sockets speaking
frames by hand (to send what a library client never would) or the ``websockets`` client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

from realtime import handoff
from realtime.handoff import abort_connection, check_compatible
from realtime.hub import Hub, HubSettings
from realtime.wsconn import WsConnection

from .test_realtime_unit import FakeLevels, channel, eventually, no_redis, served


class RawClient:
    """A WebSocket client that writes arbitrary frames and reads server frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(
        self, opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0
    ) -> None:
        mask = os.urandom(4) if masked else b""
        size = len(payload)
        if size < 126:
            length = bytes((size,))
        elif size < 1 << 16:
            length = b"\x7e" + size.to_bytes(2, "big")
        else:
            length = b"\x7f" + size.to_bytes(8, "big")
        header = (
            bytes(((0x80 if fin else 0) | rsv | opcode,))
            + bytes(((0x80 if masked else 0) | length[0],))
            + length[1:]
        )
        body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload)) if masked else payload
        self.writer.write(header + mask + body)

    async def frame(self, timeout: float = 5.0) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""
        async with asyncio.timeout(timeout):
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                length = int.from_bytes(await self.reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await self.reader.readexactly(8), "big")
            return first & 0x0F, await self.reader.readexactly(length)

    async def message(self) -> dict[str, Any]:
        opcode, payload = await self.frame()
        assert opcode == 1, (opcode, payload)
        result: dict[str, Any] = orjson.loads(payload)
        return result

    async def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            opcode, payload = await self.frame()
            if opcode == 8:
                return Close.parse(payload).code


@contextlib.asynccontextmanager
async def raw(url: str, receive_buffer: int | None = None) -> AsyncIterator[RawClient]:
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    sock = socket.socket()
    if receive_buffer is not None:  # before connecting: the window is negotiated then
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    try:
        yield RawClient(reader, writer)
    finally:
        writer.close()


@pytest.fixture
def levels() -> FakeLevels:
    return FakeLevels()


@pytest.fixture
def hub(levels: FakeLevels, tmp_path: Path) -> Hub:
    return Hub(no_redis(tmp_path), levels, prefix="t")


def connections(hub: Hub) -> list[Any]:
    return [session._transport for session in hub._sessions]


def test_uvicorn_is_compatible_with_the_handoff() -> None:
    """Fails loudly when a uvicorn upgrade changes what realtime/handoff.py relies on."""
    check_compatible()


def test_an_incompatible_uvicorn_is_named_not_obscure(monkeypatch: pytest.MonkeyPatch) -> None:
    """What an upgrade that breaks the handoff looks like: a missing attribute, or the
    private module gone (checked in a fresh interpreter, where importing fails)."""
    monkeypatch.setattr(handoff, "_ATTRIBUTES", (*handoff._ATTRIBUTES, "renamed_in_0_99"))
    with pytest.raises(RuntimeError, match=r"missing: renamed_in_0_99.*before upgrading uvicorn"):
        check_compatible()
    gone = "import sys; sys.modules['uvicorn.protocols.websockets.websockets_sansio_impl'] = None"
    result = subprocess.run(
        [sys.executable, "-c", f"{gone}; import realtime.handoff"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "uvicorn has no WebSocketsSansIOProtocol any more" in result.stderr


def test_abort_without_uvicorn_underneath_does_nothing() -> None:
    async def receive() -> dict[str, Any]:
        return {}

    abort_connection(receive)  # a plain function: no protocol object, nothing to drop


async def test_connections_are_handed_off_and_idle_ones_have_no_task(
    hub: Hub, levels: FakeLevels
) -> None:
    levels.set("p", "w", 1)
    async with served(hub) as url:
        baseline = len(asyncio.all_tasks())
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(raw(url)) for _ in range(20)]
            for client in clients:
                client.send(1, b'{"op":"subscribe","product_ids":["p"]}')
            for client in clients:
                assert (await client.message())["type"] == "snapshot"
                assert (await client.message())["type"] == "subscribed"
            assert all(isinstance(c, WsConnection) for c in connections(hub))
            assert hub.stats.connections == 20
            # uvicorn's per-connection ASGI tasks have ended; no task of ours while idle
            await eventually(lambda: len(asyncio.all_tasks()) <= baseline)
            hub.on_message(channel("p"), levels.set("p", "w", 2))
            for client in clients:
                update = await client.message()
                assert (update["type"], update["version"]) == ("stock", 2)
        await eventually(lambda: hub.stats.connections == 0)
        assert hub.stats.subscriptions == 0


async def test_fragmented_message_ping_and_binary(hub: Hub) -> None:
    async with served(hub) as url, raw(url) as client:
        client.send(1, b'{"op":', fin=False)
        client.send(9, b"hello")  # a control frame between fragments is allowed
        client.send(0, b'"pi', fin=False)
        client.send(0, b'ng"}')
        assert await client.frame() == (10, b"hello")
        assert await client.message() == {"type": "pong"}
        client.send(2, b"\x00binary")
        error = await client.message()
        assert (error["type"], error["code"]) == ("error", "unsupported_frame")
        client.send(1, b"not json")
        assert (await client.message())["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"opcode": 1, "payload": b"{}", "masked": False}, 1002),
        ({"opcode": 1, "payload": b"{}", "rsv": 0x40}, 1002),  # no extension negotiated
        ({"opcode": 0, "payload": b"{}"}, 1002),  # continuation without a start
        ({"opcode": 3, "payload": b""}, 1002),  # reserved opcode
        ({"opcode": 9, "payload": b"x" * 126}, 1002),  # control frame too long
        ({"opcode": 9, "payload": b"x", "fin": False}, 1002),  # fragmented control frame
        ({"opcode": 1, "payload": b"\xff\xfe"}, 1007),  # not UTF-8
        ({"opcode": 1, "payload": b"x" * (64 * 1024 + 1)}, 1009),
        ({"opcode": 8, "payload": b"\x03"}, 1002),  # close payload of one byte
        ({"opcode": 8, "payload": b"\x03\xe8\xff"}, 1007),  # close reason not UTF-8
    ],
)
async def test_protocol_violations_close_with_their_code(
    hub: Hub, frame: dict[str, Any], code: int
) -> None:
    async with served(hub) as url, raw(url) as client:
        client.send(**frame)
        assert await client.close_code() == code
        # and the socket is dropped (reset when the client's frame was unread)
        with contextlib.suppress(ConnectionResetError):
            assert await client.reader.read() == b""
    await eventually(lambda: hub.stats.connections == 0)


async def test_message_over_the_limit_in_fragments_closes_with_1009(hub: Hub) -> None:
    async with served(hub) as url, raw(url) as client:
        client.send(1, b"x" * (32 * 1024), fin=False)
        client.send(0, b"x" * (32 * 1024), fin=False)
        client.send(0, b"x")
        assert await client.close_code() == 1009


async def test_client_close_is_echoed_and_releases_the_session(
    hub: Hub, levels: FakeLevels
) -> None:
    levels.set("p", "w", 1)
    async with served(hub) as url, raw(url) as client:
        client.send(1, b'{"op":"subscribe","product_ids":["p"]}')
        assert (await client.message())["type"] == "snapshot"
        assert hub.stats.subscriptions == 1
        client.send(8, Close(4321, "bye").serialize())
        assert await client.close_code() == 4321
        await eventually(lambda: hub.stats.connections == 0)
        assert hub.stats.subscriptions == 0
        assert hub.stats.topics == 0


async def drain(client: ClientConnection) -> None:
    while True:
        await client.recv()


async def test_shutdown_closes_with_1001(hub: Hub, levels: FakeLevels) -> None:
    levels.set("p", "w", 1)
    async with served(hub) as url, connect(url, compression=None) as client:
        await client.send('{"op":"subscribe","product_ids":["p"]}')
        assert orjson.loads(await client.recv())["type"] == "snapshot"
        await hub.stop()
        with pytest.raises(ConnectionClosed):
            await drain(client)
        assert client.close_code == 1001
        assert client.close_reason == "server shutting down"


async def test_commands_run_in_order_and_a_flood_is_throttled(hub: Hub, levels: FakeLevels) -> None:
    """Many commands in one write: answered in order, each after the previous completed."""
    for n in range(5):
        levels.set(f"p{n}", "w", 1)
    async with served(hub) as url, raw(url) as client:
        for n in range(5):
            client.send(1, orjson.dumps({"op": "subscribe", "product_ids": [f"p{n}"]}))
            client.send(1, b'{"op":"ping"}')
        seen = [(await client.message()) for _ in range(15)]
        kinds = [(m["type"], m.get("product_id", m.get("product_ids"))) for m in seen]
        assert kinds == [
            kind
            for n in range(5)
            for kind in (("snapshot", f"p{n}"), ("subscribed", [f"p{n}"]), ("pong", None))
        ]


async def test_client_that_stops_reading_is_closed_with_4008(
    levels: FakeLevels, tmp_path: Path
) -> None:
    """A blocked socket cannot take the close frame either: it is aborted, and the session
    released."""
    settings = HubSettings(send_timeout=0.3, close_timeout=0.2)
    hub = Hub(no_redis(tmp_path), levels, prefix="t", settings=settings)
    await hub.start()
    levels.set("p", "w", 1)
    padding = b'"' + b"x" * 4000 + b'"'
    try:
        async with served(hub) as url, raw(url, receive_buffer=4096) as client:
            client.send(1, b'{"op":"subscribe","product_ids":["p"]}')
            assert (await client.message())["type"] == "snapshot"
            [connection] = connections(hub)
            sock = connection._transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            async with asyncio.timeout(10):
                version = 1
                while hub.stats.connections:  # the client reads nothing meanwhile
                    version += 1
                    update = levels.set("p", f"w{version % 50}", version)
                    hub.on_message(channel("p"), update.replace(b'"adjusted"', padding))
                    await asyncio.sleep(0.001)
            assert hub.stats.slow_disconnects == 1
            await eventually(connection._transport.is_closing)  # aborted after close_timeout
            assert hub.stats.subscriptions == 0
    finally:
        await hub.stop()


async def test_keepalive_drops_a_peer_that_does_not_answer_pings(hub: Hub) -> None:
    """Pings every ws_ping_interval; no pong within ws_ping_timeout closes with 1011. A
    client that answers (the websockets library does) stays connected."""
    async with (
        served(hub, ws_ping_interval=0.1, ws_ping_timeout=0.2) as url,
        connect(url, compression=None, ping_interval=None) as answering,
    ):
        async with raw(url) as silent:
            opcode, payload = await silent.frame()
            assert (opcode, len(payload)) == (9, 4)
            assert await silent.close_code() == 1011
            await eventually(lambda: hub.stats.connections == 1)
        await asyncio.sleep(0.5)  # several ping rounds
        await answering.send('{"op":"ping"}')
        assert orjson.loads(await answering.recv()) == {"type": "pong"}
