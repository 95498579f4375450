"""The live dashboard (``GET /``) end to end in headless Chromium, driven by Playwright.

* Against real ``inventory serve`` processes: a reservation shows up within 2 s; killing
  the server shows "reconnecting" and greys the table; a change made meanwhile (through a
  second server) is on screen after the page reconnects to a new server on the same port;
  a tokens-configured server makes the page ask for a read token.
* Load: 200 products x 3 warehouses at ~500 changes/s from a protocol-compatible stub
  WebSocket server (so the figure measures the page, not this 2-core machine's server):
  frames keep coming, the update delay stays bounded, and every cell ends on the newest
  value. The figures are printed (``pytest -s``).

Chromium is Debian's (``apt-get install chromium``); Playwright only drives it (browser
downloads are impossible here, so ``playwright install`` is never run). The tests skip
when Chromium is missing, except in CI (``CI`` set), where they must run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
if not os.environ.get("CI"):
    pytest.importorskip("playwright.async_api", reason="playwright is not installed")

import uvicorn  # noqa: E402
from playwright.async_api import BrowserContext, Page, async_playwright  # noqa: E402
from playwright.async_api import TimeoutError as PlaywrightTimeout  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import FileResponse, JSONResponse, Response  # noqa: E402
from starlette.routing import Mount, Route, WebSocketRoute  # noqa: E402
from starlette.staticfiles import StaticFiles  # noqa: E402
from starlette.websockets import WebSocket, WebSocketDisconnect  # noqa: E402

from inventory.ops.embedded import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "inventory" / "static"
ARTIFACTS = ROOT / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


# --- browser --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def browser(profile: Path) -> AsyncIterator[BrowserContext]:
    """Headless Chromium with a fresh profile directory."""
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM or "/usr/bin/chromium",
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            yield context
        finally:
            await context.close()


@pytest.fixture
async def page(tmp_path: Path) -> AsyncIterator[Page]:
    """A fresh page; uncaught JavaScript errors fail the test."""
    errors: list[str] = []
    async with browser(tmp_path / "profile") as context:
        tab = context.pages[0] if context.pages else await context.new_page()
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        yield tab
    assert not errors, f"JavaScript errors on the page: {errors}"


async def wait_for(page: Page, expression: str, arg: Any = None, timeout: float = 5.0) -> Any:
    """Wait until a JS expression over ``d = window.__dashboard`` and ``arg`` is truthy."""
    try:
        handle = await page.wait_for_function(
            f"(arg) => {{ const d = window.__dashboard; return {expression}; }}",
            arg=arg,
            timeout=timeout * 1000,
        )
    except PlaywrightTimeout:
        state = await page.evaluate(DEBUG_STATE)
        raise AssertionError(f"not within {timeout}s: {expression} (page: {state})") from None
    return await handle.json_value()


async def wait_state(page: Page, state: str, timeout: float = 5.0) -> None:
    """Wait until the page is in ``state`` and has rendered it (text, classes)."""
    await wait_for(
        page,
        "d.state === arg && document.getElementById('conn').dataset.state === arg",
        state,
        timeout=timeout,
    )


DEBUG_STATE = """() => {
  const d = window.__dashboard;
  return d && { state: d.state, stale: d.stale, messages: d.messages, applied: d.applied,
    ignored: d.ignored, frames: d.frames, reconnects: d.reconnects,
    text: document.getElementById("conn-text").textContent };
}"""


async def cell(page: Page, product_id: str, warehouse_id: str) -> dict[str, int] | None:
    result: dict[str, int] | None = await page.evaluate(
        "([p, w]) => window.__dashboard.cell(p, w)", [product_id, warehouse_id]
    )
    return result


def screenshot_path(name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / name


# --- against real servers ---------------------------------------------------------------


async def seed(base_url: str, stock: dict[tuple[str, str], int], token: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as client:
        for warehouse_id in sorted({w for _, w in stock}):
            r = await client.put(
                f"/v1/warehouses/{warehouse_id}", json={"name": warehouse_id, "status": "active"}
            )
            assert r.status_code in (200, 201), r.text
        for (product_id, warehouse_id), quantity in stock.items():
            r = await client.put(
                f"/v1/products/{product_id}/stock/{warehouse_id}", json={"quantity": quantity}
            )
            assert r.status_code == 200, r.text


async def reserve(base_url: str, product_id: str, warehouse_id: str, quantity: int) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:
        r = await client.post(
            "/v1/reservations",
            json={
                "lines": [
                    {"product_id": product_id, "warehouse_id": warehouse_id, "quantity": quantity}
                ]
            },
        )
        assert r.status_code == 201, r.text


async def test_live_update_reconnect_and_resync(
    page: Page, server_factory: Any, new_id: Callable[[str], str]
) -> None:
    server = await server_factory()
    other = await server_factory()  # shares the database and Redis: used while `server` is down
    p1, p2 = new_id("dash"), new_id("dash")
    w1, w2 = sorted([new_id("wh"), new_id("wh")])
    await seed(server.base_url, {(p1, w1): 10, (p1, w2): 5, (p2, w1): 7})

    await page.goto(f"{server.base_url}/?products={p1},{p2}")
    await wait_state(page, "connected")
    assert await cell(page, p1, w1) == {"quantity": 10, "reserved": 0, "available": 10}
    assert await cell(page, p2, w1) == {"quantity": 7, "reserved": 0, "available": 7}
    assert await page.locator("#conn").get_attribute("data-state") == "connected"
    assert await page.locator("#conn-text").inner_text() == "Live"

    # A reservation is on screen within 2 s, as text in the right cell.
    started = time.monotonic()
    await reserve(server.base_url, p1, w1, 3)
    await wait_for(page, "d.cell(arg[0], arg[1])?.available === 7", [p1, w1], timeout=2.0)
    shown_after = time.monotonic() - started
    row = page.locator(f'tr[data-product="{p1}"]')
    assert await row.locator(f'td[data-warehouse="{w1}"].available').inner_text() == "7"
    assert await row.locator(f'td[data-warehouse="{w1}"].reserved').inner_text() == "3"
    await wait_for(page, "d.reservationHistory.some((n) => n > 0)", timeout=3.0)

    # The server dies: the page says so and greys out the numbers it can no longer vouch for.
    server.kill()
    await wait_state(page, "reconnecting", timeout=5.0)
    assert await page.locator("#stock").evaluate("t => t.classList.contains('is-stale')")
    assert "Reconnecting" in await page.locator("#conn-text").inner_text()

    # Changes while the page is disconnected, made through the other server.
    await reserve(other.base_url, p1, w2, 2)
    async with httpx.AsyncClient(base_url=other.base_url) as client:
        r = await client.post(f"/v1/products/{p2}/stock/{w1}/adjustments", json={"delta": 5})
        assert r.status_code == 200, r.text
    assert (await cell(page, p1, w2) or {}).get("available") == 5  # still the old number

    # A new server on the same port: the page reconnects by itself and resyncs with `since`.
    await asyncio.to_thread(server.start)
    await wait_state(page, "resynced", timeout=20.0)
    await wait_for(
        page,
        "d.cell(arg[0], arg[1])?.available === 3 && d.cell(arg[0], arg[2])?.available === 7"
        " && d.cell(arg[3], arg[2])?.available === 12",
        [p1, w2, w1, p2],
        timeout=2.0,
    )
    assert await cell(page, p1, w1) == {"quantity": 10, "reserved": 3, "available": 7}
    assert await cell(page, p1, w2) == {"quantity": 5, "reserved": 2, "available": 3}
    assert await cell(page, p2, w1) == {"quantity": 12, "reserved": 0, "available": 12}
    assert not await page.locator("#stock").evaluate("t => t.classList.contains('is-stale')")
    reconnects = await page.evaluate("window.__dashboard.reconnects")
    assert reconnects >= 1
    shot = screenshot_path("dashboard-e2e.png")
    await page.screenshot(path=str(shot), full_page=True)
    print(f"\nreservation on screen after {shown_after * 1000:.0f} ms; screenshot: {shot}")


async def test_asks_for_a_read_token(
    page: Page, server_factory: Any, new_id: Callable[[str], str]
) -> None:
    tokens = {"dash-reader": ["read"], "dash-admin": ["admin"]}
    server = await server_factory(env={"INVENTORY_TOKENS": json.dumps(tokens)})
    product, warehouse = new_id("dash"), new_id("wh")
    await seed(server.base_url, {(product, warehouse): 4}, token="dash-admin")

    await page.goto(f"{server.base_url}/?products={product}")
    await wait_state(page, "unauthorized", timeout=5.0)
    assert "Token needed" in await page.locator("#conn-text").inner_text()

    await page.fill("#token-input", "wrong-token")
    await page.click("#token-form button")
    await wait_for(page, "document.getElementById('conn-text').textContent.includes('rejected')")
    assert await page.evaluate("window.__dashboard.state") == "unauthorized"

    await page.fill("#token-input", "dash-reader")
    await page.click("#token-form button")
    await wait_state(page, "connected", timeout=5.0)
    assert await cell(page, product, warehouse) == {"quantity": 4, "reserved": 0, "available": 4}
    stored = await page.evaluate("sessionStorage.getItem('inventory.dashboard.token')")
    assert stored == "dash-reader"

    # The token survives a reload in the same tab (sessionStorage), not in the URL.
    await page.reload()
    await wait_state(page, "connected", timeout=5.0)
    assert "token" not in page.url


# --- load: a stub server speaking the WebSocket protocol ---------------------------------


class StubStockServer:
    """Serves the page and a ``/v1/ws`` that follows SPEC.md, with test-driven changes."""

    EVENTS = ("reserved", "reserved", "reserved", "released", "committed", "adjusted")

    def __init__(self, products: list[str], warehouses: list[str]) -> None:
        self.rows = {(p, w): [1000, 0, 1] for p in products for w in warehouses}
        self.clients: set[WebSocket] = set()
        self.commands: list[dict[str, Any]] = []
        self.accepting = True  # False: refuse handshakes (as a server that is down would)
        self.tickets: set[str] = set()
        self.port = free_port()
        self.sent = 0
        app = Starlette(
            routes=[
                Route("/", lambda request: FileResponse(STATIC / "dashboard.html")),
                Mount("/static", StaticFiles(directory=STATIC)),
                Route("/v1/stream-tickets", self.ticket, methods=["POST"]),
                WebSocketRoute("/v1/ws", self.endpoint),
            ]
        )
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> StubStockServer:
        self.task = asyncio.create_task(self.server.serve())
        for _ in range(500):  # uvicorn offers a flag, not an event
            if self.server.started:
                return self
            await asyncio.sleep(0.01)
        raise RuntimeError("the stub server did not start")

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task

    def level(self, product_id: str, warehouse_id: str) -> dict[str, Any]:
        quantity, reserved, version = self.rows[product_id, warehouse_id]
        return {
            "warehouse_id": warehouse_id,
            "quantity": quantity,
            "reserved": reserved,
            "available": quantity - reserved,
            "version": version,
        }

    async def ticket(self, request: Request) -> Response:
        """A stream ticket, as the real server issues them (refused while "down")."""
        if not self.accepting:
            return JSONResponse({"error": {"code": "unavailable"}}, status_code=503)
        ticket = secrets.token_urlsafe(16)
        self.tickets.add(ticket)
        return JSONResponse({"ticket": ticket, "expires_at": None}, status_code=201)

    async def endpoint(self, ws: WebSocket) -> None:
        if ws.query_params.get("ticket") not in self.tickets:
            await ws.close(1008)  # the page must come with a ticket it was given
            return
        self.tickets.discard(ws.query_params["ticket"])
        if not self.accepting:
            await ws.close(1013)  # before accept: the handshake is refused
            return
        await ws.accept()
        try:
            while True:
                message = json.loads(await ws.receive_text())
                self.commands.append(message)
                if message["op"] == "unsubscribe":
                    await ws.send_text(json.dumps({"type": "unsubscribed"} | message))
                    continue
                if message["op"] == "ping":
                    await ws.send_text('{"type":"pong"}')
                    continue
                since = message.get("since", {})
                for product_id in message["product_ids"]:
                    known = since.get(product_id, {})
                    levels = [
                        self.level(p, w)
                        for (p, w), row in self.rows.items()
                        if p == product_id and row[2] > known.get(w, 0)
                    ]
                    await ws.send_text(
                        json.dumps({"type": "snapshot", "product_id": product_id, "levels": levels})
                    )
                await ws.send_text(
                    json.dumps({"type": "subscribed", "product_ids": message["product_ids"]})
                )
                self.clients.add(ws)
        except WebSocketDisconnect:
            pass
        finally:
            self.clients.discard(ws)

    async def drop_all(self) -> None:
        for ws in list(self.clients):
            with contextlib.suppress(Exception):
                await ws.close(1012)

    async def change(self, rng: random.Random) -> None:
        (product_id, warehouse_id) = rng.choice(list(self.rows))
        await self.apply(product_id, warehouse_id, rng.choice(self.EVENTS), rng.randint(1, 5))

    async def apply(self, product_id: str, warehouse_id: str, event: str, amount: int = 1) -> None:
        """Change one row as ``event`` would and send its new state to every client."""
        row = self.rows[product_id, warehouse_id]
        if event == "reserved" and row[0] > row[1]:
            row[1] += 1
        elif event in ("released", "committed") and row[1] > 0:
            row[1] -= 1
            row[0] -= event == "committed"
        else:
            event = "adjusted"
            row[0] += amount
        row[2] += 1
        text = json.dumps(
            {"type": "stock", "product_id": product_id, "event": event, "ts": time.time()}
            | self.level(product_id, warehouse_id)
        )
        for ws in list(self.clients):
            with contextlib.suppress(Exception):
                await ws.send_text(text)
        self.sent += 1

    async def run_load(self, rate: float, seconds: float) -> None:
        rng = random.Random(9)
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (elapsed := loop.time() - start) < seconds:
            due = int(elapsed * rate)
            while self.sent < due:
                await self.change(rng)
            await asyncio.sleep(0.004)


async def test_reconnect_resumes_with_since(page: Page) -> None:
    """Against the stub, to see the exact subscribe the page sends after a reconnect."""
    async with StubStockServer(["r-1", "r-2"], ["wa", "wb"]) as stub:
        await page.goto(f"{stub.base_url}/?products=r-1,r-2")
        await wait_state(page, "connected")
        assert stub.commands == [{"op": "subscribe", "product_ids": ["r-1", "r-2"]}]
        await stub.apply("r-1", "wa", "reserved")
        await wait_for(page, "d.cell('r-1', 'wa')?.reserved === 1", timeout=2.0)

        stub.accepting = False
        await stub.drop_all()
        await wait_state(page, "reconnecting")
        assert await page.locator("#stock").evaluate("t => t.classList.contains('is-stale')")
        assert await page.locator("#stock").get_attribute("aria-busy") == "true"
        await stub.apply("r-2", "wb", "adjusted", 7)  # while the page is away
        # A refused handshake is retried with backoff (and the page keeps saying so).
        await wait_for(
            page,
            "Number(/attempt (\\d+)/.exec(document.getElementById('conn-text').textContent)?.[1])"
            " >= 2",
            timeout=8.0,
        )
        assert await cell(page, "r-2", "wb") == {"quantity": 1000, "reserved": 0, "available": 1000}

        stub.accepting = True
        await wait_state(page, "resynced", timeout=10.0)
        assert not await page.locator("#stock").evaluate("t => t.classList.contains('is-stale')")
        assert await cell(page, "r-2", "wb") == {"quantity": 1007, "reserved": 0, "available": 1007}
        assert await cell(page, "r-1", "wa") == {"quantity": 1000, "reserved": 1, "available": 999}
        assert stub.commands[-1] == {
            "op": "subscribe",
            "product_ids": ["r-1", "r-2"],
            "since": {"r-1": {"wa": 2, "wb": 1}, "r-2": {"wa": 1, "wb": 1}},
        }
        assert await page.evaluate("window.__dashboard.reconnects") == 1
        assert "resynced" in await page.locator("#conn-text").inner_text()


async def test_products_from_the_url_and_the_input_box(page: Page) -> None:
    async with StubStockServer(["a-1", "a-2", "a-3"], ["wa"]) as stub:
        await page.goto(f"{stub.base_url}/?products=a-1,bad%20id")
        await wait_state(page, "connected")
        assert await page.evaluate("window.__dashboard.products") == ["a-1"]
        assert "bad id" in await page.locator("#notice").inner_text()

        await page.fill("#product-input", "a-2, a-3 a-1")
        await page.press("#product-input", "Enter")
        await wait_for(page, "d.cell('a-3', 'wa')?.available === 1000")
        assert await page.evaluate("window.__dashboard.products") == ["a-1", "a-2", "a-3"]
        assert page.url.endswith("/?products=a-1,a-2,a-3")
        assert {"op": "subscribe", "product_ids": ["a-2", "a-3"]} in stub.commands
        headers = await page.locator("#stock thead th").all_inner_texts()
        assert headers[:3] == ["Product", "wa", "Total available"]

        await page.click("button[aria-label='Stop watching a-2']")
        await wait_for(page, "d.products.length === 2")
        assert page.url.endswith("/?products=a-1,a-3")
        assert await page.locator("tr[data-product='a-2']").count() == 0
        await wait_for(page, "true")
        assert stub.commands[-1] == {"op": "unsubscribe", "product_ids": ["a-2"]}


PROBE = """() => {
  const probe = { frames: 0, gaps: [], long: [], last: performance.now() };
  window.__probe = probe;
  const loop = (now) => {
    probe.frames++;
    probe.gaps.push(now - probe.last);
    probe.last = now;
    if (!probe.stop) requestAnimationFrame(loop);
  };
  requestAnimationFrame(loop);
  new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) probe.long.push(entry.duration);
  }).observe({ type: "longtask" });
  return true;
}"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def test_load_200_products_x_3_warehouses_at_500_changes_per_second(page: Page) -> None:
    products = [f"load-{i:03d}" for i in range(200)]
    warehouses = ["wh-a", "wh-b", "wh-c"]
    rate, seconds = 500.0, 6.0
    async with StubStockServer(products, warehouses) as stub:
        await page.goto(f"{stub.base_url}/?products={','.join(products)}")
        await wait_state(page, "connected", timeout=10.0)
        await wait_for(
            page, "document.querySelectorAll('td[data-field][data-value]').length === 1800"
        )
        await page.evaluate(PROBE)
        before = await page.evaluate("({f: __dashboard.frames, n: __dashboard.delayCount})")

        started = time.monotonic()
        await stub.run_load(rate, seconds)
        elapsed = time.monotonic() - started
        # Everything sent is on screen shortly after the load stops, newest values only.
        await wait_for(page, "d.applied >= arg", 600 + stub.sent, timeout=5.0)
        await asyncio.sleep(0.3)
        probe = await page.evaluate(
            "() => { __probe.stop = true; return {frames: __probe.frames, gaps: __probe.gaps,"
            " long: __probe.long, renders: __dashboard.frames, delays: __dashboard.delays(),"
            " pageDelays: __dashboard.pageDelays(), count: __dashboard.delayCount}; }"
        )
        shown = await page.evaluate(
            "(rows) => rows.map(([p, w]) => window.__dashboard.cell(p, w))",
            [[p, w] for p, w in stub.rows],
        )
        expected = [
            {k: stub.level(p, w)[k] for k in ("quantity", "reserved", "available")}
            for p, w in stub.rows
        ]
        assert shown == expected, "some cells do not show the newest state"
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(screenshot_path("dashboard-load.png")))

    new_samples = probe["count"] - before["n"]
    delays = probe["delays"][-new_samples:]
    page_delays = probe["pageDelays"][-new_samples:]
    gaps = probe["gaps"][1:]
    fps = probe["frames"] / (elapsed + 0.3)
    renders = probe["renders"] - before["f"]
    long_tasks = probe["long"]
    figures = {
        "changes_sent": stub.sent,
        "send_rate_per_s": round(stub.sent / elapsed),
        "seconds": round(elapsed, 2),
        "frames_per_s": round(fps, 1),
        "render_frames": renders,
        "frame_gap_p95_ms": round(percentile(gaps, 0.95), 1),
        "frame_gap_max_ms": round(max(gaps), 1),
        "long_tasks": len(long_tasks),
        "long_task_max_ms": round(max(long_tasks, default=0), 1),
        "delay_ts_to_paint_p50_ms": round(statistics.median(delays), 1),
        "delay_ts_to_paint_p95_ms": round(percentile(delays, 0.95), 1),
        "delay_ts_to_paint_max_ms": round(max(delays), 1),
        "delay_receive_to_paint_p95_ms": round(percentile(page_delays, 0.95), 1),
    }
    print("\ndashboard load figures: " + json.dumps(figures))

    assert stub.sent >= rate * seconds * 0.9
    assert len(delays) == stub.sent  # every change was measured once it was painted
    # Responsive: frames keep coming (headless Chromium paces at ~60/s), no long freeze,
    # and updates reach the screen without a growing backlog. The bounds are generous, for a
    # 2-core box that may be busy with other work (an idle one measures ~40-50 frames/s and
    # a p95 delay of ~130-290 ms); rendering per message instead of per frame breaks them.
    assert fps >= 10, figures
    assert max(gaps) < 2000, figures
    assert percentile(delays, 0.95) < 2000, figures


async def test_lists_the_servers_products_without_a_query(
    page: Page, server_factory: Any, new_id: Callable[[str], str]
) -> None:
    """``/`` alone watches the first page of ``GET /v1/products`` (``--`` sorts first)."""
    server = await server_factory()
    product, warehouse = f"--{new_id('listed')}", new_id("wh")
    await seed(server.base_url, {(product, warehouse): 6})
    await page.goto(f"{server.base_url}/")
    await wait_state(page, "connected")
    await wait_for(page, "d.products.includes(arg)", product, timeout=10.0)
    await wait_for(page, "d.cell(arg[0], arg[1])?.available === 6", [product, warehouse])


async def test_kits_and_low_stock_rows(
    page: Page, server_factory: Any, new_id: Callable[[str], str]
) -> None:
    """A kit's row shows its whole kits from ``kit`` messages; a product whose stock falls
    to its low-stock threshold gets its row tinted from the ``alert`` message; a product's
    waitlist length comes from polling ``GET /v1/waitlists``."""
    server = await server_factory()
    part, kit, warehouse = new_id("part"), new_id("kit"), new_id("wh")
    await seed(server.base_url, {(part, warehouse): 9})
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        r = await client.put(f"/v1/products/{part}", json={"low_stock_threshold": 3})
        assert r.status_code in (200, 201), r.text
        comps = [{"product_id": part, "quantity": 3}]
        assert (await client.put(f"/v1/products/{kit}", json={"components": comps})).is_success
    await page.goto(f"{server.base_url}/?products={kit},{part}")
    await wait_state(page, "connected")
    kit_row = page.locator(f'tr[data-product="{kit}"]')
    await kit_row.locator("td.total:has-text('3 kits')").wait_for(timeout=5000)
    await reserve(server.base_url, part, warehouse, 6)
    await kit_row.locator("td.total:text-is('1 kit')").wait_for(timeout=5000)
    await page.locator(f'tr[data-product="{part}"].stock-low').wait_for(timeout=5000)
    part_row = page.locator(f'tr[data-product="{part}"]')
    assert await part_row.locator("td.waiting").inner_text() == "0"
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        for customer, quantity in (("early", 4), ("late", 2)):  # 3 reservable: both wait
            r = await client.post(
                f"/v1/products/{part}/waitlist",
                json={"customer_id": customer, "quantity": quantity},
            )
            assert r.json()["status"] == "waiting", r.text
    await part_row.locator("td.waiting:text-is('2')").wait_for(timeout=5000)
    assert await page.evaluate("(p) => window.__dashboard.waitlist(p)", part) == {
        "waiting": 2,
        "units": 6,
    }
    assert await part_row.evaluate("tr => tr.classList.contains('waitlisted')")
    shot = screenshot_path("dashboard-commerce.png")
    await page.screenshot(path=str(shot), full_page=True)
