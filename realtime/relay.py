"""The outbox relay: publishes committed ledger rows to Redis, exactly one leader per database.

Policy:

* Leadership: every process runs a relay; the one holding the outbox lease publishes
  (PostgreSQL advisory lock on a dedicated session, see ``inventory/store/feed.py``).
  The lease and its cursor are named after the channel namespace *and the Redis server*
  (``{prefix}:stock@{redis id}``): one leader per (database, Redis, prefix), so a process
  pointed at another Redis runs its own relay instead of silently depending on one that
  publishes elsewhere. The Redis id is a random token kept in Redis itself
  (``{prefix}:relay:id``, created by whoever asks first), so every process agrees on it
  whatever address it uses for that server; a leader re-creates it after a Redis restart
  that lost it (so its cursor and backlog carry over), and steps down if it finds another.
  Others try again every ``campaign_interval`` (1 s). A leader whose database session
  fails gives the lease up and campaigns again, so a crashed process is replaced within
  about a second.
* Liveness: the leader refreshes ``{prefix}:relay:heartbeat`` (expiring after
  ``heartbeat_ttl``, 3 s) every ``heartbeat_interval`` (1 s); :meth:`Relay.lease_held`
  reads it, so ``/ready`` of every process reports a deployment without a publishing
  leader. The relay loop survives any error of its own (cleanup included) and runs under
  :func:`realtime.tasks.supervise`, which restarts it if it ends anyway.
* What it publishes is data (:class:`realtime.feed.StockData`), not the client's
  message: the hubs build that, so the WebSocket protocol can change without this process.
* Order and completeness come from the outbox (final rows only, in stream order after a
  durable cursor). The cursor is saved only *after* a batch was published, so a crash
  between commit and publish loses nothing: the next leader publishes it again (a
  duplicate is dropped by the hubs' version check). Under load the cursor is saved at
  most every ``save_interval`` (50 ms; at once when idle or stopping): one statement and
  one WAL flush fewer per batch, for at most 50 ms of duplicates after a crash. With no
  saved cursor the relay starts at the current tail; history is not replayed.
* Followers (``followers``): callables the leader runs with every batch it published,
  before saving the cursor past it, e.g. the alert and kit publisher: one read of the
  ledger feeds every derived message, under the same lease and cursor, so a crash replays
  the batch for them too. A follower that fails three times on a batch is skipped for
  that batch (logged): it never holds up the stock messages.
* Latency: poll every ``poll_interval`` (10 ms) when idle, immediately again after a full
  batch, and at once after :meth:`Relay.wake` (called by the local service after a commit),
  but not sooner than ``coalesce`` (5 ms) after a batch: under load the commits of that
  time are read, published and followed together (one fence, one read and the followers'
  statements per 5 ms instead of per commit), for at most 5 ms more latency.
* Cost: a batch is published by one ``EVALSHA`` of a script that runs ``PUBLISH`` per
  row, so the client packs one command and reads one reply per batch instead of one per
  row (a redis-py pipeline spent ~14 us of CPU per message at 64 messages a batch, the
  script ~2.6 us; measured on the hot-SKU path, where every reservation is a message).
  Redis runs the batch atomically: other clients wait for it, about a microsecond per
  message.
* Redis Cluster: the batch goes out as ``SPUBLISH`` commands in one pipeline, one write
  per shard (:func:`realtime.sharded.publish_sharded`); a script cannot publish to
  channels of several slots.
* Redis down: writers are never blocked or failed (nothing Redis-related is on the write
  path). The leader keeps the fetched batch and its cursor and retries with capped
  backoff; the backlog is published in order when Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from realtime import feed
from realtime.feed import StockData
from realtime.keys import RedisKeys
from realtime.ports import Outbox, OutboxLease, StockChange
from realtime.sharded import RedisClient, publish_sharded
from realtime.tasks import cancel_and_wait, spawn

__all__ = ["FOLLOW_ATTEMPTS", "Follower", "RedisIdentity", "Relay", "relay_keys"]

# ARGV: channel, message, channel, message, ...
_PUBLISH_ALL = """
for i = 1, #ARGV, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""

# KEYS: id key; ARGV: candidate id. The Redis server's id (created if missing).
_IDENTITY = """
local id = redis.call('GET', KEYS[1])
if not id then
    redis.call('SET', KEYS[1], ARGV[1])
    id = ARGV[1]
end
return id
"""

# KEYS: id key, heartbeat key; ARGV: our id, ttl ms, value. 1, or 0 if the id changed.
_HEARTBEAT = """
local id = redis.call('GET', KEYS[1])
if not id then
    redis.call('SET', KEYS[1], ARGV[1])
elseif id ~= ARGV[1] then
    return 0
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return 1
"""

log = logging.getLogger("realtime.relay")

#: Work the leader does with every batch it published, before it saves the cursor past
#: it (so a batch replayed after a crash is followed again): derived messages such as
#: alerts, from the same read of the ledger instead of a consumer of its own.
Follower = Callable[[Sequence[StockChange]], Awaitable[None]]
FOLLOW_ATTEMPTS = 3


def relay_keys(prefix: str) -> tuple[str, str]:
    """(id key, heartbeat key) of the relay in namespace ``prefix``."""
    keys = RedisKeys(prefix)  # one slot: the scripts above touch both
    return keys.relay("id"), keys.relay("heartbeat")


class RedisIdentity:
    """The Redis server's id, for naming leases per (database, Redis): a random token kept
    in Redis itself (``{prefix}:relay:id``, created by whoever asks first), so every
    process agrees on it whatever address it uses for that server."""

    def __init__(self, redis: RedisClient, prefix: str) -> None:
        self._script = redis.register_script(_IDENTITY)
        self._key = relay_keys(prefix)[0]
        self._candidate = secrets.token_hex(8)

    async def resolve(self, keep: str | None = None) -> str:
        """The id. When Redis has none (a restart that lost it), ``keep`` becomes it (a
        leader passes its own, so its cursor carries over), else a new random one."""
        identity = await self._script(keys=[self._key], args=[keep or self._candidate])
        return identity.decode() if isinstance(identity, bytes) else str(identity)


class _StepDown(Exception):
    """Redis now has another id: this lease feeds a server that is gone."""


class Relay:
    """Outbox -> Redis publisher; see the module docstring."""

    def __init__(
        self,
        outbox: Outbox,
        redis: RedisClient,
        *,
        prefix: str = "inventory",
        poll_interval: float = 0.01,
        batch_size: int = 1000,
        campaign_interval: float = 1.0,
        max_backoff: float = 1.0,
        heartbeat_interval: float = 1.0,
        heartbeat_ttl: float = 3.0,
        save_interval: float = 0.05,
        followers: Sequence[Follower] = (),
        coalesce: float = 0.005,
    ) -> None:
        self._outbox = outbox
        self._followers = tuple(followers)
        self._coalesce = coalesce
        self._redis = redis
        self._publish_all = redis.register_script(_PUBLISH_ALL)
        self._keys = RedisKeys(prefix)
        self._identity = RedisIdentity(redis, prefix)
        self._heartbeat_script = redis.register_script(_HEARTBEAT)
        self._namespace = f"{prefix}:stock"
        self._id_key, self._heartbeat_key = relay_keys(prefix)
        self._redis_id: str | None = None
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_ttl_ms = int(heartbeat_ttl * 1000)
        self._me = f"{socket.gethostname()}:{os.getpid()}"
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._campaign_interval = campaign_interval
        self._max_backoff = max_backoff
        self._save_interval = save_interval
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.leader = False

    @property
    def lease_name(self) -> str | None:
        """The lease and cursor name, once the Redis id is known."""
        return None if self._redis_id is None else f"{self._namespace}@{self._redis_id}"

    async def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = spawn("realtime-relay", self._run, until=self._stopping)

    async def lease_held(self) -> bool:
        """Whether some process (this or another) leads and publishes to this Redis:
        its heartbeat is younger than ``heartbeat_ttl``. Raises Redis errors."""
        return bool(await self._redis.exists(self._heartbeat_key))

    def wake(self) -> None:
        """Poll now (a change was just committed)."""
        self._wake.set()

    async def stop(self, grace: float = 2.0) -> None:
        """Stop at the next safe point (never between a publish and its cursor save, so
        a graceful handover republishes nothing); cancel after ``grace`` seconds."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            await cancel_and_wait(task)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _run(self) -> None:
        """Campaign, lead, campaign again: until stopped, whatever fails."""
        while not self._stopping.is_set():
            lease = None
            try:
                self._redis_id = await self._identity.resolve()
                name = self.lease_name
                assert name is not None
                lease = await self._outbox.acquire(name)
            except Exception as exc:
                log.warning("relay cannot campaign (%s); retrying", exc)
            if lease is not None:
                self.leader = True
                log.info("relay is the leader for this database and redis")
                try:
                    await self._lead(lease)
                except _StepDown:
                    log.warning("redis has another relay id now; campaigning again")
                except Exception as exc:
                    log.warning("relay lost its database session (%s); campaigning again", exc)
                finally:
                    self.leader = False
                    try:
                        await lease.release()
                    except Exception as exc:  # release never raises; if it does, go on
                        log.warning("relay lease release failed (%r)", exc)
            await self._pause(self._campaign_interval)

    async def _beat(self) -> None:
        """Refresh the heartbeat; :class:`_StepDown` if Redis has another id now."""
        ok = await self._heartbeat_script(
            keys=[self._id_key, self._heartbeat_key],
            args=[self._redis_id or "", self._heartbeat_ttl_ms, self._me],
        )
        if not ok:
            raise _StepDown

    async def _lead(self, lease: OutboxLease) -> None:
        loop = asyncio.get_running_loop()
        batch: list[StockChange] = []
        failures = 0
        next_beat = 0.0
        unsaved: tuple[int, int] | None = None  # published, not yet saved durably
        next_save = 0.0
        while not self._stopping.is_set():
            if loop.time() >= next_beat:
                next_beat = loop.time() + self._heartbeat_interval
                with contextlib.suppress(RedisError, OSError):  # publishing reports it
                    await self._beat()
            if not batch:
                self._wake.clear()
                batch = await lease.fetch(self._batch_size)
                if not batch and unsaved is not None:  # idle: save what was published
                    await lease.advance(unsaved)
                    unsaved = None
            if batch:
                try:
                    await self._publish(batch)
                except (RedisError, OSError) as exc:
                    failures += 1
                    if failures == 1 or failures % 20 == 0:
                        log.warning("relay cannot publish to redis (%s); retrying", exc)
                    await asyncio.sleep(min(self._max_backoff, 0.02 * 2**failures))
                    continue
                if failures:
                    log.info("relay publishing again after %d failed attempts", failures)
                    failures = 0
                for follower in self._followers:
                    await self._follow(follower, batch)
                save = loop.time() >= next_save
                await lease.advance(batch[-1].position, save=save)
                if save:
                    next_save = loop.time() + self._save_interval
                unsaved = None if save else batch[-1].position
                full = len(batch) >= self._batch_size
                batch = []
                if full:
                    continue
                # Busy: let the next commits gather for one read rather than one each.
                await asyncio.sleep(self._coalesce)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
        if unsaved is not None:  # stopping: hand over without republishing
            await lease.advance(unsaved)

    async def _follow(self, follower: Follower, batch: list[StockChange]) -> None:
        """Run ``follower`` on a published batch: retried twice after a failure, then the
        batch is skipped for it, so a failing follower never stops the stock messages."""
        for attempt in range(FOLLOW_ATTEMPTS):
            try:
                await follower(batch)
                return
            except Exception as exc:
                if attempt + 1 == FOLLOW_ATTEMPTS:
                    log.error("relay follower failed on a batch (%r); skipped for it", exc)
                else:
                    await asyncio.sleep(0.05 * 2**attempt)

    async def _publish(self, batch: list[StockChange]) -> None:
        channel, data = self._keys.stock_channel, StockData.from_change
        pairs = [(channel(c.product_id), feed.encode(data(c))) for c in batch]
        if isinstance(self._redis, RedisCluster):
            await publish_sharded(self._redis, pairs)
        else:
            await self._publish_all(args=[part for pair in pairs for part in pair])
