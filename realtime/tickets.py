"""Stream tickets: short-lived, single-use credentials for WebSocket and SSE URLs.

Browsers cannot set an ``Authorization`` header on a WebSocket or an ``EventSource``, and
a token in a URL ends up in access logs (the server's and every proxy's). So a client
trades its token (in a header) for a ticket (``POST /v1/stream-tickets``) and puts the
ticket in the stream URL (``?ticket=``). A ticket that leaks through a log is worthless:
it is valid :data:`TICKET_TTL` seconds and only once.

Policy:

* Tickets live in Redis, so one issued by any server process is accepted by any other
  (they share the Redis). The key holds the SHA-256 of the ticket, never the ticket
  itself: reading Redis (a dump, ``MONITOR``, a replica) does not yield usable tickets.
* Redemption is one ``GETDEL``: atomic, so of two handshakes racing with one ticket
  (on one process or two) exactly one gets it. Expiry is Redis's own (``SET ... PX``).
* The value stored is the identity of the token that asked for it (its digest, or
  ``""`` when authentication is off), so a stream opened with a ticket runs as that
  token.
* Malformed tickets are refused without a Redis round trip.
* :meth:`TicketStore.known` looks a ticket up without spending it, for a handshake refused
  for another reason once its credential is known good (the SSE route's 422): the client
  corrects its request and uses the ticket then.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .keys import RedisKeys
from .sharded import RedisClient

__all__ = ["TICKET_TTL", "Ticket", "TicketStore"]

TICKET_TTL = 30.0  # seconds
_TICKET_RE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Ticket:
    value: str
    expires_at: datetime


class TicketStore:
    """Issues and redeems tickets in Redis (see the module docstring).

    Redis errors propagate (whatever redis-py raises): the caller answers 503
    (``inventory.http.redis_errors``).
    """

    __slots__ = ("_keys", "_redis", "_ttl_ms")

    def __init__(self, redis: RedisClient, *, prefix: str, ttl: float = TICKET_TTL) -> None:
        self._redis = redis
        self._keys = RedisKeys(prefix)
        self._ttl_ms = int(ttl * 1000)

    def _key(self, ticket: str) -> str:
        return self._keys.stream_ticket(hashlib.sha256(ticket.encode()).hexdigest())

    async def issue(self, identity: str) -> Ticket:
        """A new ticket for ``identity``, valid once until its ``expires_at``."""
        value = secrets.token_urlsafe(32)
        expires_at = datetime.now(UTC) + timedelta(milliseconds=self._ttl_ms)
        await self._redis.set(self._key(value), identity, px=self._ttl_ms)
        return Ticket(value, expires_at)

    async def redeem(self, ticket: str) -> str | None:
        """The identity the ticket was issued to, or ``None`` when it is malformed,
        unknown, already used or expired. A ticket redeems at most once, ever."""
        if _TICKET_RE.fullmatch(ticket) is None:
            return None
        identity: bytes | str | None = await self._redis.getdel(self._key(ticket))
        if identity is None:
            return None
        return identity.decode() if isinstance(identity, bytes) else identity

    async def known(self, ticket: str) -> bool:
        """Whether :meth:`redeem` would accept ``ticket`` now; it stays unspent."""
        if _TICKET_RE.fullmatch(ticket) is None:
            return False
        return bool(await self._redis.exists(self._key(ticket)))
