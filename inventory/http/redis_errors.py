"""Redis failures as answers: the one table for every request path that awaits Redis.

A request meets Redis in three places: stream tickets (issued by
``POST /v1/stream-tickets``, checked and redeemed at the WebSocket and SSE handshakes:
:mod:`.stream_auth`), the product locks of ``INVENTORY_RESERVE_STRATEGY=lock`` (the app
factory's lock factory) and ``/ready``. The first two run their Redis calls in
:func:`redis_translated`, which turns whatever redis-py (or the socket under it) raises
into :class:`~inventory.domain.model.Unavailable`: 503 ``unavailable`` with
``Retry-After`` and the caller's fixed message, never Redis's own text (it can name keys,
nodes and addresses). ``/ready`` reports any of :data:`REDIS_FAILURES` as ``redis: false``.
Subscribing a stream reads through the hub, which answers a failure with an ``error``
message on the stream (:mod:`realtime.hub`). The PostgreSQL counterpart of this table is
:func:`inventory.store.db._translated`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from redis import exceptions as rx

from ..domain.model import Unavailable

__all__ = ["OUTAGES", "REDIS_FAILURES", "redis_translated"]

log = logging.getLogger("inventory.redis")

OUTAGES: tuple[type[Exception], ...] = (
    OSError,  # sockets; the builtin TimeoutError (an asyncio timeout running out) is one
    rx.ConnectionError,  # refused, reset, LOADING (BusyLoadingError), AUTH, max clients
    rx.TimeoutError,  # the client's socket_timeout ran out
    rx.ReadOnlyError,  # a write reached a replica: a failover is in progress
    rx.TryAgainError,  # TRYAGAIN: a slot is migrating
    rx.AskError,  # MOVED or ASK (MovedError is one) still pointing elsewhere
    rx.ClusterError,  # CLUSTERDOWN, MASTERDOWN, "TTL exhausted" (a redirect loop)
    rx.RedisClusterException,  # no node reachable, a slot no node serves (not a RedisError)
    rx.OutOfMemoryError,  # OOM: maxmemory reached
)
"""Redis is away or cannot serve now: logged as a warning, with the class name only."""

REDIS_FAILURES: tuple[type[Exception], ...] = (*OUTAGES, rx.RedisError)
"""Everything a Redis call can raise. A ``RedisError`` outside :data:`OUTAGES` (WRONGTYPE,
NOPERM, an unparsable reply, a ``DataError`` from the client) is a bug or a broken
deployment: logged with its traceback, and answered 503 all the same, so that clients
retry rather than take it as final."""


@contextlib.contextmanager
def redis_translated(message: str) -> Iterator[None]:
    """Redis calls whose every failure leaves as ``Unavailable(message)`` (503)."""
    try:
        yield
    except OUTAGES as exc:
        log.warning("Redis unavailable (%s): %s", type(exc).__name__, message)
        raise Unavailable(message) from None
    except rx.RedisError as exc:
        log.error("unexpected Redis error (%s): %s", type(exc).__name__, message, exc_info=exc)
        raise Unavailable(message) from None
