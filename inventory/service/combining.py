"""Request combining: concurrent requests on one key are applied as one batch.

Used for the hot-SKU fast path. A hot row under many concurrent version-checked updates
wastes most attempts and convoys on its row lock; applying every request that arrived
while the previous write was in flight as *one* transaction turns N lock round trips into
one, so throughput grows with the arrival rate instead of collapsing.

Policy:

- The first request for an idle key starts a worker task for that key; the worker takes
  everything pending, runs one batch, resolves each request's future, and repeats until
  nothing is pending. There is no timer: a batch is whatever arrived during the previous
  one, so an uncontended request runs at once as a batch of one.
- Batches are bounded (``max_batch``); the rest waits for the next round.
- The worker belongs to no request: a client that goes away cannot cancel other
  requests' batch. A request cancelled (or past its ``pending_timeout``) while still
  pending is removed before its batch starts; one cancelled while its batch is in
  flight is applied (like a client that disconnects after its write committed) and its
  result is dropped.
- ``run_batch`` returns one result or exception per item, in order; if it raises, every
  item of that batch gets the exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["Combiner"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

BatchRunner = Callable[[K, Sequence[T]], Awaitable[Sequence[R | BaseException]]]


class Combiner(Generic[K, T, R]):
    def __init__(self, run_batch: BatchRunner[K, T, R], *, max_batch: int = 256) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._pending: dict[K, list[tuple[T, asyncio.Future[R]]]] = {}
        self._workers: dict[K, asyncio.Task[None]] = {}
        self.batches = 0
        self.items = 0

    async def submit(self, key: K, item: T, *, pending_timeout: float | None = None) -> R:
        """``item``'s result. With ``pending_timeout``, an item still waiting for its batch
        to start after that many seconds is withdrawn (:class:`TimeoutError`); once its
        batch has started it is awaited to the end (the batch's own bound applies), so a
        timeout never leaves a write the caller was told failed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        entry = (item, future)
        self._pending.setdefault(key, []).append(entry)
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._work(key), name=f"combiner:{key}")
        try:
            if pending_timeout is not None:
                await asyncio.wait({future}, timeout=pending_timeout)
                queue = self._pending.get(key)
                if not future.done() and queue is not None and entry in queue:
                    queue.remove(entry)
                    future.cancel()
                    raise TimeoutError
            return await future
        except asyncio.CancelledError:
            queue = self._pending.get(key)
            if queue is not None and entry in queue:
                queue.remove(entry)
            raise

    async def _work(self, key: K) -> None:
        try:
            while queue := self._pending.get(key):
                batch = queue[: self._max_batch]
                del queue[: self._max_batch]
                if not queue:
                    del self._pending[key]
                batch = [(item, fut) for item, fut in batch if not fut.cancelled()]
                if batch:
                    await self._run(key, batch)
        finally:
            self._workers.pop(key, None)

    async def _run(self, key: K, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self._run_batch(key, [item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        """Cancel the workers (at shutdown); pending requests get CancelledError."""
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for queue in self._pending.values():
            for _, future in queue:
                future.cancel()
        self._pending.clear()
