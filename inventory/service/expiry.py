"""Expiry at scale: the sweeper that releases due reservations, and the idempotency purge.

Policy:

* Set-based: one statement per pass releases up to ``batch`` due reservations (oldest
  deadline first). It locks the due reservations ``FOR UPDATE SKIP LOCKED`` (another
  sweeper or a racing commit/release keeps the ones it holds), then their stock rows in
  (product, warehouse) order, also ``SKIP LOCKED``. A reservation is released only if
  every one of its rows was locked; the others (a row held by a foreign session, a long
  write) are left for a later pass and excluded for the rest of this round, so they
  never hold up the rest.
* Same result as releasing one by one: each stock row is updated once, while the ledger
  gets one ``expired`` row per (reservation, row) with the running ``reserved`` and
  ``version`` in the order the one-by-one path would have used (deadline, then id), so
  ``inventory check`` (ledger replay, contiguous versions) holds.
* Cost: one transaction of one statement per ``batch`` reservations instead of about six
  round trips per reservation (measured 1,500 due reservations in 4.0 s before).
* The idempotency purge is its own task (:meth:`Expiry.run_purge`): it deletes old keys in
  chunks of ``purge_chunk`` rows, one short transaction each, and a failure or a slow
  chunk only delays the purge, never expiry.

Like :mod:`inventory.store_feed`, this module holds SQL of its own; it runs it through
:meth:`Store.transaction`, which translates database errors at the store boundary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from uuid import UUID

from .. import metrics
from ..domain.model import InventoryError
from ..store.pg import Store

__all__ = ["Expiry"]

log = logging.getLogger("inventory.expiry")

# $1 batch size, $2 reservation ids to leave alone this round.
# Returns one row per released reservation line group: (reservation id, product id).
_EXPIRE = """
WITH due AS (
    SELECT id, expires_at FROM reservations
    WHERE status = 'active' AND expires_at <= clock_timestamp() AND id <> ALL($2::uuid[])
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), lines AS (
    SELECT l.reservation_id, d.expires_at, l.product_id, l.warehouse_id, sum(l.quantity) AS n
    FROM reservation_lines l JOIN due d ON d.id = l.reservation_id
    GROUP BY 1, 2, 3, 4
), locked AS (
    SELECT s.product_id, s.warehouse_id, s.quantity, s.reserved, s.version
    FROM stock_levels s
    WHERE (s.product_id, s.warehouse_id) IN (SELECT product_id, warehouse_id FROM lines)
    ORDER BY s.product_id, s.warehouse_id
    FOR UPDATE SKIP LOCKED
), eligible AS (
    SELECT d.id FROM due d
    WHERE NOT EXISTS (
        SELECT 1 FROM lines l LEFT JOIN locked k USING (product_id, warehouse_id)
        WHERE l.reservation_id = d.id AND k.product_id IS NULL)
), moves AS (
    SELECT l.reservation_id, l.product_id, l.warehouse_id, l.n, k.quantity,
           k.reserved - sum(l.n) OVER w AS reserved,
           k.version + row_number() OVER w AS version
    FROM lines l
    JOIN eligible e ON e.id = l.reservation_id
    JOIN locked k USING (product_id, warehouse_id)
    WINDOW w AS (PARTITION BY l.product_id, l.warehouse_id
                 ORDER BY l.expires_at, l.reservation_id)
), rows AS (
    UPDATE stock_levels s
    SET reserved = s.reserved - t.n, version = s.version + t.changes, updated_at = now()
    FROM (SELECT product_id, warehouse_id, sum(n) AS n, count(*) AS changes
          FROM moves GROUP BY 1, 2) t
    WHERE s.product_id = t.product_id AND s.warehouse_id = t.warehouse_id
), ledger AS (
    INSERT INTO movements (product_id, warehouse_id, kind, quantity_delta, reserved_delta,
                           quantity, reserved, version, reservation_id)
    SELECT product_id, warehouse_id, 'expired', 0, -n, quantity, reserved, version,
           reservation_id
    FROM moves ORDER BY product_id, warehouse_id, version
), done AS (
    UPDATE reservations r SET status = 'expired', updated_at = now()
    FROM eligible e WHERE r.id = e.id
)
SELECT d.id, (d.id IN (SELECT id FROM eligible)) AS released,
       ARRAY(SELECT DISTINCT product_id FROM lines WHERE reservation_id = d.id) AS products
FROM due d
"""

# $1 hours, $2 chunk size.
_PURGE_CHUNK = """
DELETE FROM idempotency_keys
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM idempotency_keys
    WHERE created_at < now() - make_interval(hours => $1)
    LIMIT $2))
"""


class Expiry:
    """The sweeper and the purge of one process; several processes share the work."""

    def __init__(
        self,
        store: Store,
        *,
        batch: int = 1000,
        on_released: Callable[[Iterable[str]], None] | None = None,
    ) -> None:
        """``on_released(product_ids)`` is called after a pass released stock of those
        products (the service forgets cached refusals and wakes the relay)."""
        self.store = store
        self.batch = batch
        self.on_released = on_released or (lambda products: None)

    async def expire_once(self, exclude: Iterable[UUID] = ()) -> tuple[int, list[UUID]]:
        """One pass: (reservations released, ids due but left for later: a row busy)."""
        async with self.store.transaction() as conn:
            rows = await conn.fetch(_EXPIRE, self.batch, list(exclude))
        released = [r for r in rows if r["released"]]
        if released:
            self.on_released({p for r in released for p in r["products"]})
        return len(released), [r["id"] for r in rows if not r["released"]]

    async def expire_due(self) -> int:
        """Release everything due now, pass after pass; returns how many. Reservations
        with a busy row are skipped for the rest of this round (the next round retries)."""
        total = 0
        skipped: set[UUID] = set()
        while True:
            released, busy = await self.expire_once(skipped)
            total += released
            skipped.update(busy)
            metrics.SWEEPS.inc()
            if released + len(busy) < self.batch:
                break
        metrics.EXPIRED.inc(total)
        return total

    async def run_sweeper(self, interval: float) -> None:
        """Expire due reservations every ``interval`` seconds, forever."""
        while True:
            try:
                await self.expire_due()
            except InventoryError as exc:  # the database is unavailable: next round
                log.warning("expiry sweep failed (%s); retrying", exc)
            except Exception:  # never let one bad pass end expiry in this process
                log.exception("expiry sweep failed; retrying")
            await asyncio.sleep(interval)

    async def purge(self, older_than_hours: int, chunk: int = 1000) -> int:
        """Delete idempotency keys older than ``older_than_hours``, ``chunk`` rows per
        transaction; returns how many."""
        total = 0
        while True:
            async with self.store.transaction() as conn:
                status = await conn.execute(_PURGE_CHUNK, older_than_hours, chunk)
            deleted = int(status.split()[-1])
            total += deleted
            if deleted < chunk:
                return total

    async def run_purge(
        self, older_than_hours: int, every: float = 3600.0, retry: float = 60.0
    ) -> None:
        """Purge now and then every ``every`` seconds; after a failure, ``retry`` later."""
        while True:
            try:
                deleted = await self.purge(older_than_hours)
            except Exception as exc:
                log.warning("idempotency purge failed (%r); retrying in %gs", exc, retry)
                await asyncio.sleep(retry)
                continue
            if deleted:
                log.info("purged %d idempotency keys", deleted)
            await asyncio.sleep(every)
