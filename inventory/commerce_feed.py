"""Alerts and kit numbers on the live stream: a ledger consumer of its own.

Like the relay, it reads committed ledger rows in outbox order under a lease with a
durable cursor (:class:`~inventory.store_feed.PgOutbox`, name ``{prefix}:commerce``), so
one process at a time does the work, a crash resumes from the cursor, and it never waits
for unrelated transactions. For each batch it publishes data (:mod:`realtime.feed`) on
the products' stream channels; the hubs turn it into the clients' ``alert`` and ``kit``
messages:

- :class:`~realtime.feed.AlertData` for every low-stock crossing of the rows
  (:func:`inventory.alerts.crossings`, derived from the ledger, so a batch replayed after
  a crash publishes the same alerts again rather than none);
- :class:`~realtime.feed.KitData` for each kit using a changed product whose number
  differs from what this leader last published (only kits using the changed products are
  recomputed). ``seq`` is a Redis counter per kit, so it only goes up whichever process
  publishes; a subscriber also gets the current number and ``seq`` when it subscribes
  (:class:`KitSnapshots`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from realtime import feed
from realtime.feed import AlertData, KitData
from realtime.keys import RedisKeys
from realtime.ports import StockChange
from realtime.sharded import RedisClient, publish_all

from .alerts import crossings
from .commerce import kit_reservable
from .commerce_store import kits_among_ids, kits_using, reservables
from .store import Store
from .store_feed import PgOutbox, PgOutboxLease

__all__ = ["CommerceFeed", "KitSnapshots"]

log = logging.getLogger("inventory.commerce_feed")


class CommerceFeed:
    """The alert and kit publisher of this process (active while it holds the lease)."""

    def __init__(
        self,
        outbox: PgOutbox,
        store: Store,
        redis: RedisClient,
        *,
        prefix: str = "inventory",
        poll_interval: float = 0.1,
        batch_size: int = 1000,
    ) -> None:
        self._outbox = outbox
        self._store = store
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._name = f"{prefix}:commerce"
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self._last: dict[str, int] = {}  # kit -> number last published by this leader

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            lease = None
            try:
                lease = await self._outbox.acquire(self._name)
                if lease is not None:
                    self._last.clear()
                    await self._lead(lease)
            except Exception as exc:  # database or Redis away: campaign again
                log.warning("commerce feed interrupted (%s); retrying", exc)
            finally:
                if lease is not None:
                    with contextlib.suppress(Exception):
                        await lease.release()
            await asyncio.sleep(1.0)

    async def _lead(self, lease: PgOutboxLease) -> None:
        while True:
            self._wake.clear()
            batch = await lease.fetch(self._batch_size)
            if batch:
                await self.publish(batch)
                await lease.advance(batch[-1].position)
                if len(batch) >= self._batch_size:
                    continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()

    async def publish(self, batch: Sequence[StockChange]) -> None:
        """Publish the alerts and changed kit numbers of one ledger batch."""
        changed = sorted({c.product_id for c in batch})
        async with self._store.connection() as conn:
            alerts = await crossings(conn, [c.id for c in batch])
            kits = await kits_using(conn, changed)
            parts = sorted({c.product_id for comps in kits.values() for c in comps})
            numbers = await reservables(conn, parts) if kits else {}
        at = {c.id: c.created_at.timestamp() for c in batch}
        messages: list[tuple[str, AlertData | KitData]] = [
            (a.product_id, AlertData(a.event, a.reservable, at[a.ledger_id])) for a in alerts
        ]
        for kit, components in sorted(kits.items()):
            n = kit_reservable(components, numbers)
            if self._last.get(kit) == n:
                continue
            self._last[kit] = n
            seq = await self._redis.incr(self._keys.kit_seq(kit))
            messages.append((kit, KitData(n, seq)))
        if messages:
            channel = self._keys.stock_channel
            await publish_all(self._redis, [(channel(p), feed.encode(m)) for p, m in messages])


class KitSnapshots:
    """The kit data a new subscriber of a kit gets first (for the hub, which sends it as
    the ``kit`` message)."""

    def __init__(self, store: Store, redis: RedisClient, prefix: str = "inventory") -> None:
        self._store = store
        self._redis = redis
        self._keys = RedisKeys(prefix)

    async def __call__(self, product_ids: Sequence[str]) -> list[tuple[str, KitData]]:
        """``(kit id, data)`` for each kit among the ids."""
        async with self._store.connection() as conn:
            kits = await kits_among_ids(conn, product_ids)
            if not kits:
                return []
            parts = sorted({c.product_id for comps in kits.values() for c in comps})
            numbers = await reservables(conn, parts)
        out = []
        for kit, components in kits.items():
            # Counted like a change, so it is above anything sent before (and never 0).
            seq = await self._redis.incr(self._keys.kit_seq(kit))
            out.append((kit, KitData(kit_reservable(components, numbers), seq)))
        return out
