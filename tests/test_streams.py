"""Stream tickets, the SSE fallback, the per-process stream cap, and no secret in any log.

Every test runs real server processes (``inventory serve``) against the test PostgreSQL
and Redis, as a browser or client would meet them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson
import psutil
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from realtime.tickets import TicketStore
from tests.conftest import ServerProcess, wait_until
from tests.test_realtime_e2e import (
    Levels,
    WsClient,
    adjust,
    put_warehouse,
    scrape,
    truth,
    unique,
)

READER = "reader-secret-7f3a9c"
ADMIN = "admin-secret-51bd02"
RESERVER = "reserver-secret-c81e44"
TOKENS = orjson.dumps({READER: ["read"], ADMIN: ["admin"], RESERVER: ["reserve"]}).decode()
SECURED = {"INVENTORY_TOKENS": TOKENS}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def admin_http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=10, headers=bearer(ADMIN)
    ) as client:
        yield client


async def ticket(server: ServerProcess, token: str = READER) -> str:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        answer = await http.post("/v1/stream-tickets", headers=bearer(token))
    assert answer.status_code == 201, answer.text
    value: str = answer.json()["ticket"]
    return value


async def ws_status(url: str, **options: Any) -> int:
    """101 when the handshake is accepted, else the HTTP status it was refused with."""
    try:
        async with connect(url, open_timeout=10, **options) as client:
            await client.send('{"op":"ping"}')
            assert orjson.loads(await client.recv()) == {"type": "pong"}
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


class SseClient:
    """Reads ``data:`` events of one ``GET /v1/stream`` and checks version order."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()
        self.messages: list[dict[str, Any]] = []
        self.versions: Levels = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, http: httpx.AsyncClient, product_ids: str, **options: Any
    ) -> AsyncIterator[SseClient]:
        params = {"product_ids": product_ids, **options.pop("params", {})}
        async with http.stream("GET", "/v1/stream", params=params, **options) as response:
            yield cls(response)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            async for line in self._lines:
                if not line:
                    continue
                assert line.startswith("data: "), line
                message: dict[str, Any] = orjson.loads(line[6:])
                if message["type"] == "snapshot":
                    for level in message["levels"]:
                        key = (message["product_id"], level["warehouse_id"])
                        self.versions[key] = level["version"]
                elif message["type"] == "stock":
                    key = (message["product_id"], message["warehouse_id"])
                    assert message["version"] > self.versions.get(key, 0), message
                    self.versions[key] = message["version"]
                self.messages.append(message)
                return message
        raise EOFError("the stream ended")


# --- tickets --------------------------------------------------------------------------


async def test_ticket_opens_one_stream_once_across_processes(server_factory: Any) -> None:
    """A ticket from one process opens a WebSocket or an SSE stream on another, once."""
    one = await server_factory(SECURED)
    two = await server_factory(SECURED)
    async with httpx.AsyncClient(base_url=one.base_url, timeout=10) as http:
        answer = await http.post("/v1/stream-tickets", headers=bearer(READER))
    assert answer.status_code == 201
    body = answer.json()
    assert set(body) == {"ticket", "expires_at"}
    assert answer.headers["cache-control"] == "no-store"
    lifetime = datetime.fromisoformat(body["expires_at"]) - datetime.now(UTC)
    assert 25 < lifetime.total_seconds() <= 30

    issued = body["ticket"]
    assert await ws_status(f"{two.ws_url}?ticket={issued}") == 101
    assert await ws_status(f"{two.ws_url}?ticket={issued}") == 401  # used
    assert await ws_status(f"{one.ws_url}?ticket={issued}") == 401  # used, other process

    sse_ticket = await ticket(two)
    async with httpx.AsyncClient(base_url=one.base_url, timeout=10) as http:
        product = unique("tk")
        async with SseClient.open(http, product, params={"ticket": sse_ticket}) as stream:
            assert stream.response.status_code == 200
            assert (await stream.recv())["type"] == "snapshot"
        async with SseClient.open(http, product, params={"ticket": sse_ticket}) as stream:
            assert stream.response.status_code == 401
            await stream.response.aread()
            assert stream.response.json()["error"]["code"] == "unauthorized"


async def test_ticket_concurrent_redemption_wins_once(server_factory: Any) -> None:
    one = await server_factory(SECURED)
    two = await server_factory(SECURED)
    issued = await ticket(one)
    statuses = await asyncio.gather(
        *(ws_status(f"{s.ws_url}?ticket={issued}") for s in (one, two, one, two, one, two))
    )
    assert sorted(statuses) == [101, 401, 401, 401, 401, 401]


async def test_ticket_scopes_and_bad_credentials(server_factory: Any) -> None:
    server = await server_factory(SECURED)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        assert (await http.post("/v1/stream-tickets")).status_code == 401
        assert (await http.post("/v1/stream-tickets", headers=bearer("nope"))).status_code == 401
        refused = await http.post("/v1/stream-tickets", headers=bearer(RESERVER))
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "forbidden"
        assert (await http.post("/v1/stream-tickets", headers=bearer(ADMIN))).status_code == 201
    url = server.ws_url
    assert await ws_status(url) == 401
    assert await ws_status(url, additional_headers=bearer("nope")) == 401
    assert await ws_status(url, additional_headers=bearer(RESERVER)) == 403
    assert await ws_status(url, additional_headers=bearer(READER)) == 101
    assert await ws_status(f"{url}?ticket=not-a-ticket") == 401
    assert await ws_status(f"{url}?ticket={'A' * 43}") == 401  # well-formed, unknown
    # A raw token in the URL is refused, even a valid one, even with a valid header.
    assert await ws_status(f"{url}?token={READER}") == 401
    assert await ws_status(f"{url}?access_token={READER}") == 401
    assert await ws_status(f"{url}?token={READER}", additional_headers=bearer(READER)) == 401


async def test_refused_sse_request_keeps_its_ticket(server_factory: Any) -> None:
    """Who asks is checked before what is asked (401/403 before 422), but a stream refused
    for its products (422) does not spend the ticket: the corrected URL opens with it."""
    server = await server_factory(SECURED)
    issued = await ticket(server)
    bad, good = "bad id", unique("kept")  # a space is no part of a product id
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:

        async def refused(
            with_ticket: str | None = None, headers: dict[str, str] | None = None
        ) -> tuple[int, str]:
            params = {"product_ids": bad, **({"ticket": with_ticket} if with_ticket else {})}
            answer = await http.get("/v1/stream", params=params, headers=headers)
            return answer.status_code, answer.json()["error"]["code"]

        assert await refused(issued) == (422, "validation_error")
        assert await refused(issued) == (422, "validation_error")
        assert await refused() == (401, "unauthorized")
        assert await refused("A" * 43) == (401, "unauthorized")  # well-formed, unknown
        assert await refused("short") == (401, "unauthorized")
        assert await refused(headers=bearer(RESERVER)) == (403, "forbidden")
        assert await refused(headers=bearer(READER)) == (422, "validation_error")
        async with SseClient.open(http, good, params={"ticket": issued}) as stream:
            assert stream.response.status_code == 200
            assert (await stream.recv())["type"] == "snapshot"
        assert await refused(issued) == (401, "unauthorized")  # spent
        async with SseClient.open(http, good, params={"ticket": issued}) as stream:
            assert stream.response.status_code == 401


async def test_ticket_expires_and_is_stored_hashed(redis_url: str, redis_prefix: str) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    prefix = f"{redis_prefix}-{unique('tickets')}"
    try:
        store = TicketStore(redis, prefix=prefix, ttl=0.3)
        kept = await store.issue("who")
        keys = [k.decode() async for k in redis.scan_iter(f"{prefix}:*")]
        assert len(keys) == 1
        assert kept.value not in keys[0]  # the key holds a digest

        async def expired() -> bool:
            return not await redis.exists(keys[0])

        await wait_until(expired, 5, "the ticket key to expire")
        assert await store.redeem(kept.value) is None
        fresh = await store.issue("who")
        assert await store.known(fresh.value)  # looked up, not spent
        assert await store.redeem(fresh.value) == "who"
        assert not await store.known(fresh.value)
        assert await store.redeem(fresh.value) is None
        assert not await store.known("not a ticket")
        assert await TicketStore(redis, prefix=prefix).redeem("x" * 43) is None
        default = await TicketStore(redis, prefix=prefix).issue("who")
        key = next(iter([k async for k in redis.scan_iter(f"{prefix}:*")]))
        assert 29_000 < await redis.pttl(key) <= 30_000
        assert await TicketStore(redis, prefix=prefix).redeem(default.value) == "who"
    finally:
        await redis.aclose()


# --- no secret in any log line ----------------------------------------------------------


async def test_no_token_or_ticket_in_any_log_line(server_factory: Any) -> None:
    """Debug logging (uvicorn's handshake lines, the websockets protocol's request and
    header lines) for accepted and refused handshakes of both transports: none of the
    credentials used appears in the captured output."""
    server = await server_factory({**SECURED, "INVENTORY_LOG_LEVEL": "debug"})
    secrets = [READER, ADMIN, RESERVER, "guessed-token-93c1"]
    url = server.ws_url
    assert await ws_status(f"{url}?token={READER}") == 401
    assert await ws_status(f"{url}?token=guessed-token-93c1") == 401
    assert await ws_status(url, additional_headers=bearer("guessed-token-93c1")) == 401
    assert await ws_status(url, additional_headers=bearer(RESERVER)) == 403
    assert await ws_status(url, additional_headers=bearer(READER)) == 101
    used = await ticket(server)
    secrets.append(used)
    assert await ws_status(f"{url}?ticket={used}") == 101
    assert await ws_status(f"{url}?ticket={used}") == 401
    secrets.append("B" * 43)
    assert await ws_status(f"{url}?ticket={'B' * 43}") == 401
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        sse_ticket = await ticket(server, ADMIN)
        secrets.append(sse_ticket)
        product = unique("log")
        for params, headers, status in (
            ({"ticket": sse_ticket}, {}, 200),
            ({"ticket": sse_ticket}, {}, 401),
            ({"token": ADMIN}, {}, 401),
            ({}, bearer(READER), 200),
            ({}, bearer("guessed-token-93c1"), 401),
        ):
            async with SseClient.open(http, product, params=params, headers=headers) as stream:
                assert stream.response.status_code == status
                if status == 200:
                    assert (await stream.recv())["type"] == "snapshot"
        assert (await http.get("/v1/warehouses", headers=bearer(ADMIN))).status_code == 200

    async def logged_handshakes() -> bool:  # lines are written as they happen
        return server.log.read_text().count('"WebSocket /v1/ws') >= 8

    await wait_until(logged_handshakes, 10, "the handshakes to be logged")
    text = server.log.read_text()
    assert "< authorization: [redacted]" in text.lower()  # debug lines were captured
    assert "ticket=[redacted]" in text
    for secret in secrets:
        assert secret not in text, f"{secret!r} appears in the server log"


# --- the connection cap -----------------------------------------------------------------


async def test_stream_cap_answers_503_at_the_handshake(server_factory: Any) -> None:
    server = await server_factory({"INVENTORY_MAX_STREAMS": "2"})
    async with (
        httpx.AsyncClient(base_url=server.base_url, timeout=10) as http,
        WsClient.open(server.ws_url) as first,
        SseClient.open(http, "cap-p") as second,
    ):
        assert (await second.recv())["type"] == "snapshot"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(server.ws_url, open_timeout=10):
                pass
        assert refused.value.response.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
        assert orjson.loads(refused.value.response.body)["error"]["code"] == (
            "too_many_connections"
        )
        async with SseClient.open(http, "cap-p") as third:
            assert third.response.status_code == 503
        await first.send({"op": "ping"})
        assert (await first.recv())["type"] == "pong"  # the open ones are unaffected
    assert await ws_status(server.ws_url) == 101  # slots are given back


# --- SSE --------------------------------------------------------------------------------


async def test_sse_snapshots_first_then_every_change(
    server_factory: Any, db_pool: asyncpg.Pool
) -> None:
    server = await server_factory(SECURED)
    one, two, empty = unique("sse-a"), unique("sse-b"), unique("sse-none")
    warehouse = unique("sse-w")
    async with admin_http(server) as http:
        await put_warehouse(http, warehouse)
        await adjust(http, one, warehouse, 5)
        await adjust(http, two, warehouse, 7)
        async with SseClient.open(
            http, f"{one},{two},{one},{empty}", headers=bearer(READER)
        ) as stream:
            assert stream.response.status_code == 200
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            first = [await stream.recv() for _ in range(4)]
            assert [(m["type"], m.get("product_id")) for m in first] == [
                ("snapshot", one),
                ("snapshot", two),
                ("snapshot", empty),
                ("subscribed", None),
            ]
            assert first[0]["levels"][0]["quantity"] == 5
            assert first[2]["levels"] == []
            assert first[3]["product_ids"] == [one, two, empty]
            for delta in (1, 2, -3):
                await adjust(http, one, warehouse, delta)
            await adjust(http, empty, warehouse, 4)
            want = await truth(db_pool, [one, two, empty])
            async with asyncio.timeout(10):
                while stream.versions != want:
                    message = await stream.recv()
                    assert message["type"] == "stock"
            assert [m["quantity"] for m in stream.messages[4:] if m["product_id"] == one][-1] == 5
        # A reconnect starts with fresh snapshots.
        async with SseClient.open(http, one, headers=bearer(READER)) as again:
            snapshot = await again.recv()
            assert snapshot["type"] == "snapshot"
            assert snapshot["levels"][0]["version"] == want[(one, warehouse)]


async def test_sse_bad_requests(server_factory: Any) -> None:
    server = await server_factory()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        for query in ("", "?product_ids=", "?product_ids=a,,b", "?product_ids=bad%20id"):
            answer = await http.get(f"/v1/stream{query}")
            assert answer.status_code == 422, (query, answer.text)
            assert answer.json()["error"]["code"] == "validation_error"
        many = ",".join(f"p{i}" for i in range(1001))
        assert (await http.get("/v1/stream", params={"product_ids": many})).status_code == 422
        assert (await http.post("/v1/stream?product_ids=a")).status_code == 405


@pytest.mark.slow
async def test_sse_clients_that_stop_reading_are_bounded(
    server_factory: Any, db_pool: asyncpg.Pool, database_url: str
) -> None:
    """40 SSE clients stop reading while 20,000 row updates flow (unbounded queues would
    hold 40 x 20,000 x ~250 B = 200 MB); each keeps at most its socket's buffers and the
    newest state per row. A stalled client that reads again ends on the truth, having
    been sent far fewer events than updates."""
    server = await server_factory()
    process = psutil.Process(server.pid)
    product = unique("sse-hot")
    warehouses = [unique("sse-wh") for _ in range(20)]
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            httpx.AsyncClient(base_url=server.base_url, timeout=10)
        )
        for warehouse in warehouses:
            await put_warehouse(http, warehouse)
            await adjust(http, product, warehouse, 1)
        stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for _ in range(40):
            sock = socket.socket()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            # A small limit: the reader stops reading the socket at 2 KiB buffered.
            reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
            stack.callback(writer.transport.abort)
            writer.write(
                f"GET /v1/stream?product_ids={product} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{server.port}\r\n\r\n".encode()
            )
            stalled.append((reader, writer))
        # Every stalled stream has been admitted and subscribed before the load.

        async def all_subscribed() -> bool:  # exported every second
            return await scrape(http, "inventory_ws_subscriptions") == 40.0

        await wait_until(all_subscribed, 10, "40 subscribed streams")
        writer_conn = await asyncpg.connect(database_url)
        stack.push_async_callback(writer_conn.close)
        await writer_conn.execute("SET synchronous_commit TO off")
        baseline = peak = process.memory_info().rss
        for _ in range(1000):
            await writer_conn.execute(
                """
                WITH changed AS (
                    UPDATE stock_levels
                    SET quantity = quantity + 1, version = version + 1, updated_at = now()
                    WHERE product_id = $1
                    RETURNING product_id, warehouse_id, quantity, reserved, version)
                INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta,
                                       reserved_delta, quantity, reserved, version, reason)
                SELECT product_id, warehouse_id, 'adjusted', 1, 0, quantity, reserved,
                       version, 'sse slow client'
                FROM changed
                """,
                product,
            )
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.005)
        want = await truth(db_pool, [product])

        async def conflated() -> bool:  # exported every second
            return await scrape(http, "inventory_ws_conflated_total") > 0

        await wait_until(conflated, 5, "conflation of the stalled streams")
        peak = max(peak, process.memory_info().rss)
        assert peak - baseline < 40 * 2**20, f"RSS grew {(peak - baseline) / 2**20:.1f} MiB"

        reader, _ = stalled[0]  # reads again: what was buffered, then the newest state
        seen: Levels = {}
        events = 0
        buffer = b""
        async with asyncio.timeout(15):
            while seen != want:
                chunk = await reader.read(65536)
                assert chunk, "the stream ended before reaching the truth"
                buffer += chunk
                *done, buffer = buffer.split(b"\n\n")
                for raw in done:
                    match = re.search(rb"data: (\{.*\})$", raw, re.S)
                    if match is None:
                        continue
                    message = orjson.loads(match.group(1))
                    if message["type"] == "snapshot":
                        for level in message["levels"]:
                            seen[(product, level["warehouse_id"])] = level["version"]
                    elif message["type"] == "stock":
                        key = (product, message["warehouse_id"])
                        assert message["version"] > seen.get(key, 0)
                        seen[key] = message["version"]
                        events += 1
        assert events < 20_000 / 2, f"{events} events: nothing was conflated"
