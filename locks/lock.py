"""A Redis lock for asyncio: token-checked, fenced, cancellation-safe.

Protocol (one Redis round trip per operation, all scripts called by SHA):

* acquire: ``SET key token NX PX ttl`` and, only if that succeeded, ``INCR fence_key``,
  atomically in one Lua script. The token is 128 random bits from :mod:`secrets`,
  fresh for every acquisition and stored on the :class:`Lock` object only (never in
  thread-locals or shared state), so two tasks with two ``Lock`` objects on the same
  key can never release or extend each other's lease.
* release / extend: Lua scripts that compare the token before ``DEL`` / ``PEXPIRE``.
  A release after expiry therefore never deletes a newer holder's lock; it raises
  :class:`LockNotOwned` instead.

Fencing. Every successful acquire returns the new value of the caller's ``fence_key``, which
only grows for that key (the fence key has no TTL). A lease-based lock alone cannot
stop a paused holder (GC, overload, network) from writing after its lease ended, so
writes must be checked by the *resource* against a fence. In this product the stock
row ``version`` column is the fence for stock writes: every write is
``UPDATE ... WHERE id = $1 AND version = $v`` (and bumps ``version``), so a holder
that lost its lock cannot overwrite newer state even if it still believes it holds
the lock. The Redis fence is exposed for resources that have no version of their own;
note that it is only as durable as the Redis data (a failover to a replica that missed
the last ``INCR`` can repeat a number), another reason the row version is the real
guard here.

Waiting. Within one process (per event loop and connection pool) the tasks waiting
for a key form a FIFO queue, and only the oldest of them polls Redis: it retries
``SET NX`` with capped exponential backoff and *full jitter*, sleeping
``uniform(0, min(retry_cap, retry_base * 2**n))`` before retry ``n``, clamped to the
remaining timeout, with a last attempt at the deadline (``timeout=0`` is one try).
The other waiters park until a release in this process hands the lock on: every
release wakes the oldest waiter, which tries at once, and newcomers line up behind
existing waiters instead of barging in. So waiters of one process are served in
order, a release wakes exactly one task (no thundering herd), and a hot key costs one
poller per process rather than one per waiting task, which matters when hundreds of
requests wait on the same product. Waiters in other processes see a release only
through their own poller, so across processes the lock moves in runs; each
process's poller checks at least every ``retry_cap``. Parked waiters still retry
on their own after half to one ``ttl`` (jittered), in case a hand-off is missed.

Early wake through Redis was measured with ``bench/locks.py`` and rejected: a
release that ``LPUSH``-es a signal which waiters ``BLPOP`` (with their backoff as the
timeout) lowered contended throughput by about 40 % without improving the p99 wait
(the releasing task usually re-acquires first), and pins one pooled connection per
waiter; pub/sub would need a subscriber connection and task per process whose
lifetime a lock object cannot own. The in-process hand-off needs neither and cut the
p99 wait of 32 contending tasks several-fold compared with plain jittered polling.

Auto-renew (``auto_renew=True``). A watchdog task re-extends the lease to ``ttl`` when
a third of it has elapsed. If the lease cannot be confirmed - the token is gone
(expired or taken), Redis keeps failing, or the call hangs - by the time only a third
of it is left, the lock is declared lost: the task that acquired it is cancelled,
and ``async with`` turns that cancellation into :class:`LockLost`. The holder is
therefore told at most one renew interval after the first renewal that fails, and
while ``ttl/3`` of its lease still remains, so it can stop before anyone else can
get in. With bare ``acquire()`` / ``release()`` the owner just sees the cancellation
(its message names the lock) and :attr:`Lock.lost` says why. Without auto-renew, a
block that outlives ``ttl`` gets :class:`LockLost` from ``async with`` when it ends
(the token-checked release finds the key gone).

Cancellation policy. A task cancelled while acquiring or releasing sends a
token-checked release before its ``CancelledError`` propagates:

* cancelled inside an acquire attempt: the ``SET`` may have run even though its reply
  was lost, so a release with that acquisition's token follows. It can only delete
  our own key. Redis has normally received the ``SET`` already (the cancel arrives
  while we await its reply), so the release lands after it; if it ever overtook
  it, the stray key still expires with its ``PX`` TTL. A lock is never left without
  a TTL, because ``SET NX PX`` is atomic.
* cancelled inside a release: the release is sent again (harmless if the first one
  ran, because of the token check, and safe in either order).

That cleanup runs in a task of its own, so a second cancellation cannot interrupt it,
and it gives up once the lease would have ended anyway; the cancelled caller waits
for it (one round trip) unless cancelled again. The fast path creates no extra tasks.
This is the failure redis-py PR #3900 fixed in its own lock, where a cancelled
release left the key held and unreleasable. Caveat: on Python 3.11, redis-py (8.x)
wraps socket writes in ``asyncio.wait_for``, which can swallow a cancellation that
arrives just as a write completes; the acquire then simply carries on (and its lock
is released normally later). Python 3.12+ does not have this problem.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import math
import random
import secrets
from collections import deque
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, Final, Literal

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from .errors import LockError, LockLost, LockNotAcquired, LockNotOwned

__all__ = ["DEFAULT_RETRY_BASE", "DEFAULT_RETRY_CAP", "DEFAULT_TTL", "Client", "Lock"]

Client = Redis | RedisCluster
"""A single-node client or a Redis Cluster client (keys routed by their hash slot)."""

DEFAULT_TTL: Final = 10.0
"""Default lease in seconds."""

DEFAULT_RETRY_BASE: Final = 0.001
"""First backoff ceiling in seconds: the first retry comes within 1 ms."""

DEFAULT_RETRY_CAP: Final = 0.016
"""Largest backoff ceiling in seconds.

Only one task per process polls a contended key (module docstring), so a short cap
is cheap: about 125 attempts/s per process and key on average. It bounds how long a
lock freed by another process can sit idle before this process notices.
"""


class _Script:
    """A Lua script executed with ``EVALSHA``; reloaded once on ``NOSCRIPT``.

    The SHA is computed locally, so nothing is loaded until first use, and a server
    that lost its script cache (restart, ``SCRIPT FLUSH``, failover) is handled
    transparently. Unlike redis-py's ``Script`` it is not bound to a client, so one
    module-level instance serves every connection.
    """

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, redis: Client, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


# KEYS: lock, fence; ARGV: token, ttl ms. Returns the new fence (>= 1), or 0 if held.
_ACQUIRE: Final = _Script(
    "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then "
    "return redis.call('INCR', KEYS[2]) end return 0"
)
# KEYS: lock; ARGV: token. Returns 1 if our lock was deleted, else 0.
_RELEASE: Final = _Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
# KEYS: lock; ARGV: token, ttl ms. Returns 1 if our lease was reset to ttl, else 0.
_EXTEND: Final = _Script(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then "
    "return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
)

_MIN_ATTEMPT = 0.25  # seconds one acquire attempt may take even when the wait is shorter

# Strong references to cleanup / watchdog tasks (the loop keeps only weak ones).
_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_reap)
    return task


def _reap(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled():
        task.exception()  # failures of best-effort work are expected; mark them retrieved


class _Waiter:
    """A task of this process waiting for a key, parked between attempts."""

    __slots__ = ("future", "timer", "woken")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.woken = False  # a local release happened since the last attempt

    async def park(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        """Sleep up to ``delay``; return at once if woken since the last attempt."""
        if not self.woken:
            future = self.future = loop.create_future()
            timer = self.timer = loop.call_later(delay, _resolve, future)
            try:
                await future
            finally:
                timer.cancel()
                self.future = self.timer = None
        self.woken = False

    def wake(self) -> None:
        self.woken = True
        if self.future is not None and not self.future.done():
            self.future.set_result(None)

    def hurry(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        """Cut the current park short to at most ``delay`` from now."""
        future, timer = self.future, self.timer
        if future is not None and timer is not None and timer.when() > loop.time() + delay:
            timer.cancel()
            self.timer = loop.call_later(delay, _resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# Waiters of this process per (event loop, connection pool, key), oldest first. Only
# the oldest polls Redis; the others wait for a local release to hand the lock on.
_QueueKey = tuple[asyncio.AbstractEventLoop, int, str]
_queues: dict[_QueueKey, deque[_Waiter]] = {}


def _wake_head(qkey: _QueueKey) -> None:
    queue = _queues.get(qkey)
    if queue:
        queue[0].wake()


def _leave(qkey: _QueueKey, waiter: _Waiter, *, acquired: bool, retry_cap: float) -> None:
    queue = _queues[qkey]
    was_head = queue[0] is waiter
    queue.remove(waiter)
    if not queue:
        del _queues[qkey]
    elif acquired:
        pass  # our release will wake the next waiter
    elif waiter.woken:
        queue[0].wake()  # pass on a hand-off we will not use
    elif was_head:
        # The next waiter takes over polling (it may be parked for a whole lease).
        queue[0].hurry(asyncio.get_running_loop(), random.uniform(0.0, retry_cap))


class _Default(enum.Enum):
    TOKEN = 0


_DEFAULT: Final = _Default.TOKEN


def _seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    return float(value)


def _ttl_ms(ttl: float) -> int:
    ttl = _seconds("ttl", ttl)
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a finite number of seconds > 0, got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def _timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    timeout = _seconds("timeout", timeout)
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds or None (wait forever), got {timeout!r}")
    return timeout


class Lock:
    """A distributed mutex on one Redis key, held by one asyncio task at a time.

    ``Lock(redis, "app:lock:{42}", fence_key="app:fence:{42}", ttl=10.0, timeout=2.0)``
    then either
    ``async with lock: ...`` or ``fence = await lock.acquire()`` ... ``await
    lock.release()``. One object holds at most one lease at a time and can be reused
    after releasing it; give each concurrent task its own object (they are cheap:
    no I/O and no tasks until ``acquire``).

    Args:
        redis: the client; ``decode_responses`` may be on or off.
        key: the lock key.
        fence_key: the key of the lock's fence counter. The caller names it, as it
            names ``key``: a name derived here (say ``key + ":fence"``) could be the
            lock key of another caller-built name. In Redis Cluster give both keys the
            same hash tag, so the acquire script touches one slot.
        ttl: lease length in seconds. The key expires on its own if the holder dies.
        timeout: default for :meth:`acquire`: seconds to keep trying, ``0`` for a
            single attempt, ``None`` to wait forever.
        auto_renew: keep extending the lease while held (see the module docstring).
        retry_base, retry_cap: backoff parameters in seconds (module docstring).
    """

    __slots__ = (
        "_acquiring",
        "_auto_renew",
        "_cancel_sent",
        "_exiting",
        "_fence",
        "_fence_key",
        "_key",
        "_lease_deadline",
        "_lost",
        "_owner",
        "_owner_cancels",
        "_redis",
        "_retry_base",
        "_retry_cap",
        "_timeout",
        "_token",
        "_ttl_ms",
        "_watchdog",
    )

    def __init__(
        self,
        redis: Client,
        key: str,
        ttl: float = DEFAULT_TTL,
        *,
        timeout: float | None = None,
        auto_renew: bool = False,
        retry_base: float = DEFAULT_RETRY_BASE,
        retry_cap: float = DEFAULT_RETRY_CAP,
        fence_key: str,
    ) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        if not isinstance(fence_key, str) or not fence_key or fence_key == key:
            raise ValueError(
                f"fence_key must be a non-empty string other than key, got {fence_key!r}"
            )
        retry_base = _seconds("retry_base", retry_base)
        retry_cap = _seconds("retry_cap", retry_cap)
        if not 0 < retry_base <= retry_cap < math.inf:
            raise ValueError(
                f"need 0 < retry_base <= retry_cap < inf, got {retry_base!r}, {retry_cap!r}"
            )
        self._redis = redis
        self._key = key
        self._fence_key = fence_key
        self._ttl_ms = _ttl_ms(ttl)
        self._timeout = _timeout(timeout)
        self._auto_renew = auto_renew
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._token: str | None = None
        self._fence: int | None = None
        self._acquiring = False
        self._lease_deadline = 0.0  # loop time the lease lasts until (measured from the send)
        self._lost: LockLost | None = None
        self._owner: asyncio.Task[Any] | None = None
        self._owner_cancels = 0  # owner.cancelling() when acquired
        self._cancel_sent = False  # the watchdog cancelled the owner
        self._exiting = False  # the owner is releasing; the watchdog must not cancel it
        self._watchdog: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        state = "held" if self._token is not None else "free"
        return f"<Lock {self._key!r} ttl={self.ttl}s {state} fence={self._fence}>"

    @property
    def key(self) -> str:
        return self._key

    @property
    def ttl(self) -> float:
        """Lease length in seconds."""
        return self._ttl_ms / 1000

    @property
    def fence(self) -> int | None:
        """Fencing number of the current (or last) acquisition; ``None`` before the first."""
        return self._fence

    @property
    def token(self) -> str | None:
        """Random token stored in the lock key while this object holds it."""
        return self._token

    @property
    def held(self) -> bool:
        """Whether this object believes it holds the lock (not a Redis round trip)."""
        return self._token is not None and self._lost is None

    @property
    def lost(self) -> LockLost | None:
        """Why the watchdog gave the lock up, if it did."""
        return self._lost

    async def acquire(self, *, timeout: float | Literal[_Default.TOKEN] | None = _DEFAULT) -> int:
        """Take the lock and return its fencing number.

        ``timeout`` overrides the constructor's value for this call. Raises
        :class:`LockNotAcquired` when it elapses and :class:`LockError` if this object
        already holds (or is acquiring) the lock. The calling task becomes the owner:
        it is the one cancelled if auto-renew loses the lease.
        """
        wait = self._timeout if timeout is _DEFAULT else _timeout(timeout)
        if self._token is not None or self._acquiring:
            raise LockError(f"this Lock object already holds or is acquiring {self._key!r}")
        owner = asyncio.current_task()
        if owner is None:
            raise RuntimeError("Lock.acquire() must run inside an asyncio task")
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        token = secrets.token_hex(16)
        keys = (self._key, self._fence_key)
        args = (token, self._ttl_ms)
        qkey = self._queue_key(loop)
        waiter: _Waiter | None = None
        ceiling = self._retry_base
        fence = 0
        self._acquiring = True
        try:
            if qkey in _queues and wait != 0:
                # Others in this process already wait for this key: line up behind them
                # instead of barging in with an immediate attempt.
                waiter = self._enqueue(qkey)
                fallback = self.ttl * random.uniform(0.5, 1.0)
                await waiter.park(loop, self._until(fallback, loop, deadline))
            while True:
                sent_at = loop.time()
                try:
                    # Bounded by the wait (but always a round trip's worth, so that
                    # timeout=0 still makes its one attempt): a silent Redis must not
                    # hold the caller for the client's socket timeout.
                    bound = None if deadline is None else max(deadline, sent_at + _MIN_ATTEMPT)
                    async with asyncio.timeout_at(bound):
                        fence = int(await _ACQUIRE(self._redis, keys, args))
                except TimeoutError:
                    # The SET may still land: undo it in the background (the lease
                    # bounds that work) and answer the caller now.
                    _spawn(self._release_until(token, sent_at + self.ttl))
                    raise LockNotAcquired(
                        f"could not acquire {self._key!r} within {wait}s"
                    ) from None
                except BaseException:
                    # The SET may have run with its reply lost (cancelled, connection
                    # dropped): undo it with our token before propagating.
                    await self._cleanup(token, sent_at + self.ttl)
                    raise
                if fence:
                    break
                if deadline is not None and loop.time() >= deadline:
                    raise LockNotAcquired(f"could not acquire {self._key!r} within {wait}s")
                if waiter is None:
                    waiter = self._enqueue(qkey)
                if _queues[qkey][0] is waiter:  # the oldest waiter polls, with backoff
                    delay = random.uniform(0.0, ceiling)
                    ceiling = min(ceiling * 2, self._retry_cap)
                else:  # the others wait for a hand-off, falling back after ~a lease
                    delay = self.ttl * random.uniform(0.5, 1.0)
                await waiter.park(loop, self._until(delay, loop, deadline))
        finally:
            self._acquiring = False
            if waiter is not None:
                _leave(qkey, waiter, acquired=fence > 0, retry_cap=self._retry_cap)
        self._token = token
        self._fence = fence
        self._lease_deadline = sent_at + self.ttl
        self._lost = None
        self._owner = owner
        self._owner_cancels = owner.cancelling()
        self._cancel_sent = False
        self._exiting = False
        if self._auto_renew:
            self._watchdog = _spawn(self._renew_forever())
        return fence

    async def release(self) -> None:
        """Release the lock if this object still holds it.

        Raises :class:`LockNotOwned` if it was never acquired or the lease had already
        ended (nothing is deleted then). On a Redis error the token is kept so the call
        can be retried; the key expires after its TTL regardless. If the caller is
        cancelled meanwhile, the release is re-sent before ``CancelledError`` propagates.
        """
        token = self._token
        if token is None:
            raise LockNotOwned(f"{self._key!r} is not held by this Lock object")
        self._stop_watchdog()
        try:
            released = await self._release(token)
        except asyncio.CancelledError:
            self._token = None
            await self._cleanup(token, self._lease_deadline)
            raise
        self._token = None
        if not released:
            raise LockNotOwned(f"{self._key!r} expired or was taken over before release")

    async def extend(self, ttl: float | None = None) -> None:
        """Reset the remaining lease to ``ttl`` seconds (default: the lock's ttl).

        Raises :class:`LockNotOwned` if the lease already ended or belongs to someone else.
        """
        token = self._token
        if token is None:
            raise LockNotOwned(f"{self._key!r} is not held by this Lock object")
        ttl_ms = self._ttl_ms if ttl is None else _ttl_ms(ttl)
        sent_at = asyncio.get_running_loop().time()
        if not await _EXTEND(self._redis, (self._key,), (token, ttl_ms)):
            raise LockNotOwned(f"{self._key!r} expired or was taken over; cannot extend")
        self._lease_deadline = sent_at + ttl_ms / 1000

    async def __aenter__(self) -> Lock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release; report a lost lease as :class:`LockLost` without hiding the body's error.

        * The watchdog's own cancellation of the body becomes ``LockLost``.
        * If the body raised anything else (including an outside cancellation), that
          exception propagates unchanged, with a note saying the lock was lost.
        * Otherwise a lost lease raises ``LockLost``, a failed release its Redis error.
        """
        self._stop_watchdog()
        ours = False  # is exc the cancellation the watchdog sent?
        owner = self._owner
        if self._cancel_sent and owner is not None and owner is asyncio.current_task():
            self._cancel_sent = False
            cancelled = exc_type is not None and issubclass(exc_type, asyncio.CancelledError)
            ours = owner.uncancel() <= self._owner_cancels and cancelled
        lost = self._lost
        failure: BaseException | None = None
        token = self._token
        if token is not None and lost is not None:
            # Maybe still ours (Redis unreachable): free it in the background, best
            # effort, rather than delay the LockLost until the lease has run out.
            self._token = None
            _spawn(self._release_until(token, self._lease_deadline))
        elif token is not None:
            try:
                await self.release()
            except LockNotOwned as err:
                lost = LockLost(f"{self._key!r} expired or was taken over while held")
                lost.__cause__ = err
            except Exception as err:
                self._token = None  # the block is over; the key expires after its TTL
                failure = err
        if lost is not None and (ours or exc is None):
            raise lost
        if exc is not None:
            if lost is not None or failure is not None:
                exc.add_note(f"while holding lock {self._key!r}: {lost or failure!r}")
            return
        if failure is not None:
            raise failure

    def _queue_key(self, loop: asyncio.AbstractEventLoop) -> _QueueKey:
        redis = self._redis
        return (loop, id(redis.connection_pool if isinstance(redis, Redis) else redis), self._key)

    @staticmethod
    def _enqueue(qkey: _QueueKey) -> _Waiter:
        waiter = _Waiter()
        _queues.setdefault(qkey, deque()).append(waiter)
        return waiter

    @staticmethod
    def _until(delay: float, loop: asyncio.AbstractEventLoop, deadline: float | None) -> float:
        return delay if deadline is None else max(0.0, min(delay, deadline - loop.time()))

    async def _release(self, token: str) -> bool:
        """Token-checked delete, then let this process's oldest waiter try at once.

        The waiter is woken even if the delete failed or its outcome is unknown: a
        needless attempt is cheap, a missed hand-off would cost it a whole lease.
        """
        try:
            return bool(await _RELEASE(self._redis, (self._key,), (token,)))
        finally:
            _wake_head(self._queue_key(asyncio.get_running_loop()))

    async def _cleanup(self, token: str, until: float) -> None:
        """Release in a task of its own (uninterruptible by the caller), until ``until``."""
        await asyncio.wait((_spawn(self._release_until(token, until)),))

    async def _release_until(self, token: str, until: float) -> None:
        async with asyncio.timeout_at(until):
            await self._release(token)

    def _stop_watchdog(self) -> None:
        self._exiting = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def _renew_forever(self) -> None:
        """Extend at ttl/3 elapsed; declare the lock lost if not confirmed by 2*ttl/3."""
        loop = asyncio.get_running_loop()
        third = self._ttl_ms / 3000
        while True:
            await asyncio.sleep(max(0.0, self._lease_deadline - 2 * third - loop.time()))
            give_up_at = self._lease_deadline - third
            ceiling = self._retry_base
            while True:
                try:
                    async with asyncio.timeout_at(give_up_at):
                        await self.extend()
                    break
                except LockNotOwned as err:
                    self._on_lost("expired or was taken over", err)
                    return
                except Exception as err:
                    now = loop.time()
                    if now >= give_up_at or not isinstance(err, RedisError | OSError):
                        self._on_lost("could not be renewed", err)
                        return
                    await asyncio.sleep(min(random.uniform(0.0, ceiling), give_up_at - now))
                    ceiling = min(ceiling * 2, third / 4)

    def _on_lost(self, why: str, cause: BaseException) -> None:
        lost = LockLost(f"{self._key!r} {why} while held: {cause!r}")
        lost.__cause__ = cause
        self._lost = lost
        owner = self._owner
        if not self._exiting and owner is not None:
            self._cancel_sent = owner.cancel(f"lock {self._key!r} lost")
