"""The per-process WebSocket fan-out hub: Redis pub/sub in, per-connection buffers out.

Data path: the outbox relay publishes each stock change to the product's stock channel
(:meth:`realtime.keys.RedisKeys.stock_channel`) as data (:mod:`realtime.feed`), not as
a client message; the hub holds one Redis subscription per product that has at least one
local subscriber (one pub/sub connection per process,
:class:`~realtime.subscriber.ChannelSubscriber`), keeps the newest state per row of the
messages read in one burst, builds each one's client message once
(:mod:`realtime.protocol`; :class:`~realtime.protocol.Outgoing`: text and WebSocket
frame) and offers the rows of a product together to every local session of it. Sessions
conflate and write directly to the socket, or through a writer task while the socket
pushes back (:mod:`realtime.session`).

Consistency policy (no subscriber is left on a stale value):

* The hub remembers the newest version it forwarded per (product, warehouse). An update
  not newer is dropped (duplicates after a relay retry, reordering); one that skips
  versions (``new > last + 1``) is forwarded and its product re-read from PostgreSQL,
  since a lost message for one row may mean lost messages for others. A message the hub
  cannot read (a newer publisher's kind, see :mod:`realtime.feed`) re-reads its product.
* After the pub/sub connection is re-established (all channels confirmed), every locally
  subscribed product is re-read from PostgreSQL and what changed is pushed (``event``
  ``resync``). With the subscriber's 0.5 s reconnect backoff this keeps clients within
  about a second of the truth after Redis returns.
* Every database read (snapshot or resync) also raises the hub's versions and pushes rows
  newer than what was forwarded to all local subscribers of the product (a resync pushes
  every row; each session drops what it already has).
* Derived state beyond rows (a kit's number, from ``extra_snapshots``) is re-read with
  every resync and pushed to all local subscribers of the product, like the rows: after a
  reconnect, a gap or an overflow a kit's subscribers get its current number. A gap on a
  product also re-reads the state derived from it (the hook's ``related``: the kits using
  a component), since the messages lost with the gap may include theirs. (Alerts are
  events, not state: a lost one is not sent again.)
* No periodic full resync: every way a message can be lost ends in a detectable event
  (connection loss, caught by errors or the PING watchdog for half-open sockets; or a
  version gap), and a timer would cost a database read per subscribed product per period
  on every process for nothing in the normal case.

Subscribe protocol: interest is registered (SUBSCRIBE confirmed by a PING barrier) *before*
the snapshot is read, so every change committed after the read arrives through Redis; the
session holds the product's updates until its snapshot is queued, then releases only
those newer than the snapshot or the client's ``since``.

Snapshot rounds: concurrent subscribes share that work. A subscribe made while a round is
under way joins the next one, which confirms every channel wanted so far with one barrier
and reads every product asked for once (one query per ``resync_batch`` products). When a
server restarts and thousands of clients subscribe at once, that is a few queries and
PINGs instead of one of each per client, and less transient state per waiting subscribe.
The price: a lone subscribe may wait for the round in progress before its own (at most
one extra barrier and read).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from realtime import feed
from realtime.feed import AlertData, KitData, StockData
from realtime.keys import RedisKeys
from realtime.ports import LevelReader, LevelState
from realtime.protocol import (
    MAX_SUBSCRIPTIONS,
    PONG,
    Command,
    ErrorCode,
    Outgoing,
    Ping,
    ProtocolError,
    Subscribe,
    encode_alert,
    encode_kit,
    encode_snapshot,
    encode_stock,
    encode_subscribed,
    encode_unsubscribed,
    stock_from_level,
)
from realtime.session import (
    SLOW_CONSUMER_CLOSE,
    HubStats,
    Session,
    SessionClosed,
    SessionSettings,
    Transport,
    Update,
)
from realtime.sharded import RedisClient, make_subscriber
from realtime.tasks import cancel_and_wait, spawn

__all__ = [
    "MAX_CONNECTIONS",
    "ExtraSnapshots",
    "Hub",
    "HubFull",
    "HubSettings",
    "HubStats",
]

log = logging.getLogger("realtime.hub")

# Buffer keys of derived messages on a product's stream (no warehouse id has a space).
_KIT_KEY = " kit"
_ALERT_KEY = " alert"

#: Reads derived state ``(product_id, kit data)`` of the products of the first argument,
#: and of the products derived from those of the second (``related``).
ExtraSnapshots = Callable[[Sequence[str], Sequence[str]], Awaitable[list[tuple[str, KitData]]]]

SHUTDOWN_CLOSE = 1001
MAX_CONNECTIONS = 10_000  # stream connections (WebSocket and SSE) per process, by default


def _kit_update(product_id: str, kit: KitData) -> Update:
    """A kit's message for the buffers: conflated per kit, ordered by its ``seq``."""
    return (_KIT_KEY, kit.seq, Outgoing(encode_kit(product_id, kit)))


class HubFull(Exception):
    """The process already holds :attr:`HubSettings.max_connections` stream connections."""


@dataclass(frozen=True, slots=True)
class HubSettings:
    """Limits and timings; defaults follow the product spec."""

    max_subscriptions: int = MAX_SUBSCRIPTIONS  # products per connection
    max_connections: int = MAX_CONNECTIONS  # open sessions per process (handshake: 503)
    buffer_capacity: int = 1024  # pending stock states per connection (~200 B each)
    control_capacity: int = 64  # queued control messages per connection
    send_timeout: float = 30.0  # a client not reading for this long is closed
    close_timeout: float = 1.0  # then aborted if the close frame cannot go out
    resync_batch: int = 500  # products per database read when resyncing
    redis_health_interval: float = 5.0
    redis_max_backoff: float = 0.5

    def session(self) -> SessionSettings:
        return SessionSettings(
            buffer_capacity=self.buffer_capacity,
            control_capacity=self.control_capacity,
            close_timeout=self.close_timeout,
        )


class _Topic:
    """Local state of one product: its sessions and the newest versions forwarded.

    ``product_id`` is the one string object every session's buffer uses as its key for
    the product, instead of each connection keeping its own copy from its request.
    """

    __slots__ = ("product_id", "sessions", "versions")

    def __init__(self, product_id: str) -> None:
        self.product_id = product_id
        self.sessions: set[Session] = set()
        self.versions: dict[str, int] = {}


class Hub:
    """One per server process; see the module docstring."""

    def __init__(
        self,
        redis: RedisClient,
        levels: LevelReader,
        *,
        prefix: str = "inventory",
        settings: HubSettings | None = None,
        extra_snapshots: ExtraSnapshots | None = None,
    ) -> None:
        self.stats = HubStats()
        self._extra_snapshots = extra_snapshots
        self._extra_version = itertools.count(1)  # alerts: each one is news
        self.settings = settings or HubSettings()
        self._session_settings = self.settings.session()
        self._levels = levels
        self._keys = RedisKeys(prefix)
        self._subscriber = make_subscriber(
            redis,
            self,
            health_interval=self.settings.redis_health_interval,
            max_backoff=self.settings.redis_max_backoff,
        )
        self._topics: dict[str, _Topic] = {}
        self._sessions: set[Session] = set()
        self._burst: dict[str, dict[str, StockData]] = {}  # product -> row -> newest
        self._unreadable = 0  # published messages this version could not read
        self._fan_out_handle: asyncio.Handle | None = None
        self._resync_wanted: set[str] = set()
        self._resync_related: set[str] = set()  # of those: re-read what derives from them
        self._resync_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()  # unsubscribes, slow-client closes
        self._snapshot_products: set[str] = set()  # for the next snapshot round
        self._snapshot_waiters: list[asyncio.Future[dict[str, list[LevelState]]]] = []
        self._snapshot_round = False  # a round task is running

    # lifecycle

    async def start(self) -> None:
        await self._subscriber.start()
        self._tasks = [
            spawn("realtime-hub-resync", self._resync_loop),
            spawn("realtime-hub-reaper", self._reap_loop),
        ]

    async def stop(self) -> None:
        """Close every connection with 1001, then stop the background tasks."""
        await asyncio.gather(
            *(s.close(SHUTDOWN_CLOSE, "server shutting down") for s in list(self._sessions))
        )
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(*tasks)
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._subscriber.stop()

    # sessions

    @property
    def full(self) -> bool:
        """Whether a new connection would pass ``max_connections`` (checked at handshakes
        before the credentials, so a refused client does not spend its ticket)."""
        return self.stats.connections >= self.settings.max_connections

    def open(self, transport: Transport) -> Session:
        """A session for a new connection (WebSocket or SSE); raises :class:`HubFull`.

        Synchronous, so the check and the count cannot be raced by another handshake."""
        if self.full:
            raise HubFull
        session = Session(transport, self, self._session_settings)
        self._sessions.add(session)
        self.stats.connections += 1
        self.stats.connections_total += 1
        return session

    def detach(self, session: Session) -> None:
        """Forget a closed session (idempotent); drops its Redis interest if it was last."""
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        self.stats.connections -= 1
        products = session.buffer.products
        for product_id in products:
            session.buffer.forget(product_id)
        self._leave(session, products)

    async def execute(self, session: Session, command: Command) -> None:
        """Run one client command; raises ProtocolError for an answer of type error."""
        if session.closed:  # e.g. reaped while its reader waited: must not join topics again
            raise SessionClosed
        if isinstance(command, Ping):
            await session.send_control(PONG)
        elif isinstance(command, Subscribe):
            await self._subscribe(session, command)
        else:
            products = [p for p in command.product_ids if p in session.buffer]
            for product_id in products:
                session.buffer.forget(product_id)
            self._leave(session, products)
            await session.send_control(encode_unsubscribed(command.product_ids))

    async def _subscribe(self, session: Session, command: Subscribe) -> None:
        new = [p for p in command.product_ids if p not in session.buffer]
        if session.buffer.product_count + len(new) > self.settings.max_subscriptions:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self.settings.max_subscriptions} products per connection",
            )
        if new:
            new = self._join(session, new)
            try:
                levels = await self._snapshot(new)
            except Exception:
                for product_id in new:
                    session.buffer.forget(product_id)
                self._leave(session, new)
                raise ProtocolError(
                    ErrorCode.UNAVAILABLE, "stock levels cannot be read right now; try again"
                ) from None
            since = command.since or {}
            for product_id in new:
                await self._send_snapshot(
                    session, product_id, levels.get(product_id, []), since.get(product_id)
                )
            if self._extra_snapshots is not None:
                await self._send_extra_snapshots(session, new)
        await session.send_control(encode_subscribed(command.product_ids))

    async def _send_extra_snapshots(self, session: Session, products: Sequence[str]) -> None:
        """Derived state beyond rows (a kit's number) for newly subscribed products; a
        failure costs only that message (the next change sends it again)."""
        assert self._extra_snapshots is not None
        try:
            extras = await self._extra_snapshots(products, ())
        except Exception:
            log.exception("extra snapshot read failed")
            return
        for product_id, kit in extras:
            session.offer(product_id, [_kit_update(product_id, kit)])

    def _apply_extras(self, extras: Sequence[tuple[str, KitData]]) -> None:
        """Push derived messages read on a resync to every local session of their
        products (each session drops what is not newer than what it has)."""
        for product_id, kit in extras:
            topic = self._topics.get(product_id)
            if topic is not None:
                self._offer(topic, [_kit_update(product_id, kit)])

    async def _snapshot(self, products: Sequence[str]) -> dict[str, list[LevelState]]:
        """Current rows of ``products`` (joined already), read in the next snapshot round;
        the result may hold other products too."""
        waiter: asyncio.Future[dict[str, list[LevelState]]]
        waiter = asyncio.get_running_loop().create_future()
        self._snapshot_products.update(products)
        self._snapshot_waiters.append(waiter)
        if not self._snapshot_round:
            self._snapshot_round = True
            self._spawn(self._snapshot_rounds())
        return await waiter

    async def _snapshot_rounds(self) -> None:
        """Serve snapshot requests in rounds until none is left (see the module doc)."""
        try:
            while self._snapshot_waiters:
                waiters, self._snapshot_waiters = self._snapshot_waiters, []
                products = list(self._snapshot_products)
                self._snapshot_products = set()
                levels: dict[str, list[LevelState]] = {}
                try:
                    # Unconfirmed (Redis down): go on; on_connected resyncs after reconnect.
                    await (await self._subscriber.flush())
                    step = self.settings.resync_batch
                    for start in range(0, len(products), step):
                        levels.update(
                            await self._levels.read_levels(products[start : start + step])
                        )
                except Exception as exc:
                    log.exception("snapshot read failed")
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                self._apply(levels, force=False)
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(levels)
        finally:
            self._snapshot_round = False

    async def _send_snapshot(
        self,
        session: Session,
        product_id: str,
        rows: Sequence[LevelState],
        since: Mapping[str, int] | None,
    ) -> None:
        known = dict(since or {})
        fresh = [r for r in rows if r.version > known.get(r.warehouse_id, 0)]
        await session.send_control(encode_snapshot(product_id, fresh))
        for row in rows:
            known[row.warehouse_id] = max(row.version, known.get(row.warehouse_id, 0))
        session.buffer.release(product_id, known)
        session.wake()

    def _join(self, session: Session, products: Sequence[str]) -> list[str]:
        """Register interest; returns the products as the topics' own id strings."""
        channels = []
        joined = []
        for product_id in products:
            topic = self._topics.get(product_id)
            if topic is None:
                topic = self._topics[product_id] = _Topic(product_id)
                channels.append(self._keys.stock_channel(product_id))
            session.buffer.hold(topic.product_id)
            topic.sessions.add(session)
            joined.append(topic.product_id)
        self.stats.subscriptions += len(products)
        self.stats.topics = len(self._topics)
        self._subscriber.want(channels)
        return joined

    def _leave(self, session: Session, products: Sequence[str]) -> None:
        channels = []
        for product_id in products:
            topic = self._topics.get(product_id)
            if topic is None or session not in topic.sessions:
                continue
            topic.sessions.discard(session)
            self.stats.subscriptions -= 1
            if not topic.sessions:
                del self._topics[product_id]
                channels.append(self._keys.stock_channel(product_id))
        self.stats.topics = len(self._topics)
        if channels:
            self._subscriber.unwant(channels)
            # Nothing waits for an unsubscribe to take effect, so it is sent in the background.
            self._spawn(self._subscriber.flush())

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background; :meth:`stop` waits for it."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # the stream

    def on_message(self, channel: bytes, data: bytes) -> None:
        """Accept one published message; stock is fanned out at the end of the burst."""
        product_id = self._keys.product_of_channel(channel)
        if product_id is None:
            return
        topic = self._topics.get(product_id)
        if topic is None:
            return
        message = feed.decode(data)
        if isinstance(message, StockData):
            self._accept_stock(topic, message)
        elif isinstance(message, KitData):
            self._offer(topic, [_kit_update(product_id, message)])
        elif isinstance(message, AlertData):  # each one is news
            alert = Outgoing(encode_alert(product_id, message))
            self._offer(topic, [(_ALERT_KEY, next(self._extra_version), alert)])
        else:
            self._unreadable += 1
            if self._unreadable % 1000 == 1:
                log.warning(
                    "unreadable message on %r (%d so far): re-reading the product",
                    channel,
                    self._unreadable,
                )
            self.resync((product_id,))

    def _accept_stock(self, topic: _Topic, data: StockData) -> None:
        warehouse_id, version = data.warehouse_id, data.version
        last = topic.versions.get(warehouse_id)
        if last is not None:
            if version <= last:
                self.stats.stale += 1
                return
            if version > last + 1:
                self.stats.gaps += 1
                self.resync((topic.product_id,), related=True)
        topic.versions[warehouse_id] = version
        burst = self._burst.get(topic.product_id)
        if burst is None:
            burst = self._burst[topic.product_id] = {}
            if self._fan_out_handle is None:
                self._fan_out_handle = asyncio.get_running_loop().call_soon(self._fan_out)
        elif warehouse_id in burst:
            self.stats.coalesced += 1
        burst[warehouse_id] = data

    def _fan_out(self) -> None:
        """Offer the newest state of each row of the burst to every local session.

        The reader takes all messages Redis has buffered before it yields, so under load a
        burst holds many versions of a row: coalescing them here costs one offer per row
        and session instead of one per message and session, the dominant cost when many
        connections share a product. The rows of a product go to a session in one offer,
        so a session with a writable socket writes them with one system call. When idle
        a burst is a single message.
        """
        self._fan_out_handle = None
        burst, self._burst = self._burst, {}
        for product_id, rows in burst.items():
            topic = self._topics.get(product_id)
            if topic is None:
                continue
            # Encoded once per row and process, shared by every session.
            updates = [
                (w, data.version, Outgoing(encode_stock(product_id, data)))
                for w, data in rows.items()
            ]
            self._offer(topic, updates)

    @staticmethod
    def _offer(topic: _Topic, updates: Sequence[Update]) -> None:
        product_id = topic.product_id
        for session in topic.sessions:
            session.offer(product_id, updates)

    def on_connected(self, reconnect: bool) -> None:
        if reconnect:
            self.stats.redis_reconnects += 1
        self.resync(self._topics)

    # resync from the source of truth

    def resync(self, product_ids: Iterable[str], *, related: bool = False) -> None:
        """Re-read these products from the database soon and push what is newer; with
        ``related`` also the derived state of other products that depends on them."""
        products = set(product_ids)
        self._resync_wanted.update(products)
        if related:
            self._resync_related.update(products)
        if self._resync_wanted:
            self._resync_wake.set()

    def _apply(self, levels: dict[str, list[LevelState]], *, force: bool) -> None:
        """Push rows read from the database to the local sessions of their products.

        Rows newer than what the hub forwarded go to every session. With ``force`` (a
        resync) the others go to every session too: a session that overflowed may lack
        them, and each session drops what it already has.
        """
        for product_id, rows in levels.items():
            topic = self._topics.get(product_id)
            if topic is None:
                continue
            updates = []
            for row in rows:
                if row.version > topic.versions.get(row.warehouse_id, 0):
                    topic.versions[row.warehouse_id] = row.version
                elif not force:
                    continue
                message = Outgoing(stock_from_level(row, "resync"))
                updates.append((row.warehouse_id, row.version, message))
            if updates:
                self._offer(topic, updates)

    async def _resync_loop(self) -> None:
        failures = 0
        while True:
            await self._resync_wake.wait()
            self._resync_wake.clear()
            while True:
                self._resync_wanted.intersection_update(self._topics)
                self._resync_related.intersection_update(self._resync_wanted)
                batch = list(itertools.islice(self._resync_wanted, self.settings.resync_batch))
                if not batch:
                    break
                related = [p for p in batch if p in self._resync_related]
                self._resync_wanted.difference_update(batch)
                self._resync_related.difference_update(related)
                try:
                    levels = await self._levels.read_levels(batch)
                    extras: list[tuple[str, KitData]] = []
                    if self._extra_snapshots is not None:
                        extras = await self._extra_snapshots(batch, related)
                except Exception as exc:
                    failures += 1
                    self._resync_wanted.update(batch)
                    self._resync_related.update(related)
                    log.warning("resync read failed (%s); retrying", exc)
                    await asyncio.sleep(min(1.0, 0.05 * 2**failures))
                    continue
                failures = 0
                self.stats.resyncs += len(batch)
                self._apply(levels, force=True)
                self._apply_extras(extras)

    async def _reap_loop(self) -> None:
        """Close sessions whose pending send has been blocked for ``send_timeout``."""
        timeout = self.settings.send_timeout
        reason = f"slow consumer: not reading for {timeout:g}s"
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            deadline = loop.time() - timeout
            for session in list(self._sessions):
                since = session.blocked_since
                if since is not None and since < deadline and not session.closed:
                    self.stats.slow_disconnects += 1
                    self._spawn(session.close(SLOW_CONSUMER_CLOSE, reason))
