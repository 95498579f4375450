"""Stopping background tasks for good.

``task.cancel(); await task`` can hang on Python 3.11: ``asyncio.wait_for`` (which
redis-py uses around socket reads, writes and connects) swallows a cancellation that
arrives just as the awaited call completes (fixed in 3.12), so the task carries on, for
example into a reconnect loop, and the awaiting shutdown waits forever. Seen as a
server that sometimes never finished stopping right after it started.
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["cancel_and_wait"]

log = logging.getLogger("realtime")


async def cancel_and_wait(*tasks: asyncio.Task[object], retry_every: float = 0.1) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again every
    ``retry_every`` seconds while one has not (a lost cancellation). An exception a task
    ended with is not raised (the caller is stopping it, or has read it already); it is
    logged at debug level."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_every)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s ended with %r", task.get_name(), task.exception())
