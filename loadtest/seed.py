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
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx

from inventory.client import ApiError, BulkItem, Client
from inventory.http.guards import is_loopback_name

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
    return is_loopback_name(urlsplit(url).hostname or "")


def seed(host: str, count: int, token: str | None = None) -> int:
    """Create the warehouses and stock; returns the number of stock rows written.

    Goes through :mod:`inventory.client`: the rows as sets in ``POST /v1/stock/bulk``
    batches of 1,000. A rerun sets the same on-hand quantities again; a row whose
    reservations already hold more than that (409) is left as it is.
    """
    if not is_loopback_url(host):
        raise ValueError(f"refusing to seed {host}: load tests target 127.0.0.1 only")
    rows = [(p, w, PRODUCT_STOCK) for p in products(count) for w in WAREHOUSES]
    rows += [(p, w, HOT_STOCK) for p in hot_products() for w in WAREHOUSES]
    with Client(host, token, timeout=30) as client:
        for wid in WAREHOUSES:
            client.put_warehouse(wid, wid)
        for start in range(0, len(rows), 1000):
            items = [
                BulkItem(p, w, quantity=q, reason="load-test seed")
                for p, w, q in rows[start : start + 1000]
            ]
            for result in client.bulk(items):
                if result.error is not None and result.status != 409:
                    item = items[result.index]
                    raise RuntimeError(
                        f"seeding {item.product_id} in {item.warehouse_id}: {result.error.code}"
                    )
    return len(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.seed", description=__doc__)
    parser.add_argument("--host", default="http://127.0.0.1:8000")
    parser.add_argument("--products", type=int, default=200)
    parser.add_argument("--token", help="admin bearer token, when the server has tokens")
    args = parser.parse_args(argv)
    try:
        rows = seed(args.host, args.products, args.token)
    except (ValueError, RuntimeError, ApiError, httpx.HTTPError) as exc:
        print(f"seed: error: {exc}", file=sys.stderr)
        return 1
    print(f"seeded {len(WAREHOUSES)} warehouses and {rows} stock rows at {args.host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
