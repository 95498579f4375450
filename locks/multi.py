"""Holding several locks at once without deadlock.

Each lock is named by the caller as a ``(lock key, fence key)`` pair (see
:class:`~locks.lock.Lock`). Keys are deduplicated and taken in sorted order, so any two
callers that need overlapping key sets acquire the shared keys in the same order and cannot deadlock
(each waits only for keys "after" the ones it holds). The timeout covers the whole
set, not each key. If key ``k`` cannot be taken (timeout, error, cancellation) the
``k - 1`` locks already held are released, newest first, before the error propagates.
On exit all locks are released, newest first; lost leases surface as for a single
:class:`~locks.lock.Lock` (``LockLost`` from the ``async with``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from contextlib import AsyncExitStack
from types import TracebackType

from .lock import DEFAULT_RETRY_BASE, DEFAULT_RETRY_CAP, DEFAULT_TTL, Client, Lock, _timeout

__all__ = ["MultiLock", "acquire_many"]


class MultiLock:
    """An async context manager holding one :class:`Lock` per distinct lock key.

    Every lock shares ``ttl``, ``auto_renew`` and the backoff settings; see
    :class:`Lock` for their meaning. ``timeout`` bounds acquiring all of them.
    """

    __slots__ = ("_locks", "_stack", "_timeout")

    def __init__(
        self,
        redis: Client,
        keys: Iterable[tuple[str, str]],
        ttl: float = DEFAULT_TTL,
        *,
        timeout: float | None = None,
        auto_renew: bool = False,
        retry_base: float = DEFAULT_RETRY_BASE,
        retry_cap: float = DEFAULT_RETRY_CAP,
    ) -> None:
        if isinstance(keys, str):
            raise ValueError("keys must be an iterable of (lock key, fence key) pairs")
        fences: dict[str, str] = {}
        for pair in keys:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ValueError(f"every entry must be a (lock key, fence key) pair, got {pair!r}")
            key, fence_key = pair
            if fences.setdefault(key, fence_key) != fence_key:
                raise ValueError(f"lock key {key!r} given with two fence keys")
        if not fences:
            raise ValueError("keys must contain at least one key")
        if not fences.keys().isdisjoint(fences.values()):
            raise ValueError("a key is used both as a lock key and as a fence key")
        self._timeout = _timeout(timeout)
        self._locks = tuple(
            Lock(
                redis,
                key,
                ttl,
                fence_key=fences[key],
                auto_renew=auto_renew,
                retry_base=retry_base,
                retry_cap=retry_cap,
            )
            for key in sorted(fences)
        )
        self._stack: AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"<MultiLock {[lock.key for lock in self._locks]!r}>"

    @property
    def locks(self) -> tuple[Lock, ...]:
        """The locks, in acquisition (sorted key) order."""
        return self._locks

    @property
    def fences(self) -> dict[str, int]:
        """Fencing number per key for the locks currently or last acquired."""
        return {lock.key: lock.fence for lock in self._locks if lock.fence is not None}

    async def __aenter__(self) -> MultiLock:
        if self._stack is not None:
            raise RuntimeError("this MultiLock is already held")
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        async with AsyncExitStack() as stack:
            for lock in self._locks:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                await lock.acquire(timeout=remaining)
                stack.push_async_exit(lock)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)


acquire_many = MultiLock
"""``async with acquire_many(redis, [(lock_key, fence_key), ...], timeout=2.0) as held:``

The function-style name of :class:`MultiLock` (the same class, same arguments).
"""
