"""Webhook delivery: one deliverer per endpoint across all server processes.

Policy:

* Ownership: every process runs a :class:`Dispatcher`. It keeps one dedicated
  PostgreSQL session (outside the pool) and, every ``scan_interval``, tries a
  session-level advisory lock per active webhook; the webhook is delivered by the
  process holding its lock, as the relay's lease. A process that dies (kill -9
  included) loses its session and with it its locks, so another process takes over
  within about a scan interval. A process whose lease session fails stops all its
  deliverers before campaigning again.
* Supervision: the dispatcher's loop survives its own errors and runs under
  :func:`realtime.tasks.supervise` (task ``webhook-dispatcher``), which restarts it,
  counted in ``inventory_task_restarts_total``, if it ends anyway; each run starts by
  dropping whatever a failed run left (its deliverers, its lease session). The
  deliverers are not supervised one by one: each ends on its own when its webhook is
  deleted or deactivated (a normal end that a supervisor would take for a failure), and
  the dispatcher's next scan starts a new one for any that ended while its webhook is
  still active (a deliverer's loop survives every error of its own, as the relay's).
* Source: each deliverer reads the ledger after its webhook's durable cursor (final
  rows only, in ``(xid, id)`` order as the relay), turns rows into events (see
  :mod:`.events`) and queues them, moving the cursor in the same transaction.
* Order and at least once: an event leaves the queue only after a 2xx (or after the
  retry window). Per webhook, an event is sent only when no earlier queued event
  shares a product with it, so the next event for a product waits for the previous
  one's acknowledgement while other products proceed. A crash between a 2xx and its
  bookkeeping re-sends that event after the takeover, with the same id: duplicates
  happen only where an attempt's outcome was lost.
* Retries: exponential backoff with full jitter, ``uniform(0, min(max, base * 2**(n-1)))``
  after the n-th failure (the first retry within ``base`` = 5 s, later ones at most
  ``max`` = 1 h apart); after ``window`` (24 h) from the first attempt the event is
  logged as failed and dropped. A 2xx acknowledges only within ``timeout`` (5 s).
* Isolation: each deliverer is its own task with its own HTTP connection pool, at most
  ``concurrency`` requests in flight and a hard per-attempt deadline, so a dead or slow
  endpoint holds only its own slots. Nothing of this runs on the write path; the
  deliverers only read committed ledger rows.
* Memory: at most ``window`` events per webhook are held (and queued); when an
  endpoint is down that long, the cursor stops moving and the backlog stays in the
  ledger, visible as queue lag.
* Safety: each attempt resolves and checks the target again (:mod:`.targets`) and
  connects to the checked address; redirects are not followed (a 3xx is a failure).
  Logs and metrics name the webhook id only: never its URL or secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from realtime.tasks import cancel_and_wait, spawn

from ... import metrics
from ...config import Settings
from ...store.pg import Store
from ...store.webhooks import QueuedEvent, WebhookStore
from .events import ProduceContext, produce
from .signing import signature_header
from .targets import TargetRefused, parse_url, resolve

__all__ = ["Deliverer", "DeliveryPolicy", "Dispatcher", "policy_from"]

log = logging.getLogger("inventory.webhooks")

_LOCK_CLASS = 0x3EB0  # advisory lock namespace of webhook deliverers; key hashtext(id)
_TIMEOUT = 5.0
_USER_AGENT = "inventory-webhooks/1"
_LOG_RETENTION_DAYS = 7


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """Timing and bounds of deliveries (see the module docstring)."""

    timeout: float = 5.0
    retry_base: float = 5.0
    retry_max: float = 3600.0
    retry_window: float = 86400.0
    concurrency: int = 8
    window: int = 1000
    batch: int = 500
    poll_interval: float = 0.25
    allow_private: bool = False

    def retry_delay(self, failures: int, rng: random.Random) -> float:
        """Seconds before the next attempt after ``failures`` failed ones (full jitter)."""
        return rng.uniform(0, min(self.retry_max, self.retry_base * 2 ** min(failures - 1, 40)))


def _now() -> datetime:
    return datetime.now(UTC)


class Deliverer:
    """Delivers one webhook's events while its process holds the webhook's lease."""

    def __init__(
        self,
        webhook_id: str,
        store: WebhookStore,
        inventory: Store,
        policy: DeliveryPolicy,
    ) -> None:
        self.webhook_id = webhook_id
        self._store = store
        self._inventory = inventory
        self._policy = policy
        self._rng = random.Random()
        self._pending: dict[int, QueuedEvent] = {}
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._config: dict[str, Any] = {}
        self._config_read = 0.0
        self._client: httpx.AsyncClient | None = None

    async def run(self) -> None:
        """Deliver until the webhook is gone or inactive; survives every other error."""
        failures = 0
        self._client = httpx.AsyncClient(
            timeout=self._policy.timeout,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(
                max_connections=self._policy.concurrency,
                max_keepalive_connections=self._policy.concurrency,
            ),
        )
        try:
            while True:
                try:
                    if not await self._step():
                        return
                    failures = 0
                except Exception as exc:
                    failures += 1
                    log.warning(
                        "webhook %s: delivery loop failed (%s); retrying",
                        self.webhook_id, type(exc).__name__,
                    )  # fmt: skip
                    await asyncio.sleep(min(5.0, 0.1 * 2**failures))
        finally:
            await cancel_and_wait(*self._in_flight.values())
            metrics.WEBHOOK_QUEUE.labels(self.webhook_id).set(0)
            metrics.WEBHOOK_LAG.labels(self.webhook_id).set(0)
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def _step(self) -> bool:
        """One round: refresh the configuration, queue new events, send what may go,
        wait. False when the webhook is gone or inactive."""
        if time.monotonic() - self._config_read > 1.0:
            config = await self._store.config(self.webhook_id)
            if config is None or not config["active"]:
                return False
            if not self._config:
                waiting = await self._store.pending(self.webhook_id, self._policy.window)
                self._pending = {e.seq: e for e in waiting}
            self._config = config
            self._config_read = time.monotonic()
        queued_more = False
        if len(self._pending) < self._policy.window:
            queued = await self._queue_new()
            if queued is None:
                return False
            queued_more = queued >= self._policy.batch
        due = self._schedule()
        self._export_lag()
        if not queued_more:
            await self._wait(due)
        return True

    async def _queue_new(self) -> int | None:
        """Turn new ledger rows into queued events; the number of rows read (None when
        the webhook is gone)."""
        limit = max(1, min(self._policy.batch, self._policy.window - len(self._pending)))
        async with self._store.pool.acquire(timeout=_TIMEOUT) as conn:
            cursor = await self._store.cursor(conn, self.webhook_id)
            if cursor is None:
                return None
            rows = await self._store.ledger_rows(conn, cursor, limit)
            if not rows:
                return 0  # the common idle poll: two reads, no transaction
            async with conn.transaction():
                if await self._store.cursor(conn, self.webhook_id, lock=True) != cursor:
                    return 0  # moved meanwhile (a reactivation): read again
                events = await produce(
                    ProduceContext(conn, self._inventory), rows, self._config["events"]
                )
                seqs = await self._store.enqueue(conn, self.webhook_id, events, rows[-1].position)
        now = _now()
        for event in events:
            seq = seqs.get(event.event_id)
            if seq is not None:
                self._pending[seq] = QueuedEvent(
                    seq, event.event_id, event.type, event.products, event.body,
                    event.created_at, 0, None, now,
                )  # fmt: skip
        return len(rows)

    def _schedule(self) -> datetime | None:
        """Start the due events whose products have no earlier queued event (queue
        order, up to the in-flight limit); the time the next waiting one falls due."""
        now = _now()
        blocked: set[str] = set()
        ready: list[QueuedEvent] = []
        later: datetime | None = None
        for event in self._pending.values():
            if event.seq not in self._in_flight and blocked.isdisjoint(event.products):
                if event.next_attempt_at <= now:
                    ready.append(event)
                elif later is None or event.next_attempt_at < later:
                    later = event.next_attempt_at
            blocked.update(event.products)
        room = self._policy.concurrency - len(self._in_flight)
        for event in ready[: max(room, 0)]:
            task = asyncio.create_task(self._attempt(event), name=f"webhook-{self.webhook_id}")
            self._in_flight[event.seq] = task
            task.add_done_callback(self._landed)
        return later

    def _landed(self, task: asyncio.Task[None]) -> None:
        for seq, running in list(self._in_flight.items()):
            if running is task:
                del self._in_flight[seq]

    async def _wait(self, due: datetime | None) -> None:
        """Until an attempt ends, the next retry is due or the next poll of the ledger
        (whichever is first)."""
        timeout = self._policy.poll_interval
        if len(self._pending) >= self._policy.window:
            timeout = 1.0  # nothing to read: only retries and the config refresh
        if due is not None:
            timeout = min(timeout, max(0.0, (due - _now()).total_seconds()))
        if self._in_flight:
            await asyncio.wait(
                list(self._in_flight.values()),
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        else:
            await asyncio.sleep(timeout)

    def _export_lag(self) -> None:
        metrics.WEBHOOK_QUEUE.labels(self.webhook_id).set(len(self._pending))
        oldest = next(iter(self._pending.values()), None)
        lag = 0.0 if oldest is None else (_now() - oldest.created_at).total_seconds()
        metrics.WEBHOOK_LAG.labels(self.webhook_id).set(max(0.0, lag))

    async def _post(self, body: bytes, event_id: str) -> int:
        """One POST of ``body`` to the checked target; the status code."""
        assert self._client is not None
        url = parse_url(self._config["url"])
        target = await resolve(url, self._policy.allow_private)
        request_url = httpx.URL(self._config["url"]).copy_with(host=target.address)
        headers = {
            "Host": url.netloc.rpartition("@")[2],
            "Content-Type": "application/json",
            "User-Agent": _USER_AGENT,
            "Inventory-Event-Id": event_id,
            "Inventory-Signature": signature_header(self._config["secret"], body),
        }
        extensions = {"sni_hostname": url.hostname} if url.scheme == "https" else {}
        async with asyncio.timeout(self._policy.timeout):
            request = self._client.build_request(
                "POST", request_url, content=body, headers=headers, extensions=extensions
            )
            response = await self._client.send(request, stream=True)
            await response.aclose()  # the answer's body is not read: only its status counts
        return response.status_code

    async def _attempt(self, event: QueuedEvent) -> None:
        attempt = event.attempts + 1
        status: int | None = None
        error: str | None = None
        try:
            status = await self._post(event.body, str(event.event_id))
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except TargetRefused as exc:
            error = f"refused: {exc}"
        except TimeoutError:
            error = f"no answer within {self._policy.timeout:g} s"
        except httpx.TimeoutException:
            error = f"no answer within {self._policy.timeout:g} s"
        except httpx.HTTPError as exc:
            error = f"connection failed: {type(exc).__name__}"
        except Exception as exc:  # a bad URL stored before a rule changed, and the like
            error = f"delivery failed: {type(exc).__name__}"
        outcome = "success" if error is None else ("http_error" if status else "error")
        metrics.WEBHOOK_ATTEMPTS.labels(self.webhook_id, outcome).inc()
        try:
            if error is None:
                assert status is not None
                await self._store.acknowledge(self.webhook_id, event, attempt, status)
                self._pending.pop(event.seq, None)
                return
            now = _now()
            first = event.first_attempt_at or now
            next_at = now + timedelta(seconds=self._policy.retry_delay(attempt, self._rng))
            give_up = (next_at - first).total_seconds() > self._policy.retry_window
            event.attempts, event.first_attempt_at, event.next_attempt_at = attempt, first, next_at
            await self._store.failed_attempt(self.webhook_id, event, status, error, give_up)
            if give_up:
                metrics.WEBHOOK_FAILURES.labels(self.webhook_id).inc()
                log.warning(
                    "webhook %s: event %s failed after %d attempts",
                    self.webhook_id, event.event_id, attempt,
                )  # fmt: skip
                self._pending.pop(event.seq, None)
        except Exception as exc:
            # The outcome could not be recorded: try again a little later (a 2xx that
            # was not recorded is sent again; the receiver dedupes by event id).
            event.next_attempt_at = _now() + timedelta(seconds=1)
            log.warning(
                "webhook %s: cannot record a delivery attempt (%s)",
                self.webhook_id, type(exc).__name__,
            )  # fmt: skip


class Dispatcher:
    """Per process: campaigns for webhook leases and runs a deliverer for each one held."""

    def __init__(
        self,
        database_url: str,
        store: WebhookStore,
        inventory: Store,
        policy: DeliveryPolicy,
        scan_interval: float = 1.0,
    ) -> None:
        self._database_url = database_url
        self._store = store
        self._inventory = inventory
        self._policy = policy
        self._scan_interval = scan_interval
        self._owned: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: asyncpg.Connection | None = None
        self._purged = 0.0

    def start(self) -> None:
        self._task = spawn("webhook-dispatcher", self._run)

    async def stop(self) -> None:
        """Stop campaigning, then the deliverers, then drop the leases (in that order,
        outside the cancelled task, so no deliverer outlives the server)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._release_all()

    async def _release_all(self) -> None:
        await cancel_and_wait(*self._owned.values())
        self._owned.clear()
        session, self._session = self._session, None
        if session is not None:
            session.terminate()  # drops every lock it held

    async def _run(self) -> None:
        """Campaign and deliver until cancelled (one run of the supervised task)."""
        await self._release_all()  # what a run that failed may have left
        while True:
            try:
                self._session = await asyncpg.connect(self._database_url, timeout=_TIMEOUT)
                await self._hold(self._session)
            except Exception as exc:
                log.warning("webhook dispatcher lost its database session (%s)", exc)
            await self._release_all()
            await asyncio.sleep(self._scan_interval)

    async def _hold(self, session: asyncpg.Connection) -> None:
        while True:
            await session.fetchval("SELECT 1", timeout=_TIMEOUT)  # the leases still hold
            wanted = set(await self._store.active_ids())
            for webhook_id, task in list(self._owned.items()):
                if webhook_id not in wanted or task.done():
                    await cancel_and_wait(task)
                    del self._owned[webhook_id]
                    await session.fetchval(
                        "SELECT pg_advisory_unlock($1, hashtext($2))",
                        _LOCK_CLASS, webhook_id, timeout=_TIMEOUT,
                    )  # fmt: skip
            for webhook_id in sorted(wanted - set(self._owned)):
                locked = await session.fetchval(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))",
                    _LOCK_CLASS, webhook_id, timeout=_TIMEOUT,
                )  # fmt: skip
                if locked:
                    deliverer = Deliverer(webhook_id, self._store, self._inventory, self._policy)
                    self._owned[webhook_id] = asyncio.create_task(
                        deliverer.run(), name=f"webhook-{webhook_id}"
                    )
            if time.monotonic() - self._purged > 3600:
                await self._store.purge_log(_LOG_RETENTION_DAYS)
                self._purged = time.monotonic()
            await asyncio.sleep(self._scan_interval)


def policy_from(settings: Settings) -> DeliveryPolicy:
    """The policy the server's settings describe."""
    return DeliveryPolicy(
        retry_base=settings.webhook_retry_base,
        retry_max=settings.webhook_retry_max,
        retry_window=settings.webhook_retry_window,
        concurrency=settings.webhook_concurrency,
        allow_private=settings.webhook_allow_private,
    )
