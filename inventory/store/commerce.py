"""SQL of the flash-sale features: product rules for a batch, customers' held units, the
waitlist, kits, and the invariants ``inventory check`` adds for them.

Everything here runs inside a caller's transaction (``conn``) or on a pooled connection
and raises domain errors (asyncpg's are translated by :func:`~inventory.store.db._translated`
around the store's transactions).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson

from ..domain.commerce import IsKit, KitComponent, ProductRules
from .db import Conn, Database, Row, _translated

__all__ = [
    "COMMERCE_INVARIANTS",
    "CommerceStatements",
    "KitReading",
    "kit_lock_sql",
    "kits_among",
    "read_kits",
]


def parse_components(raw: Any) -> tuple[KitComponent, ...] | None:
    """A kit's stored ``components`` (JSON), or None for a product that is no kit."""
    if raw is None:
        return None
    return tuple(KitComponent(c["product_id"], c["quantity"]) for c in orjson.loads(raw))


def product_rules(r: Row) -> ProductRules:
    """The rules in a row with ``safety_stock``, ``max_per_customer``, ``components``
    (NULL without settings) and ``waiting`` columns."""
    return ProductRules(
        r["safety_stock"] or 0, r["max_per_customer"], parse_components(r["components"]),
        r["waiting"],
    )  # fmt: skip


_RULES = """
SELECT x AS product_id, p.safety_stock, p.max_per_customer,
       p.components,
       (SELECT coalesce(sum(w.quantity), 0) FROM waitlist w
        WHERE w.product_id = x AND w.status = 'waiting')::bigint AS waiting
FROM unnest($1::text[]) AS x LEFT JOIN products p ON p.product_id = x
"""


_HELD = """
SELECT r.customer_id, l.product_id, sum(l.quantity)::bigint AS held
FROM reservations r JOIN reservation_lines l ON l.reservation_id = r.id
WHERE r.customer_id = ANY($1::text[]) AND l.product_id = ANY($2::text[])
  AND (r.status = 'committed' OR (r.status = 'active' AND r.expires_at > clock_timestamp()))
GROUP BY 1, 2
"""


def kit_lock_sql(shared: bool) -> str:
    """The transaction-scoped advisory lock of each id of ``$1`` as a kit candidate: shared
    by row creators, exclusive for the settings writer (see :mod:`inventory.service.catalog`)."""
    fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    # One 64-bit key space per purpose: 'kit:' keeps it apart from other advisory locks.
    return f"SELECT {fn}(hashtextextended('kit:' || x, 0)) FROM unnest($1::text[]) AS x"


async def kits_among(conn: Conn, product_ids: Sequence[str]) -> set[str]:
    """Those of ``product_ids`` that are kits, holding each id's shared advisory lock for
    the rest of the transaction so none of them becomes a kit before it commits."""
    ids = sorted(set(product_ids))
    await conn.execute(kit_lock_sql(shared=True), ids)
    rows = await conn.fetch(
        """SELECT product_id FROM products
           WHERE product_id = ANY($1::text[]) AND components IS NOT NULL""",
        ids,
    )
    return {r["product_id"] for r in rows}


class CommerceStatements(Database):
    """What the reservation engine reads and writes of the flash-sale features in its batch,
    and the kit check of a first stock row."""

    async def load_rules(self, conn: Conn, product_ids: Sequence[str]) -> dict[str, ProductRules]:
        """Settings and waiting units of each product (defaults for a product without
        settings). Read after the batch holds the products' rows, so it is current for them."""
        rows = await conn.fetch(_RULES, list(product_ids))
        return {r["product_id"]: product_rules(r) for r in rows}

    async def kit_components(
        self, product_ids: Sequence[str]
    ) -> dict[str, tuple[tuple[KitComponent, ...] | None, int | None]]:
        """``(components, max_per_customer)`` of each of ``product_ids`` that has settings."""
        with _translated():
            async with self.connection() as conn:
                rows = await conn.fetch(
                    """SELECT product_id, components, max_per_customer FROM products
                       WHERE product_id = ANY($1::text[])""",
                    list(product_ids),
                )
        return {
            r["product_id"]: (parse_components(r["components"]), r["max_per_customer"])
            for r in rows
        }

    async def held_units(
        self, conn: Conn, customers: Iterable[str], products: Iterable[str]
    ) -> dict[tuple[str, str], int]:
        """Units of each (customer, product) in active (not yet due) and committed
        reservations; an offered waitlist entry counts through its reservation.

        Race safety comes from the caller: it holds the row locks of ``products`` (every
        writer of reservation lines for a product holds them), and this statement's snapshot
        is taken after they were granted, so it sees every reservation committed before.
        """
        rows = await conn.fetch(_HELD, sorted(set(customers)), sorted(set(products)))
        return {(r["customer_id"], r["product_id"]): r["held"] for r in rows}

    async def lock_offers(
        self, conn: Conn, entry_ids: Sequence[UUID]
    ) -> dict[UUID, tuple[int, int]]:
        """Lock the entries (id order); for those still waiting: their queue ``seq`` and the
        units of the entries waiting before them (what their offer must leave alone).

        Read after the batch holds the product's rows: an offer committed by another
        transaction before that is already gone from the queue and from the stock.
        """
        rows = await conn.fetch(
            """SELECT w.id, w.seq,
                      (SELECT coalesce(sum(e.quantity), 0) FROM waitlist e
                       WHERE e.product_id = w.product_id AND e.status = 'waiting'
                         AND e.seq < w.seq)::bigint AS ahead
               FROM waitlist w
               WHERE w.id = ANY($1::uuid[]) AND w.status = 'waiting'
               ORDER BY w.id FOR UPDATE""",
            list(entry_ids),
        )
        return {r["id"]: (r["seq"], r["ahead"]) for r in rows}

    async def mark_offered(self, conn: Conn, offers: Mapping[UUID, UUID]) -> None:
        """Entry id -> reservation id: the entries are now ``offered`` (same transaction as
        the reservations)."""
        await conn.execute(
            """UPDATE waitlist w SET status = 'offered', reservation_id = o.rid, updated_at = now()
               FROM unnest($1::uuid[], $2::uuid[]) AS o(id, rid) WHERE w.id = o.id""",
            list(offers),
            list(offers.values()),
        )

    async def ensure_not_kit(self, conn: Conn, product_id: str) -> None:
        """Raise :class:`IsKit` before a first stock row is created for a kit."""
        if await kits_among(conn, [product_id]):
            raise IsKit(f"{product_id} is a kit and has no stock rows", {"product_id": product_id})


COMMERCE_INVARIANTS: dict[str, str] = {
    "customers hold no more than max_per_customer": """
        SELECT r.customer_id, l.product_id, sum(l.quantity) AS held, p.max_per_customer
        FROM reservations r JOIN reservation_lines l ON l.reservation_id = r.id
        JOIN products p ON p.product_id = l.product_id
        WHERE p.max_per_customer IS NOT NULL AND r.customer_id IS NOT NULL
          AND (r.status = 'committed' OR (r.status = 'active' AND r.expires_at > now()))
        GROUP BY r.customer_id, l.product_id, p.max_per_customer
        HAVING sum(l.quantity) > p.max_per_customer""",
    "every offered waitlist entry has its reservation": """
        SELECT w.id, w.product_id, w.reservation_id
        FROM waitlist w LEFT JOIN reservations r ON r.id = w.reservation_id
        LEFT JOIN LATERAL (SELECT sum(quantity) AS quantity FROM reservation_lines
                           WHERE reservation_id = w.reservation_id) l ON true
        WHERE w.status = 'offered'
          AND (r.id IS NULL OR r.reference <> 'waitlist:' || w.id::text
               OR r.customer_id IS DISTINCT FROM w.customer_id
               OR l.quantity IS DISTINCT FROM w.quantity)""",
    # Offers take up to a second after stock returns, so a head counts only once its
    # product, its settings and the entry itself have been unchanged for 5 s: the check
    # holds on a live database, not only on a quiet one.
    "no waiting entry could have been offered": """
        WITH heads AS (
            SELECT DISTINCT ON (product_id) id, product_id, quantity, warehouse_id, updated_at
            FROM waitlist WHERE status = 'waiting' ORDER BY product_id, seq)
        SELECT h.id, h.product_id, h.quantity, f.available - coalesce(p.safety_stock, 0)
               AS reservable
        FROM heads h LEFT JOIN products p ON p.product_id = h.product_id,
        LATERAL (SELECT coalesce(sum(s.quantity - s.reserved), 0) AS available
                 FROM stock_levels s JOIN warehouses x ON x.id = s.warehouse_id
                 WHERE s.product_id = h.product_id AND x.status = 'active') a,
        LATERAL (SELECT CASE WHEN h.warehouse_id IS NULL THEN a.available ELSE least(
                    a.available, (SELECT s.quantity - s.reserved FROM stock_levels s
                                  WHERE s.product_id = h.product_id
                                    AND s.warehouse_id = h.warehouse_id)) END AS available) f
        WHERE f.available - coalesce(p.safety_stock, 0) >= h.quantity
          AND greatest(h.updated_at, p.updated_at, (
                  SELECT max(m.created_at) FROM movements m WHERE m.product_id = h.product_id))
              < now() - interval '5 seconds'""",
    # Judged against the kit's current components, for reservations made since they were set.
    "kit lines sum to whole kits": """
        WITH kl AS (
            SELECT l.reservation_id, l.kit_id, l.product_id, sum(l.quantity) AS q
            FROM reservation_lines l JOIN reservations r ON r.id = l.reservation_id
            JOIN products k ON k.product_id = l.kit_id
            WHERE l.kit_id IS NOT NULL AND k.updated_at <= r.created_at
            GROUP BY 1, 2, 3),
        comp AS (
            SELECT k.product_id AS kit_id, c->>'product_id' AS product_id,
                   (c->>'quantity')::bigint AS per
            FROM products k, jsonb_array_elements(k.components) c
            WHERE k.components IS NOT NULL),
        n AS (
            SELECT kits.reservation_id, kits.kit_id, comp.product_id, kl.q, comp.per,
                   CASE WHEN kl.q % comp.per = 0 THEN kl.q / comp.per END AS kits
            FROM (SELECT DISTINCT reservation_id, kit_id FROM kl) kits
            JOIN comp USING (kit_id)
            LEFT JOIN kl ON kl.reservation_id = kits.reservation_id
                        AND kl.kit_id = kits.kit_id AND kl.product_id = comp.product_id)
        SELECT reservation_id, kit_id, product_id, q AS quantity, per FROM (
            SELECT n.*, min(kits) OVER w AS lo, max(kits) OVER w AS hi,
                   count(*) FILTER (WHERE kits IS NULL) OVER w AS broken
            FROM n WINDOW w AS (PARTITION BY reservation_id, kit_id)) v
        WHERE broken > 0 OR lo <> hi""",
}


@dataclass(frozen=True, slots=True)
class KitReading:
    """Kits and their components' ``reservable``, read in one snapshot of the database.

    ``order`` places that snapshot in commit order: ``(xmax, -running)`` of
    ``pg_current_snapshot()``. A snapshot taken later never compares lower (``xmax`` only
    grows; while it stays the same no transaction below it starts, so the in-progress
    list only shrinks), and two with equal orders saw the same commits: a reading with a
    greater order is at least as fresh.

    Orders compare within one ``origin``: the database cluster's system identifier and
    its WAL timeline. A restore from a backup or a failover continues on a new timeline,
    whose transaction ids may restart below ones already seen, so a reading of another
    origin is news whatever its order. (Copying an older data directory back in place
    keeps the timeline: kit numbers then stand still until transaction ids pass the
    recorded ones, or the kits' Redis keys are deleted.)
    """

    origin: str
    order: tuple[int, int]
    kits: dict[str, tuple[KitComponent, ...]]
    reservables: dict[str, int]


# One statement, so one snapshot: the kits, their components' reservable (after safety
# stock; 0 without rows), the snapshot's place in commit order and its origin.
_KIT_READ = """
WITH kits AS (
    SELECT product_id, components FROM products
    WHERE product_id = ANY($1::text[]) AND components IS NOT NULL
    UNION
    SELECT product_id, components FROM products
    WHERE cardinality($2::text[]) > 0 AND components IS NOT NULL AND components @> ANY(
        SELECT jsonb_build_array(jsonb_build_object('product_id', x)) FROM unnest($2::text[]) x)),
parts AS (
    SELECT DISTINCT c->>'product_id' AS product_id
    FROM kits, jsonb_array_elements(kits.components) c),
free AS (
    SELECT x.product_id, greatest(0, coalesce(
               (SELECT sum(s.quantity - s.reserved) FROM stock_levels s
                JOIN warehouses w ON w.id = s.warehouse_id AND w.status = 'active'
                WHERE s.product_id = x.product_id), 0) - coalesce(p.safety_stock, 0)) AS n
    FROM parts x LEFT JOIN products p ON p.product_id = x.product_id)
SELECT (SELECT system_identifier FROM pg_control_system())::text || ':'
           || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) AS origin,
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax,
       (SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot())) AS running,
       (SELECT jsonb_object_agg(product_id, components) FROM kits) AS kits,
       (SELECT jsonb_object_agg(product_id, n) FROM free) AS reservables
"""


async def read_kits(conn: Conn, among: Sequence[str] = (), using: Sequence[str] = ()) -> KitReading:
    """The kits among the ids ``among`` and the kits using one of ``using`` as a
    component, with what :func:`~inventory.domain.commerce.kit_reservable` needs."""
    row = await conn.fetchrow(_KIT_READ, list(among), list(using))
    assert row is not None
    kits = orjson.loads(row["kits"]) if row["kits"] is not None else {}
    free = orjson.loads(row["reservables"]) if row["reservables"] is not None else {}
    return KitReading(
        row["origin"],
        (row["xmax"], -row["running"]),
        {k: tuple(KitComponent(c["product_id"], c["quantity"]) for c in comps)
         for k, comps in kits.items()},
        free,
    )  # fmt: skip
