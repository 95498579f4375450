"""Real-time stock: outbox relay -> Redis pub/sub -> per-process WebSocket fan-out hub.

Modules, one concept each:

* :mod:`realtime.ports`: the storage ports (``LevelReader``, ``Outbox``) and their values;
  implemented on PostgreSQL by ``inventory/store/feed.py`` (this package imports
  nothing from ``inventory`` but the id rules of ``inventory.domain``).
* :mod:`realtime.protocol`: the WebSocket wire protocol, pure (parse, validate, encode).
* :mod:`realtime.feed`: the versioned data published on the stock channels, pure (the
  publishers send it, the hub builds the clients' messages from it).
* :mod:`realtime.conflation`: per-connection newest-state-per-row buffer, pure.
* :mod:`realtime.session`: one connection's outbound side: direct writes, queues, limits.
* :mod:`realtime.subscriber`: the process's Redis pub/sub connection, reconnecting itself.
* :mod:`realtime.sharded`: Redis Cluster: the client, sharded publish and subscribe.
* :mod:`realtime.keys`: every Redis key and channel name.
* :mod:`realtime.hub`: subscriptions, fan-out, gap detection and resync.
* :mod:`realtime.relay`: the outbox relay (one leader per database and namespace).
* :mod:`realtime.ws`: the ASGI endpoint (a Starlette route) and its transports.
* :mod:`realtime.wsconn`: an accepted WebSocket served on its socket directly (frames
  written by the session, no per-connection ASGI objects).
* :mod:`realtime.handoff`: the one place that touches uvicorn's private WebSocket
  protocol, to move an accepted connection to :mod:`realtime.wsconn`.
* :mod:`realtime.sse`: the Server-Sent Events fallback on the same hub.
* :mod:`realtime.tickets`: single-use stream tickets for WebSocket and SSE URLs.
* :mod:`realtime.tasks`: supervised background tasks and stopping them.

Wiring, per server process (names as in the app factory)::

    hub = Hub(redis, PgLevelReader(pool), prefix=settings.redis_prefix)
    relay = Relay(PgOutbox(pool), redis, prefix=settings.redis_prefix)
    routes.append(websocket_route(lambda: hub, authenticate))
    await hub.start(); await relay.start()   # lifespan start; service calls relay.wake()
    await hub.stop(); await relay.stop()     # lifespan end (clients get 1001 first),
                                             # before the pool and Redis close
"""

__all__: list[str] = []
