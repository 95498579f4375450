"""Alerts and kit numbers on the live stream: a follower of the outbox relay.

The relay leader (:mod:`realtime.relay`, one per database, Redis and prefix) hands it
every batch of committed ledger rows it published, before saving its cursor past them
(:data:`realtime.relay.Follower`): one read of the ledger feeds the stock, alert and kit
messages, and a batch replayed after a crash is followed again. (It used to be a ledger
consumer with a lease and cursor of its own: three more statements per batch.)

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

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from realtime import feed
from realtime.feed import AlertData, KitData
from realtime.keys import RedisKeys
from realtime.ports import StockChange
from realtime.sharded import RedisClient, publish_all

from ..domain.commerce import kit_reservable
from ..store.commerce import KitReading, read_kits
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
    """The alert and kit publisher: :meth:`publish` is the relay's follower."""

    def __init__(self, store: Store, redis: RedisClient, *, prefix: str = "inventory") -> None:
        self._store = store
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._kits = KitNumbers(redis, prefix)

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
