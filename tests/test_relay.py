"""The relay cannot die: lease release after a lost session, failing cleanup, /ready."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from inventory.config import Settings
from inventory.ops.app import create_app
from inventory.store.feed import PgOutbox, PgOutboxLease
from realtime.ports import StockChange
from realtime.relay import FOLLOW_ATTEMPTS, Relay, relay_keys

from .conftest import wait_until
from .test_realtime_e2e import channel_messages, unique, write_change

pytestmark = pytest.mark.asyncio

KILL_OTHERS = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


async def test_lease_release_after_the_session_was_killed_does_not_raise(
    scratch_database: str,
) -> None:
    pool = await asyncpg.create_pool(scratch_database, min_size=1, max_size=2)
    admin = await asyncpg.connect(scratch_database)
    try:
        outbox = PgOutbox(pool)
        lease = await outbox.acquire("killed")
        assert lease is not None
        assert await admin.fetchval(KILL_OTHERS) >= 1
        with pytest.raises(
            (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
        ):
            await lease.fetch(10)
        await lease.release()
        await lease.release()  # twice, as a relay stopping after a failed release would
        again = await outbox.acquire("killed")  # the lock went with the session
        assert again is not None
        await again.release()
    finally:
        await admin.close()
        await pool.close()


class _BrokenCleanup(PgOutbox):
    """Real leases whose release raises after releasing (a cleanup bug)."""

    acquired = 0

    async def acquire(self, name: str) -> PgOutboxLease | None:
        lease = await super().acquire(name)
        if lease is None:
            return None
        self.acquired += 1
        real_release = lease.release

        async def release() -> None:
            await real_release()
            raise asyncpg.InterfaceError("connection has been released back to the pool")

        lease.release = release  # type: ignore[method-assign]
        return lease


async def test_relay_keeps_campaigning_when_its_cleanup_fails_after_session_kills(
    scratch_database: str, redis_url: str
) -> None:
    """Kill the leader's session repeatedly while its lease release raises: the relay
    campaigns again every time and publishes each change. (asyncpg hands a connection
    the server closed back to its pool by itself, so the lease's own cleanup meets a
    released connection: the original way the relay died.)"""
    namespace, product = unique("rt-chaos"), unique("rt-sku")
    pool = await asyncpg.create_pool(scratch_database, min_size=1, max_size=3)
    redis = aioredis.Redis.from_url(redis_url)
    admin = await asyncpg.connect(scratch_database)
    writer = await asyncpg.connect(scratch_database)
    outbox = _BrokenCleanup(pool)
    relay = Relay(outbox, redis, prefix=namespace, campaign_interval=0.1)
    try:
        async with channel_messages(redis_url, namespace, product) as published:
            await relay.start()
            for n in range(1, 6):
                await wait_until(lambda: relay.leader, 5, "the relay to lead")
                assert await admin.fetchval(KILL_OTHERS) >= 1
                await wait_until(lambda n=n: outbox.acquired > n, 5, "a new campaign")
                writer = await asyncpg.connect(scratch_database)
                await write_change(writer, product, "w1")
                await writer.close()
                await wait_until(
                    lambda n=n: any(m["version"] == n for m in published), 3, f"change {n} sent"
                )
            versions = [m["version"] for m in published]
            # At least once, in order: a session killed between a publish and its cursor
            # save republishes that batch (the hubs drop the duplicate by version).
            assert sorted(versions) == versions
            assert sorted(set(versions)) == [1, 2, 3, 4, 5]
    finally:
        await relay.stop()
        await admin.close()
        await redis.aclose()
        await pool.close()


async def test_ready_reports_a_deployment_without_a_relay_leader(
    scratch_database: str, redis_url: str
) -> None:
    """/ready is 503 with the ``relay`` check false while no process refreshes the
    relay heartbeat, and 200 again once one leads."""
    prefix = unique("rt-ready")
    app = create_app(Settings(database_url=scratch_database, redis_url=redis_url,
                              redis_prefix=prefix))  # fmt: skip
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:

                async def status() -> tuple[int, Any]:
                    answer = await http.get("/ready")
                    return answer.status_code, answer.json()["checks"]

                await wait_until(lambda: _is(status(), 200), 5, "ready while this process leads")
                relay = app.state.runtime.relay
                await relay.stop()
                await redis.delete(relay_keys(prefix)[1])  # as after its TTL ran out
                code, checks = await status()
                assert code == 503
                assert checks == {"postgres": True, "redis": True, "relay": False}
                await relay.start()
                await wait_until(lambda: _is(status(), 200), 5, "ready again")
    finally:
        await redis.aclose()


async def _is(answer: Any, code: int) -> bool:
    return bool((await answer)[0] == code)


async def test_relay_follows_a_new_redis_id(scratch_database: str, redis_url: str) -> None:
    """Redis came back with another id (e.g. a restart without persistence, where another
    process asked first): the leader steps down and leads again under the new name, on a
    cursor of its own."""
    namespace, product = unique("rt-id"), unique("rt-sku")
    pool = await asyncpg.create_pool(scratch_database, min_size=1, max_size=2)
    redis = aioredis.Redis.from_url(redis_url)
    writer = await asyncpg.connect(scratch_database)
    relay = Relay(PgOutbox(pool), redis, prefix=namespace, campaign_interval=0.1)
    try:
        async with channel_messages(redis_url, namespace, product) as published:
            await relay.start()
            await wait_until(lambda: relay.leader, 5, "the relay to lead")
            first = relay.lease_name
            await redis.set(relay_keys(namespace)[0], "another")
            await wait_until(
                lambda: relay.lease_name == f"{namespace}:stock@another", 5, "a new name"
            )
            await wait_until(lambda: relay.leader, 5, "the relay to lead again")
            assert first != relay.lease_name
            await write_change(writer, product, "w1")
            await wait_until(lambda: len(published) == 1, 3, "the change published")
    finally:
        await relay.stop()
        await writer.close()
        await redis.aclose()
        await pool.close()


async def test_followers_get_every_batch_and_a_failing_one_never_stops_the_stream(
    scratch_database: str, redis_url: str
) -> None:
    """Each published batch goes to every follower; one that always fails is tried
    ``FOLLOW_ATTEMPTS`` times per batch, then skipped, while stock messages and the other
    follower go on."""
    namespace, product = unique("rt-follow"), unique("rt-sku")
    pool = await asyncpg.create_pool(scratch_database, min_size=1, max_size=2)
    redis = aioredis.Redis.from_url(redis_url)
    writer = await asyncpg.connect(scratch_database)
    seen: list[int] = []
    failed: list[int] = []

    async def follower(batch: Sequence[StockChange]) -> None:
        seen.extend(c.version for c in batch if c.product_id == product)

    async def broken(batch: Sequence[StockChange]) -> None:
        failed.extend(c.version for c in batch if c.product_id == product)
        raise RuntimeError("follower bug")

    relay = Relay(PgOutbox(pool), redis, prefix=namespace, campaign_interval=0.1,
                  followers=[broken, follower])  # fmt: skip
    try:
        async with channel_messages(redis_url, namespace, product) as published:
            await relay.start()
            await wait_until(lambda: relay.leader, 5, "the relay to lead")
            for _ in range(3):
                await write_change(writer, product, "w1")
            await wait_until(lambda: len(published) == 3, 5, "every change published")
            await wait_until(lambda: sorted(seen) == [1, 2, 3], 5, "the follower's batches")
        assert sorted(set(failed)) == [1, 2, 3]
        assert all(failed.count(v) == FOLLOW_ATTEMPTS for v in (1, 2, 3))
    finally:
        await relay.stop()
        await writer.close()
        await redis.aclose()
        await pool.close()
