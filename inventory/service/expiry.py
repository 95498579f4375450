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

The statements are the store's (:meth:`~inventory.store.port.InventoryStore.expire_due`,
``purge_idempotency_keys``; on PostgreSQL in :mod:`inventory.store.reservations` and
:mod:`inventory.store.idempotency`); this module holds the policy: the passes, the rounds
and the loops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from uuid import UUID

from .. import metrics
from ..domain.model import InventoryError
from ..store.port import InventoryStore

__all__ = ["Expiry"]

log = logging.getLogger("inventory.expiry")


class Expiry:
    """The sweeper and the purge of one process; several processes share the work."""

    def __init__(
        self,
        store: InventoryStore,
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
        due = await self.store.expire_due(self.batch, list(exclude))
        released = [d for d in due if d.released]
        if released:
            self.on_released({p for d in released for p in d.product_ids})
        return len(released), [d.id for d in due if not d.released]

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
            deleted = await self.store.purge_idempotency_keys(older_than_hours, chunk)
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
