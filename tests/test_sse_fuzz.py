"""Fuzzing the SSE endpoint ``GET /v1/stream`` of a real ``inventory serve`` process.

Hypothesis draws query strings (``product_ids`` lists of good and bad ids, up to past the
1,000 limit, random text, ``since``, ``products``, tickets fresh, unknown, malformed or
empty, a token in the URL, a stray parameter) and headers (``Authorization`` of every
kind, ``Last-Event-ID``, ``Accept``). Every answer comes within a bounded read and is
exactly what SPEC "Security" and "Live stream" say for that request: a stream whose
first event is a ``snapshot``, or the spec's JSON error with the status and code an
oracle (the handshake's rules, :func:`realtime.protocol.validate_product_ids`) expects;
never a 5xx, and no traceback in the server's log afterwards.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from inventory.domain.model import PRODUCT_ID_RE
from realtime.protocol import ProtocolError, validate_product_ids

from .conftest import ServerFactory
from .test_streams import READER, RESERVER, SECURED

READ_BOUND = 5.0  # seconds: an answer, or a stream's first event, must come within this
TICKET_LENGTH = 43
AUTHORIZATIONS = {  # header -> (status when the header decides, a bearer token is given)
    None: (401, False),
    f"Bearer {READER}": (200, True),
    f"Bearer {RESERVER}": (403, True),
    "Bearer guessed-token": (401, True),
    "Bearer": (401, False),  # the scheme without a token
    "Basic cmVhZGVyOnB3": (401, False),
}

ACCEPTS = ["text/event-stream", "*/*", "application/json"]


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each drawn ``weight`` times as often as a weight of 1."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
_printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_good_id = st.from_regex(PRODUCT_ID_RE, fullmatch=True)
_id = weighted((4, _good_id), (1, st.text(st.characters(exclude_categories=("Cs",)), max_size=8)))
_product_ids = weighted(  # about half of them valid
    (4, st.lists(_good_id, min_size=1, max_size=6).map(",".join)),
    (2, st.lists(_id, max_size=6).map(",".join)),
    (1, st.integers(998, 1001).map(lambda n: ",".join(f"p{i}" for i in range(n)))),
    (1, _text),
    (1, st.none()),
)
_ticket = weighted(
    (3, st.none()),
    (3, st.just("fresh")),
    (1, st.sampled_from(["", "A" * TICKET_LENGTH, "short"])),
    (1, _text),
)
_authorization = weighted(
    (3, st.none()),
    (3, st.just(f"Bearer {READER}")),
    (2, st.sampled_from([a for a in AUTHORIZATIONS if a and READER not in a])),
)
_url_token = weighted((6, st.none()), (1, st.just(READER)))


@dataclass(frozen=True)
class Case:
    """One request: its query parameters (``ticket`` "fresh" is issued just before)."""

    params: dict[str, str]
    authorization: str | None
    headers: dict[str, str]

    def expected(self) -> int:
        """The status the handshake's rules give (SPEC "Security", "Live stream")."""
        params = self.params
        if "token" in params or "access_token" in params:
            return 401
        raw = params.get("product_ids", "")
        try:
            validate_product_ids(raw.split(",") if raw else None)
            valid = True
        except ProtocolError:
            valid = False
        status, has_bearer = AUTHORIZATIONS[self.authorization]
        if "ticket" in params and not has_bearer:  # the ticket decides
            status = 200 if params["ticket"] == "fresh" else 401
        if status == 200 and not valid:
            return 422
        return status


@st.composite
def cases(draw: st.DrawFn) -> Case:
    params: dict[str, str] = {}
    for name, value in (
        ("product_ids", draw(_product_ids)),
        ("ticket", draw(_ticket)),
        ("since", draw(st.none() | _text)),
        ("products", draw(st.none() | _text)),
        (draw(st.from_regex(r"[a-z_]{1,8}", fullmatch=True)), draw(st.none() | _text)),
        (draw(st.sampled_from(["token", "access_token"])), draw(_url_token)),
    ):
        if value is not None:
            params[name] = value
    headers = {
        name: value.strip()
        for name, value in (
            ("Last-Event-ID", draw(st.none() | _printable)),
            ("Accept", draw(st.none() | st.sampled_from(ACCEPTS) | _printable)),
        )
        if value is not None
    }
    return Case(params, draw(_authorization), headers)


def check(http: httpx.Client, case: Case) -> None:
    """Send ``case``; its answer is the expected stream or JSON error, within the bound."""
    params = dict(case.params)
    if params.get("ticket") == "fresh":
        issued = http.post("/v1/stream-tickets", headers={"Authorization": f"Bearer {READER}"})
        assert issued.status_code == 201, issued.text
        params["ticket"] = issued.json()["ticket"]
    headers = dict(case.headers)
    if case.authorization is not None:
        headers["Authorization"] = case.authorization
    try:
        with http.stream("GET", "/v1/stream", params=params, headers=headers) as answer:
            status = answer.status_code
            event(f"status {status}")  # the spread, with --hypothesis-show-statistics
            # A stream is never read to its end: only its first event.
            raw = b"(a stream)" if status == 200 else answer.read()
            assert status < 500, (status, raw, case)
            assert status == case.expected(), (status, raw, case)
            if status == 200:
                assert answer.headers["content-type"].startswith("text/event-stream")
                first = next(line for line in answer.iter_lines() if line)
                assert first.startswith("data: "), first
                assert orjson.loads(first[6:])["type"] == "snapshot", first
                return
            assert answer.headers["content-type"] == "application/json"
    except httpx.TimeoutException as exc:
        raise AssertionError(f"no answer within {READ_BOUND} s: {case}") from exc
    body = orjson.loads(raw)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    code = {401: "unauthorized", 403: "forbidden", 422: "validation_error"}[status]
    assert body["error"]["code"] == code, body
    assert READER.encode() not in raw  # a token in the URL is never echoed


async def test_sse_fuzz(server_factory: ServerFactory) -> None:
    server = await server_factory(SECURED)

    @hypothesis_settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=cases())
    def fuzz(case: Case) -> None:
        check(http, case)

    with httpx.Client(base_url=server.base_url, timeout=READ_BOUND) as http:
        await asyncio.to_thread(fuzz)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=READ_BOUND) as client:
        assert (await client.get("/ready")).status_code == 200
    assert server.proc is not None
    assert server.proc.poll() is None
    assert "Traceback" not in server.log.read_text()
