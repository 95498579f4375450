"""Supervising and stopping background tasks (realtime.tasks)."""

from __future__ import annotations

import asyncio

from realtime.tasks import cancel_and_wait, restarts, set_restart_hook, spawn, supervise


async def test_cancel_and_wait_outlasts_a_swallowed_cancellation() -> None:
    """Python 3.11's asyncio.wait_for can swallow a cancellation (redis-py uses it):
    stopping must still end the task instead of waiting for it forever."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            swallowed.set()  # as a lost cancellation: carry on
        await asyncio.sleep(30)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    async with asyncio.timeout(2):
        await cancel_and_wait(task, retry_every=0.05)
    assert swallowed.is_set()
    assert task.cancelled()


async def test_supervise_restarts_a_task_that_fails_or_ends_and_counts_it() -> None:
    runs: list[int] = []
    seen: list[str] = []
    settled = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("boom")  # an error escaping the loop
        if len(runs) == 2:
            return  # ended without being asked to
        settled.set()
        await asyncio.sleep(30)

    set_restart_hook(seen.append)
    try:
        before = restarts["flaky"]
        task = spawn("flaky", flaky)
        async with asyncio.timeout(2):
            await settled.wait()
        assert len(runs) == 3
        assert restarts["flaky"] - before == 2
        assert seen == ["flaky", "flaky"]
        await cancel_and_wait(task)
        assert task.cancelled()
    finally:
        set_restart_hook(None)


async def test_supervise_lets_a_task_end_when_asked_to() -> None:
    stop = asyncio.Event()
    stop.set()
    runs = 0

    async def once() -> None:
        nonlocal runs
        runs += 1

    async with asyncio.timeout(2):
        await supervise("once", once, until=stop)
    assert runs == 1
