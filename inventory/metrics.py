"""Prometheus metrics, correct with several worker processes.

``inventory serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the
workers start, so every process writes its samples to memory-mapped files and ``/metrics``
(answered by whichever worker gets the scrape) aggregates all of them. Without that
variable (tests, embedding the app elsewhere) the default in-process registry is used.

Labels are bounded: routes are templates (``/v1/reservations/{reservation_id}``), never
raw paths, and outcomes are error codes.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

__all__ = [
    "BATCHES",
    "BATCH_MEMBERS",
    "CONTENT_TYPE_LATEST",
    "EXPIRED",
    "HTTP_LATENCY",
    "HTTP_REQUESTS",
    "LOCK_TIMEOUTS",
    "LOCK_WAITS",
    "REDIS_RECONNECTS",
    "RESERVATIONS",
    "RESYNCS",
    "RETRIES",
    "SWEEPS",
    "TASK_RESTARTS",
    "VERSION_CONFLICTS",
    "WEBHOOK_ATTEMPTS",
    "WEBHOOK_FAILURES",
    "WEBHOOK_LAG",
    "WEBHOOK_QUEUE",
    "WS_COALESCED",
    "WS_CONFLATED",
    "WS_CONNECTIONS",
    "WS_CONNECTIONS_TOTAL",
    "WS_DELIVERIES",
    "WS_DROPPED",
    "WS_GAPS",
    "WS_SLOW_DISCONNECTS",
    "WS_SUBSCRIPTIONS",
    "WS_TOPICS",
    "render",
]

HTTP_REQUESTS = Counter(
    "inventory_http_requests_total", "HTTP requests", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "inventory_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RESERVATIONS = Counter(
    "inventory_reservations_total", "Reservation requests by outcome", ["outcome"]
)
VERSION_CONFLICTS = Counter(
    "inventory_version_conflicts_total", "Version-checked updates that lost a race"
)
RETRIES = Counter("inventory_reservation_retries_total", "Reservation attempts retried")
BATCHES = Counter(
    "inventory_reservation_batches_total", "Combined reservation transactions (lane and waiting)"
)
BATCH_MEMBERS = Counter(
    "inventory_reservation_batch_members_total", "Reservation requests they applied"
)
LOCK_WAITS = Counter("inventory_lock_waits_total", "Product lock acquisitions attempted")
LOCK_TIMEOUTS = Counter("inventory_lock_timeouts_total", "Product lock waits that ran out")
SWEEPS = Counter("inventory_expiry_sweeps_total", "Expiry sweeper passes")
EXPIRED = Counter("inventory_reservations_expired_total", "Reservations expired by the sweeper")
WS_CONNECTIONS = Gauge(
    "inventory_ws_connections", "Open WebSocket connections", multiprocess_mode="livesum"
)
WS_SUBSCRIPTIONS = Gauge(
    "inventory_ws_subscriptions",
    "Product subscriptions over all connections",
    multiprocess_mode="livesum",
)
WS_TOPICS = Gauge(
    "inventory_ws_topics",
    "Products with a Redis subscription (per process, summed)",
    multiprocess_mode="livesum",
)
WS_CONNECTIONS_TOTAL = Counter("inventory_ws_opened_total", "WebSocket and SSE sessions opened")
WS_COALESCED = Counter(
    "inventory_ws_coalesced_total",
    "Stock updates replaced at the hub by a newer one of the same burst",
)
WS_GAPS = Counter("inventory_ws_gaps_total", "Version gaps detected on the stock stream")
WS_DELIVERIES = Counter("inventory_ws_deliveries_total", "Stock messages written to clients")
WS_CONFLATED = Counter(
    "inventory_ws_conflated_total", "Stock messages replaced by a newer state before sending"
)
WS_DROPPED = Counter("inventory_ws_dropped_total", "Stale stock messages dropped")
WS_SLOW_DISCONNECTS = Counter(
    "inventory_ws_slow_disconnects_total", "Connections closed for not reading"
)
REDIS_RECONNECTS = Counter("inventory_redis_reconnects_total", "Pub/sub reconnects to Redis")
TASK_RESTARTS = Counter(
    "inventory_task_restarts_total",
    "Background tasks restarted by their supervisor after ending unexpectedly",
    ["task"],
)
RESYNCS = Counter("inventory_ws_resyncs_total", "Resyncs of subscribed products from PostgreSQL")

# Webhooks: labelled by webhook id (a registered slug), never by URL or secret.
WEBHOOK_ATTEMPTS = Counter(
    "inventory_webhook_attempts_total",
    "Webhook delivery attempts by outcome (success, http_error, error)",
    ["webhook_id", "outcome"],
)
WEBHOOK_FAILURES = Counter(
    "inventory_webhook_failures_total",
    "Webhook events given up after the retry window",
    ["webhook_id"],
)
WEBHOOK_QUEUE = Gauge(
    "inventory_webhook_queue_events",
    "Events queued for an endpoint and not yet acknowledged",
    ["webhook_id"],
    multiprocess_mode="livemax",
)
WEBHOOK_LAG = Gauge(
    "inventory_webhook_lag_seconds",
    "Age of the oldest unacknowledged event of an endpoint",
    ["webhook_id"],
    multiprocess_mode="livemax",
)


def render() -> bytes:
    """The exposition text: all worker processes in multiprocess mode, else this one."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
