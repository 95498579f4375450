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
  changed (only kits using the changed products are recomputed). A subscriber also gets
  the current number and ``seq`` when it subscribes, and after a resync
  (:class:`KitSnapshots`).

Kit numbers and ``seq`` (:class:`KitNumbers`): the feed and every process's snapshots
read kit numbers from PostgreSQL, concurrently, and a hub keeps the message with the
highest ``seq``. So a number and its ``seq`` are paired in Redis (one hash per kit,
:meth:`realtime.keys.RedisKeys.kit`) by a script that accepts a reading only if its
database snapshot is later in commit order than the stored one, or comes from another
database origin (a restore or a failover: :class:`~inventory.store.commerce.KitReading`);
``seq`` goes up by one exactly when an accepted reading changes the number. A reading
that lost the race (taken before a change another reader already recorded) gets the
stored pair back instead of its own number, so an older number can never come with a
higher ``seq``, whichever process read it and in whichever order the reads and the Redis
calls interleave. Whoever records a new number publishes it (a snapshot may see a change
before the feed does), so every process's subscribers get it, and marks it published
afterwards: a pair recorded by a reader that failed or died before publishing is
published by the next reader of the kit. An unchanged number costs no message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from realtime import feed
from realtime.feed import AlertData, KitData
from realtime.keys import RedisKeys
from realtime.ports import StockChange
from realtime.relay import RedisIdentity
from realtime.sharded import RedisClient, publish_all

from ..domain.commerce import kit_reservable
from ..store.commerce import KitReading, read_kits
from ..store.feed import PgOutbox, PgOutboxLease
from ..store.pg import Store
from .alerts import crossings

__all__ = ["CommerceFeed", "KitNumber", "KitNumbers", "KitSnapshots"]

log = logging.getLogger("inventory.commerce_feed")


# KEYS[1]: the kit's hash; ARGV: origin, xmax, running (where the reading's snapshot
# stands, see KitReading) and the number read. Returns the number and seq that stand, and
# 1 when they are still to be published (just recorded, or recorded by a reader that did
# not get to publish them), else 0.
_RECORD = """
local s = redis.call('HMGET', KEYS[1], 'origin', 'xmax', 'running', 'n', 'seq', 'published')
local xmax, running, n = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if s[1] then
    local x, r = tonumber(s[2]), tonumber(s[3])
    local older = s[1] == ARGV[1] and (xmax < x or (xmax == x and running >= r))
    if older or tonumber(s[4]) == n then
        if not older then
            redis.call('HSET', KEYS[1], 'origin', ARGV[1], 'xmax', ARGV[2], 'running', ARGV[3])
        end
        return {tonumber(s[4]), tonumber(s[5]), s[6] == '0' and 1 or 0}
    end
end
local seq = tonumber(s[5] or 0) + 1
redis.call('HSET', KEYS[1], 'origin', ARGV[1], 'xmax', ARGV[2], 'running', ARGV[3],
           'n', ARGV[4], 'seq', seq, 'published', 0)
return {n, seq, 1}
"""

# KEYS[1]: the kit's hash; ARGV: a seq that was published.
_PUBLISHED = """
if redis.call('HGET', KEYS[1], 'seq') == ARGV[1] then
    redis.call('HSET', KEYS[1], 'published', 1)
end
"""


@dataclass(frozen=True, slots=True)
class KitNumber:
    """A kit's number and ``seq`` as they stand; ``publish`` while they may not have
    reached the stream yet (the reader publishes them, then :meth:`KitNumbers.published`)."""

    kit: str
    reservable: int
    seq: int
    publish: bool

    def data(self) -> KitData:
        return KitData(self.reservable, self.seq)


class KitNumbers:
    """Kit numbers paired with their ``seq`` in Redis (see the module docstring). One
    script call per kit: each kit's hash has a cluster slot of its own."""

    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self._record = redis.register_script(_RECORD)
        self._published = redis.register_script(_PUBLISHED)
        self._keys = RedisKeys(prefix)

    async def record(self, reading: KitReading) -> list[KitNumber]:
        """Offer each kit's number in ``reading``; what stands afterwards, per kit."""
        out = []
        for kit, components in sorted(reading.kits.items()):
            n = kit_reservable(components, reading.reservables)
            args: list[str | int] = [reading.origin, *reading.order, n]
            got = await self._record(keys=[self._keys.kit(kit)], args=args)
            out.append(KitNumber(kit, int(got[0]), int(got[1]), bool(got[2])))
        return out

    async def published(self, numbers: Sequence[KitNumber]) -> None:
        """These numbers reached the stream (those flagged ``publish``)."""
        for k in numbers:
            if k.publish:
                await self._published(keys=[self._keys.kit(k.kit)], args=[k.seq])


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
        self._kits = KitNumbers(redis, prefix)
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
            kits = await read_kits(conn, using=changed)
        at = {c.id: c.created_at.timestamp() for c in batch}
        messages: list[tuple[str, AlertData | KitData]] = [
            (a.product_id, AlertData(a.event, a.reservable, at[a.ledger_id])) for a in alerts
        ]
        numbers = await self._kits.record(kits)
        messages += [(k.kit, k.data()) for k in numbers if k.publish]
        if messages:
            channel = self._keys.stock_channel
            await publish_all(self._redis, [(channel(p), feed.encode(m)) for p, m in messages])
            await self._kits.published(numbers)


class KitSnapshots:
    """The ``kit`` messages a hub sends beyond the stream (its ``extra_snapshots`` hook):
    to a new subscriber of a kit, and on a resync."""

    def __init__(self, store: Store, redis: RedisClient, prefix: str = "inventory") -> None:
        self._store = store
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._kits = KitNumbers(redis, prefix)

    async def __call__(
        self, product_ids: Sequence[str], related: Sequence[str] = ()
    ) -> list[tuple[str, KitData]]:
        """``(kit id, data)`` for each kit among
        ``product_ids`` and each kit using one of ``related``: the number and ``seq``
        standing once this reading is recorded, so never older than what was published.
        A number still to be published (this reading is the first to see it) is published
        here too, for the subscribers of every process."""
        async with self._store.connection() as conn:
            reading = await read_kits(conn, among=product_ids, using=related)
        if not reading.kits:
            return []
        numbers = await self._kits.record(reading)
        news = [(self._keys.stock_channel(k.kit), feed.encode(k.data())) for k in numbers
                if k.publish]  # fmt: skip
        if news:
            await publish_all(self._redis, news)
            await self._kits.published(numbers)
        return [(k.kit, k.data()) for k in numbers]
