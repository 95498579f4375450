"""Stopping background tasks (realtime.tasks)."""

from __future__ import annotations

import asyncio

from realtime.tasks import cancel_and_wait


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
