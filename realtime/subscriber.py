"""One Redis pub/sub connection per process, owned by a reader loop that reconnects itself.

redis-py's ``PubSub`` re-subscribes silently after a reconnect, so whatever was published
in between is lost without a trace. This class does its own connection management on a
plain ``redis.asyncio`` connection instead, and makes every loss visible:

* The reader loop owns the connection. On any error it drops it, reconnects with capped
  exponential backoff (``max_backoff``, default 0.5 s, so a returning Redis is noticed
  within that), re-subscribes every wanted channel, and once Redis has confirmed them
  calls :meth:`SubscriberListener.on_connected` so the owner can re-read what it may have
  missed from the source of truth.
* Liveness: when nothing has arrived for ``health_interval`` a PING is sent; no answer
  within another ``health_interval`` means a half-open connection, which is dropped.
* Subscriptions are declared, not commanded: :meth:`want` / :meth:`unwant` change the
  wanted set synchronously, :meth:`flush` sends Redis the difference to what it was last
  told (under one lock, so commands can never reach Redis out of order) followed by a
  PING. The PING's reply is a *barrier*: when it arrives, every SUBSCRIBE sent before it is
  active. ``flush`` returns that barrier; it resolves ``False`` when the connection is
  lost first (or is down), in which case ``on_connected`` will follow the reconnect.

The connection uses RESP2 without response decoding, whatever the client's settings, so
message parsing has one shape: ``[b"message", channel, data]``.

Sharded mode (``sharded=True``, one instance per Redis Cluster node, driven by
:class:`realtime.sharded.ShardedSubscriber`): ``SSUBSCRIBE``/``SUNSUBSCRIBE``, one command
per hash slot (a cluster refuses channels of several slots in one command), messages
``[b"smessage", channel, data]``. A ``MOVED``/``ASK`` reply, a ``sunsubscribe`` the
server sent on its own (the slot migrated away) and a failed connect call ``on_redirect``
so the owner re-reads the slot map and moves the channels; the connection stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Iterable
from itertools import groupby
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ResponseError

from realtime.tasks import cancel_and_wait, spawn

__all__ = ["ChannelSubscriber", "SubscriberListener"]

log = logging.getLogger("realtime.subscriber")


def _slot(channel: str) -> int:
    return key_slot(channel.encode())


class SubscriberListener(Protocol):
    def on_message(self, channel: bytes, data: bytes) -> None:
        """A published message on a wanted channel (called on the reader task; no awaits)."""
        ...

    def on_connected(self, reconnect: bool) -> None:
        """All wanted channels are active on a new connection (``reconnect``: not the first)."""
        ...


class ChannelSubscriber:
    """Explicitly reconnecting pub/sub subscriber; see the module docstring for the policy."""

    def __init__(
        self,
        redis: aioredis.Redis | None,
        listener: SubscriberListener,
        *,
        health_interval: float = 5.0,
        max_backoff: float = 0.5,
        sharded: bool = False,
        connection_kwargs: dict[str, Any] | None = None,
        on_redirect: Callable[[], None] | None = None,
    ) -> None:
        """``redis`` supplies the connection settings unless ``connection_kwargs`` (a
        cluster node's) are given; see the module docstring for ``sharded``."""
        self._redis = redis
        self._listener = listener
        self._sharded = sharded
        self._connection_kwargs = connection_kwargs
        self._on_redirect = on_redirect
        self._message = b"smessage" if sharded else b"message"
        self._health_interval = health_interval
        self._max_backoff = max_backoff
        self._wanted: set[str] = set()
        self._told: set[str] = set()  # what the current connection has been told
        self._conn: Any = None  # redis.asyncio.Connection while a session is live
        self._lock = asyncio.Lock()
        self._barriers: deque[tuple[float, asyncio.Future[bool]]] = deque()
        self._last_rx = 0.0
        self._failures = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = spawn("realtime-subscriber", self._run)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    def want(self, channels: Iterable[str]) -> None:
        self._wanted.update(channels)

    def unwant(self, channels: Iterable[str]) -> None:
        self._wanted.difference_update(channels)

    def forget(self, channels: Iterable[str]) -> None:
        """Drop channels this node no longer serves, sending nothing about them."""
        channels = set(channels)
        self._wanted.difference_update(channels)
        self._told.difference_update(channels)

    async def flush(self) -> asyncio.Future[bool]:
        """Bring Redis in line with the wanted set; returns the barrier (see module doc)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        async with self._lock:
            conn = self._conn
            if conn is None or not conn.is_connected:
                future.set_result(False)
                return future
            # Registered before sending: the reply may be read while the send is drained.
            barrier = (asyncio.get_running_loop().time(), future)
            self._barriers.append(barrier)
            try:
                await self._send_diff(conn)
                await conn.send_command("PING", check_health=False)
            except Exception as exc:  # the reader sees the broken connection and reconnects
                log.warning("redis pub/sub command failed: %s", exc)
                with contextlib.suppress(ValueError):
                    self._barriers.remove(barrier)
                if not future.done():
                    future.set_result(False)
        return future

    async def _send_diff(self, conn: Any) -> None:
        add = sorted(self._wanted - self._told)
        remove = sorted(self._told - self._wanted)
        if self._sharded:
            self._told.difference_update(remove)
            self._told.update(add)
            commands = [
                (name, *group)
                for name, channels in (("SUNSUBSCRIBE", remove), ("SSUBSCRIBE", add))
                for _, group in groupby(sorted(channels, key=_slot), key=_slot)
            ]
            if commands:
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            return
        if remove:
            self._told.difference_update(remove)
            await conn.send_command("UNSUBSCRIBE", *remove, check_health=False)
        if add:
            self._told.update(add)
            await conn.send_command("SUBSCRIBE", *add, check_health=False)

    def _new_connection(self) -> Any:
        if self._connection_kwargs is not None:
            kwargs = dict(self._connection_kwargs)
            connection_class: Any = aioredis.Connection
        else:
            assert self._redis is not None, "give a client or connection_kwargs"
            pool = self._redis.connection_pool
            kwargs = dict(pool.connection_kwargs)
            connection_class = pool.connection_class
        # Maintenance push notifications need RESP3; this connection is plain RESP2.
        kwargs.pop("maint_notifications_pool_handler", None)
        kwargs.update(
            maint_notifications_config=None,
            protocol=2,
            decode_responses=False,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return connection_class(**kwargs)

    async def _run(self) -> None:
        reconnect = False
        while True:
            conn = self._new_connection()
            try:
                await conn.connect()
                await self._session(conn, reconnect=reconnect)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._failures == 0 or self._failures % 20 == 19:
                    log.warning("redis pub/sub connection failed or lost: %s", exc)
                if self._on_redirect is not None:
                    self._on_redirect()  # a failed-over node: the slot map may have changed
            finally:
                reconnect = reconnect or self._conn is not None
                await self._detach(conn)
            # Reset once a session got its channels confirmed; a server that accepts and
            # then fails at once (e.g. still loading) is retried with growing delays.
            self._failures += 1
            delay = min(self._max_backoff, 0.01 * 2**self._failures)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _session(self, conn: Any, *, reconnect: bool) -> None:
        async with self._lock:
            self._conn = conn
            self._told = set()
            self._last_rx = asyncio.get_running_loop().time()
        ready = await self.flush()

        def on_ready(future: asyncio.Future[bool]) -> None:
            if not future.cancelled() and future.result():
                self._failures = 0
                if reconnect:
                    log.info("redis pub/sub reconnected; resubscribed %d channels", len(self._told))
                self._listener.on_connected(reconnect)

        ready.add_done_callback(on_ready)
        reader = asyncio.create_task(self._read(conn), name="realtime-subscriber-read")
        try:
            while not reader.done():
                await asyncio.wait({reader}, timeout=self._health_interval)
                if not reader.done() and not await self._healthy():
                    raise ConnectionError(
                        f"no reply from redis within {2 * self._health_interval:g}s"
                    )
            reader.result()
        finally:
            await cancel_and_wait(reader)

    async def _healthy(self) -> bool:
        now = asyncio.get_running_loop().time()
        if self._barriers:
            return now - self._barriers[0][0] < self._health_interval
        if now - self._last_rx >= self._health_interval:
            await self.flush()  # a PING probe: its reply refreshes _last_rx
        return True

    async def _read(self, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        on_message = self._listener.on_message
        message = self._message
        while True:
            try:
                response = await conn.read_response(timeout=math.inf)
            except ResponseError as exc:
                if not (self._sharded and str(exc).startswith(("MOVED", "ASK"))):
                    raise
                self._redirected(None)
                continue
            self._last_rx = loop.time()
            if isinstance(response, list):
                kind = response[0]
                if kind == message:
                    on_message(response[1], response[2])
                elif kind == b"pong":
                    self._resolve_barrier(True)
                elif kind == b"sunsubscribe":
                    self._redirected(response[1].decode())
            elif response == b"PONG":  # PING outside subscribed mode (no channels wanted)
                self._resolve_barrier(True)

    def _redirected(self, channel: str | None) -> None:
        """A channel's slot is served elsewhere (``None``: some channel of a command)."""
        if channel is not None:
            if channel not in self._told:
                return  # the reply to our own SUNSUBSCRIBE
            self._told.discard(channel)
        if self._on_redirect is not None:
            self._on_redirect()

    def _resolve_barrier(self, ok: bool) -> None:
        if self._barriers:
            _, future = self._barriers.popleft()
            if not future.done():
                future.set_result(ok)

    async def _detach(self, conn: Any) -> None:
        async with self._lock:
            self._conn = None
            self._told = set()
            while self._barriers:
                self._resolve_barrier(False)
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
