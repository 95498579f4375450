"""Tokens and scopes: every route x no token / bad token / each scope."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from msgspec.structs import replace

from inventory.config import SCOPES, ConfigError, Settings, parse_tokens
from inventory.http.app_routes import api_document
from inventory.ops.app import create_app

ADMIN = "admin-secret"
TOKENS = {
    "reader-secret": ["read"],
    "reserver-secret": ["reserve"],
    f"sha256:{hashlib.sha256(ADMIN.encode()).hexdigest()}": ["admin"],
}
BY_SCOPE = {"read": "reader-secret", "reserve": "reserver-secret", "admin": ADMIN}
UUID0 = "00000000-0000-4000-8000-000000000000"

# (method, path, body, scopes that grant the route: "a|b" is either)
ROUTES: list[tuple[str, str, Any, str]] = [
    ("GET", "/v1/warehouses", None, "read"),
    ("GET", "/v1/warehouses/sec-wh", None, "read"),
    ("PUT", "/v1/warehouses/sec-wh", {"name": "x", "status": "active"}, "admin"),
    ("GET", "/v1/stock?product_ids=sec-p", None, "read"),
    ("GET", "/v1/products/sec-p/stock", None, "read"),
    ("POST", "/v1/products/sec-p/stock/sec-wh/adjustments", {"delta": 5}, "admin"),
    ("PUT", "/v1/products/sec-p/stock/sec-wh", {"quantity": 5}, "admin"),
    ("GET", "/v1/products/sec-p/movements", None, "read"),
    ("POST", "/v1/reservations", {"lines": [{"product_id": "sec-p", "quantity": 1}]}, "reserve"),
    ("GET", f"/v1/reservations/{UUID0}", None, "read|reserve"),
    ("POST", f"/v1/reservations/{UUID0}/commit", None, "reserve"),
    ("POST", f"/v1/reservations/{UUID0}/release", None, "reserve"),
    ("POST", f"/v1/reservations/{UUID0}/extend", {"ttl_seconds": 60}, "reserve"),
]


@pytest.fixture(scope="module")
async def secured(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(replace(settings, tokens=parse_tokens(orjson.dumps(TOKENS).decode())))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@pytest.mark.parametrize(("method", "path", "body", "scope"), ROUTES)
async def test_route_matrix(
    secured: httpx.AsyncClient, method: str, path: str, body: Any, scope: str
) -> None:
    for token in (None, "wrong-token", "Bearer"):
        r = await secured.request(method, path, json=body, headers=_auth(token))
        assert r.status_code == 401, (token, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    for granted, token in BY_SCOPE.items():
        r = await secured.request(method, path, json=body, headers=_auth(token))
        allowed = granted in scope.split("|") or granted == "admin"
        if allowed:
            assert r.status_code not in (401, 403), (granted, r.text)
        else:
            assert r.status_code == 403, (granted, r.text)
            assert r.json()["error"]["code"] == "forbidden"


# A well-formed value for each path parameter of the document.
PATH_VALUES = {
    "product_id": "sec-p",
    "warehouse_id": "sec-wh",
    "webhook_id": "sec-hook",
    "reservation_id": UUID0,
    "entry_id": UUID0,
}


async def test_every_operation_refuses_what_its_document_says(
    secured: httpx.AsyncClient,
) -> None:
    """Every operation the document gives a scope (and no open alternative) answers 401
    without a token and 403 to a token without the scope, before reading anything else
    (no body, no query is sent). The WebSocket handshake is test_streams'."""
    checked = 0
    for path, item in api_document()["paths"].items():
        for method, op in item.items():
            security = op["security"]
            if not security or {} in security or path == "/v1/ws":
                continue
            scopes = {s for alternative in security for s in alternative.get("bearer", ())}
            url = path.format(**PATH_VALUES)
            r = await secured.request(method, url)
            assert r.status_code == 401, (method, path, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            for granted in SCOPES:
                if granted not in scopes and granted != "admin":
                    r = await secured.request(method, url, headers=_auth(BY_SCOPE[granted]))
                    assert r.status_code == 403, (method, path, granted, r.text)
                    assert r.json()["error"]["code"] == "forbidden"
            checked += 1
    assert checked >= 29


async def test_a_reserve_token_reads_its_reservations_and_waitlist_entries(
    secured: httpx.AsyncClient,
) -> None:
    """SPEC: ``reserve`` lets a client read the reservations and waitlist entries it
    works with (the reads are granted; unknown ids answer 404, not 403)."""
    for path in (f"/v1/reservations/{UUID0}", f"/v1/waitlist/{UUID0}"):
        r = await secured.get(path, headers=_auth("reserver-secret"))
        assert r.status_code == 404, (path, r.text)
    r = await secured.get("/v1/warehouses", headers=_auth("reserver-secret"))
    assert r.status_code == 403


async def test_nothing_written_without_scope(secured: httpx.AsyncClient) -> None:
    for token in (None, "wrong", "reader-secret", "reserver-secret"):
        await secured.put(
            "/v1/warehouses/never", json={"name": "n", "status": "active"}, headers=_auth(token)
        )
    r = await secured.get("/v1/warehouses/never", headers=_auth(ADMIN))
    assert r.status_code == 404


async def test_open_endpoints(secured: httpx.AsyncClient) -> None:
    for path in ("/health", "/ready", "/openapi.json", "/metrics"):
        r = await secured.get(path)
        assert r.status_code == 200, path
    r = await secured.get("/v1/warehouses")
    assert r.status_code == 401
    assert r.headers["x-request-id"]


async def test_admin_token_works_end_to_end(secured: httpx.AsyncClient) -> None:
    h = _auth(ADMIN)
    assert (
        await secured.put(
            "/v1/warehouses/sec-wh", json={"name": "x", "status": "active"}, headers=h
        )
    ).status_code in (200, 201)
    r = await secured.post(
        "/v1/products/sec-ok/stock/sec-wh/adjustments", json={"delta": 2}, headers=h
    )
    assert r.status_code == 200
    r = await secured.post(
        "/v1/reservations",
        json={"lines": [{"product_id": "sec-ok", "quantity": 1}]},
        headers=_auth("reserver-secret"),
    )
    assert r.status_code == 201


@pytest.mark.parametrize(
    "raw",
    ['["a"]', '{"t": "read"}', '{"t": ["write"]}', '{"sha256:abc": ["read"]}', "not json"],
)
def test_bad_token_config(raw: str) -> None:
    with pytest.raises(ConfigError):
        parse_tokens(raw)


def test_tokens_are_stored_hashed() -> None:
    parsed = parse_tokens('{"plain": ["reserve"], "boss": ["admin"]}')
    assert "plain" not in parsed
    assert parsed[hashlib.sha256(b"boss").hexdigest()] == {"read", "reserve", "admin"}
