"""Alerts and kit numbers on the live stream: a ledger consumer of its own.

Like the relay, it reads committed ledger rows in outbox order under a lease with a
durable cursor (:class:`~inventory.store.feed.PgOutbox`), so one process at a time does
the work, a crash resumes from the cursor, and it never waits for unrelated transactions.
The lease and cursor are named like the relay's, after the prefix and the Redis server
(``{prefix}:commerce@{redis id}``, :class:`realtime.relay.RedisIdentity`): one publisher
per (database, Redis, prefix), so deployments sharing a database but not a Redis each
publish to their own subscribers. A leader that finds another Redis id (a Redis restart
that lost it, where another process asked first) steps down and campaigns again.

For each batch it publishes data (:mod:`realtime.feed`) on the products' stream
channels; the hubs turn it into the clients' ``alert`` and ``kit`` messages:

- :class:`~realtime.feed.AlertData` for every low-stock crossing of the rows
  (:func:`inventory.service.alerts.crossings`, derived from the ledger, so a batch
  replayed after a crash publishes the same alerts again rather than none);
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
from realtime.relay import RedisIdentity
from realtime.sharded import RedisClient, publish_all

from ..domain.commerce import kit_reservable
from ..store.commerce import kits_among_ids, kits_using, reservables
from ..store.feed import PgOutbox, PgOutboxLease
from ..store.pg import Store
from .alerts import crossings

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
        self._identity = RedisIdentity(redis, prefix)
        self._namespace = f"{prefix}:commerce"
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self._last: dict[str, int] = {}  # kit -> number last published by this leader
        self.lease_name: str | None = None  # once the Redis id is known
        self.leader = False

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            lease = None
            try:
                redis_id = await self._identity.resolve()
                self.lease_name = f"{self._namespace}@{redis_id}"
                lease = await self._outbox.acquire(self.lease_name)
                if lease is not None:
                    self._last.clear()
                    self.leader = True
                    await self._lead(lease, redis_id)
                    log.warning("redis has another id now; the commerce feed campaigns again")
            except Exception as exc:  # database or Redis away: campaign again
                log.warning("commerce feed interrupted (%s); retrying", exc)
            finally:
                self.leader = False
                if lease is not None:
                    with contextlib.suppress(Exception):
                        await lease.release()
            await asyncio.sleep(1.0)

    async def _lead(self, lease: PgOutboxLease, redis_id: str) -> None:
        """Publish batches until Redis has another id than ``redis_id`` (checked every
        second, like the relay's heartbeat)."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + 1.0
        while True:
            if loop.time() >= next_check:
                next_check = loop.time() + 1.0
                if await self._identity.resolve(keep=redis_id) != redis_id:
                    return
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
