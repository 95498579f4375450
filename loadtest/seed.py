"""Seed the load-test catalogue through the HTTP API (idempotent, safe to rerun).

``python -m loadtest.seed --host http://127.0.0.1:8000 [--products 200]``; the locustfile
runs the same seeding on ``test_start`` unless started with ``--no-seed``.

Catalogue: three active warehouses; ``lt-sku-<n>`` products with 500 units in each
warehouse, and a few ``lt-hot-<k>`` products with 20 in each (the shoppers send a
fifth of their reservations to those, so they see real contention and run short now and
then; the admin users restock them).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import requests

__all__ = ["HOT_PRODUCTS", "WAREHOUSES", "hot_products", "is_loopback_url", "products", "seed"]

WAREHOUSES = ("lt-east", "lt-west", "lt-north")
HOT_PRODUCTS = 3
PRODUCT_STOCK = 500
HOT_STOCK = 20


def products(count: int) -> list[str]:
    return [f"lt-sku-{n}" for n in range(1, count + 1)]


def hot_products() -> list[str]:
    return [f"lt-hot-{k}" for k in range(1, HOT_PRODUCTS + 1)]


def is_loopback_url(url: str) -> bool:
    """True for http(s)/ws(s) URLs on 127.0.0.0/8, ::1 or localhost: the only targets."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _put(session: requests.Session, url: str, body: dict[str, Any], ok: set[int]) -> None:
    answer = session.put(url, json=body, timeout=30)
    if answer.status_code not in ok:
        raise RuntimeError(f"PUT {url} answered {answer.status_code}: {answer.text[:200]}")


def seed(host: str, count: int, token: str | None = None, threads: int = 8) -> int:
    """Create the warehouses and stock; returns the number of stock rows written.

    A rerun sets the same on-hand quantities again; a row whose reservations already hold
    more than that (409) is left as it is.
    """
    if not is_loopback_url(host):
        raise ValueError(f"refusing to seed {host}: load tests target 127.0.0.1 only")
    base = host.rstrip("/")
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    for wid in WAREHOUSES:
        _put(session, f"{base}/v1/warehouses/{wid}", {"name": wid, "status": "active"},
             {200, 201})  # fmt: skip
    rows = [(p, w, PRODUCT_STOCK) for p in products(count) for w in WAREHOUSES]
    rows += [(p, w, HOT_STOCK) for p in hot_products() for w in WAREHOUSES]

    def write(row: tuple[str, str, int]) -> None:
        product, warehouse, quantity = row
        url = f"{base}/v1/products/{product}/stock/{warehouse}"
        _put(session, url, {"quantity": quantity, "reason": "load-test seed"}, {200, 409})

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, rows))
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.seed", description=__doc__)
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--products", type=int, default=200)
    parser.add_argument("--token", help="admin bearer token, when the server has tokens")
    args = parser.parse_args(argv)
    try:
        rows = seed(args.host, args.products, args.token)
    except (ValueError, RuntimeError, requests.RequestException) as exc:
        print(f"seed: error: {exc}", file=sys.stderr)
        return 1
    print(f"seeded {len(WAREHOUSES)} warehouses and {rows} stock rows at {args.host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
