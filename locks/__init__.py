"""Distributed locks on Redis for asyncio (redis-py ``redis.asyncio``).

Self-contained: depends only on ``redis``. Start with :class:`Lock` (one key) or
:func:`acquire_many` (several keys, deadlock-free); :mod:`locks.lock` documents the
protocol, fencing, backoff, auto-renew and cancellation policies.
"""

from .errors import LockError, LockLost, LockNotAcquired, LockNotOwned
from .lock import DEFAULT_RETRY_BASE, DEFAULT_RETRY_CAP, DEFAULT_TTL, Client, Lock
from .multi import MultiLock, acquire_many

__all__ = [
    "DEFAULT_RETRY_BASE",
    "DEFAULT_RETRY_CAP",
    "DEFAULT_TTL",
    "Client",
    "Lock",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "MultiLock",
    "acquire_many",
]
