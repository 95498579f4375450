"""Authentication of the streams (``/v1/ws``, ``/v1/stream``) and ``POST /v1/stream-tickets``.

A stream handshake is authenticated by the ``Authorization: Bearer`` header or, for
browsers (which cannot set it), by ``?ticket=`` holding a ticket from
``POST /v1/stream-tickets`` (:mod:`realtime.tickets`: single use, 30 s). Either needs the
``read`` scope (a ticket carries the scope check of the token that asked for it).

A raw token in the URL (``?token=``, ``?access_token=``) is never accepted, whether or not
authentication is on: it is refused with 401 before anything else, so a client that
still sends one learns at once instead of leaking it on every reconnect. (The URL is
still redacted from the logs: :mod:`inventory.logs`.)

With authentication off, a stream without credentials is accepted; a ticket, when given,
must still be valid (the dashboard always asks for one).

Who asks comes before what is asked (401/403 before the SSE route's 422, as on every
route), but a ticket is spent only on a handshake that is accepted: when the handshake's
own checks already refused it, the ticket is only looked up (``EXISTS``), so the client
can correct its request and still use it. A Redis failure at any step is 503
``unavailable`` (:mod:`.redis_errors`).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from realtime.tickets import TicketStore

from ..domain.model import InventoryError
from .auth import TokenAuth, bearer
from .errors import Unauthorized, error_response, json_response
from .redis_errors import redis_translated

__all__ = ["STREAM_SCOPE", "StreamAuth"]

_URL_TOKEN_PARAMS = ("token", "access_token")
STREAM_SCOPE = "read"
"""What a stream handshake needs, and a ticket (whose route declares it) stands for."""


class StreamAuth:
    """The handshake check shared by both stream transports, and the ticket route."""

    __slots__ = ("_auth", "_tickets")

    def __init__(self, auth: TokenAuth, tickets: Callable[[], TicketStore]) -> None:
        self._auth = auth
        self._tickets = tickets  # created in the lifespan, after the routes

    async def authenticate(
        self, connection: HTTPConnection, refusal: Response | None = None
    ) -> Response | None:
        """``None`` to accept the handshake, else the denial: 401, 403 or 503 when the
        credential fails, else ``refusal`` (the handshake's own, e.g. the SSE route's 422),
        which leaves a ticket unspent (:class:`realtime.ws.Authenticate`)."""
        try:
            await self._check(connection, spend=refusal is None)
        except InventoryError as exc:
            return error_response(exc)
        return refusal

    async def _check(self, connection: HTTPConnection, *, spend: bool) -> None:
        params = connection.query_params
        if any(name in params for name in _URL_TOKEN_PARAMS):
            raise Unauthorized(
                "a token is never accepted in a URL: send it in the Authorization header, "
                "or put a ticket from POST /v1/stream-tickets in ?ticket="
            )
        ticket = params.get("ticket")
        if ticket is None or bearer(connection.headers) is not None:
            self._auth.require(connection, STREAM_SCOPE)
            return
        tickets = self._tickets()
        with redis_translated("stream tickets cannot be checked right now; retry"):
            if spend:
                valid = await tickets.redeem(ticket) is not None
            else:
                valid = await tickets.known(ticket)
        if not valid:
            raise Unauthorized("the ticket is unknown, already used or expired")

    async def create_ticket(self, request: Request) -> Response:
        """``POST /v1/stream-tickets`` -> 201 ``{ticket, expires_at}`` (the route declares
        :data:`STREAM_SCOPE`: a ticket carries that scope check)."""
        tickets = self._tickets()
        with redis_translated("stream tickets cannot be issued right now; retry"):
            ticket = await tickets.issue(request.user.identity)
        return json_response(
            {"ticket": ticket.value, "expires_at": ticket.expires_at},
            201,
            {"Cache-Control": "no-store"},
        )
