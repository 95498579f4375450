"""Background tasks: supervision, and stopping them for good.

Supervision: every long-running loop of a server process (the relay, the pub/sub
subscriber, the Redis Cluster slot-map refresh, the hub's resync and reaper loops, the
expiry sweeper, the idempotency purge, the webhook dispatcher) runs under
:func:`supervise`. Each loop already catches its own errors and carries on;
the supervisor is the second line: if a loop ends anyway (a bug, an error escaping a
``finally``), it is logged, counted (:func:`set_restart_hook`, exported as the
``inventory_task_restarts_total`` metric by the app) and started again after a short,
growing pause, so one unexpected exception never silences a process for good.

Stopping: ``task.cancel(); await task`` can hang on Python 3.11: ``asyncio.wait_for``
(which redis-py uses around socket reads, writes and connects) swallows a cancellation
that arrives just as the awaited call completes (fixed in 3.12), so the task carries on,
for example into a reconnect loop, and the awaiting shutdown waits forever. Seen as a
server that sometimes never finished stopping right after it started.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

__all__ = ["cancel_and_wait", "restarts", "set_restart_hook", "spawn", "supervise"]

log = logging.getLogger("realtime")

restarts: Counter[str] = Counter()
"""Restarts per task name in this process (also reported to the restart hook)."""

_hook: Callable[[str], None] | None = None


def set_restart_hook(hook: Callable[[str], None] | None) -> None:
    """Call ``hook(task_name)`` on every restart (the app counts them in Prometheus)."""
    global _hook
    _hook = hook


async def supervise(
    name: str,
    run: Callable[[], Awaitable[None]],
    *,
    until: asyncio.Event | None = None,
    min_delay: float = 0.05,
    max_delay: float = 2.0,
    healthy_after: float = 30.0,
) -> None:
    """Run ``run()`` until cancelled (or until it returns with ``until`` set), restarting
    it whenever it returns or raises. The pause before a restart doubles from
    ``min_delay`` up to ``max_delay`` and starts over once a run lasted ``healthy_after``
    seconds."""
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        started = loop.time()
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed; restarting it", name)
        else:
            if until is not None and until.is_set():
                return
            log.error("background task %s ended unexpectedly; restarting it", name)
        if loop.time() - started >= healthy_after:
            failures = 0
        restarts[name] += 1
        if _hook is not None:
            try:
                _hook(name)
            except Exception:
                log.exception("restart hook failed")
        await asyncio.sleep(min(max_delay, min_delay * 2**failures))
        failures += 1


def spawn(
    name: str, run: Callable[[], Awaitable[None]], *, until: asyncio.Event | None = None
) -> asyncio.Task[None]:
    """A task running ``run`` under :func:`supervise`."""
    return asyncio.create_task(supervise(name, run, until=until), name=name)


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
