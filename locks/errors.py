"""Exceptions raised by :mod:`locks`.

All of them derive from :class:`LockError`, so ``except LockError`` catches every
lock-specific failure. Redis transport errors (``redis.exceptions.RedisError``) are
not wrapped: they mean "unknown", not "not held", and callers usually want to treat
the two differently.
"""

from __future__ import annotations

__all__ = ["LockError", "LockLost", "LockNotAcquired", "LockNotOwned"]


class LockError(Exception):
    """Base class for all lock errors."""


class LockNotAcquired(LockError):
    """The lock could not be acquired before the timeout elapsed."""


class LockLost(LockError):
    """The lock expired or was taken by someone else while the holder was using it.

    Raised from ``async with`` when the lease ended before the block did (detected by
    the auto-renew watchdog, or by the token-checked release at the end of the block).
    Work done under the lock may have overlapped with another holder; writes should be
    guarded by a fence (see :mod:`locks.lock`).
    """


class LockNotOwned(LockError):
    """``release()`` or ``extend()`` was called on a lock this object does not hold.

    Either it was never acquired, or it expired / was taken over before the call. The
    token check guarantees nothing belonging to another holder was touched.
    """
