"""Idempotency keys: claimed in the transaction of the request they guard, answered in it,
purged in chunks when old (``INVENTORY_IDEMPOTENCY_TTL_HOURS``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..domain.model import Contention
from .db import Conn, Database
from .port import IdempotencyRecord

__all__ = ["IdempotencyStatements"]

# Keys are inserted in (scope, key) order, so two transactions claiming overlapping keys
# wait for each other in one order and never deadlock.
_CLAIM_KEYS = """
INSERT INTO idempotency_keys (scope, key, body_hash)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[]) AS k(scope, key, h)
ORDER BY scope, key
ON CONFLICT DO NOTHING
RETURNING scope, key
"""

# New keys with their answers; for the others, the records committed before the statement
# (what the insert itself writes is not visible to the statement's own read).
_STORE_ANSWERED = """
WITH a AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int[], $5::bytea[])
        AS a(scope, key, h, status, body)
), ins AS (
    INSERT INTO idempotency_keys (scope, key, body_hash, status_code, response)
    SELECT * FROM a ORDER BY scope, key
    ON CONFLICT DO NOTHING
    RETURNING scope, key
)
SELECT scope, key, true AS inserted, NULL::bytea AS body_hash, NULL::int AS status_code,
       NULL::bytea AS response
FROM ins
UNION ALL
SELECT k.scope, k.key, false, k.body_hash, k.status_code, k.response
FROM idempotency_keys k JOIN a ON k.scope = a.scope AND k.key = a.key
"""

# $1 hours, $2 chunk size.
_PURGE_CHUNK = """
DELETE FROM idempotency_keys
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM idempotency_keys
    WHERE created_at < now() - make_interval(hours => $1)
    LIMIT $2))
"""


class IdempotencyStatements(Database):
    """Claim, answer, drop and purge keys."""

    async def claim_idempotency_keys(
        self, conn: Conn, claims: Sequence[tuple[str, str, bytes]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        """Claim ``(scope, key, body hash)`` keys in this transaction; returns the stored
        records of those someone already had.

        A concurrent claimer waits on the primary key until the first transaction ends,
        then sees its stored answer (or claims the key if that transaction rolled back).
        """
        claimed = await conn.fetch(
            _CLAIM_KEYS, [c[0] for c in claims], [c[1] for c in claims], [c[2] for c in claims]
        )
        got = {(r["scope"], r["key"]) for r in claimed}
        taken = [c for c in claims if (c[0], c[1]) not in got]
        if not taken:
            return {}
        # A statement of its own: its snapshot sees answers committed while the claim waited.
        return await _records(conn, [(c[0], c[1]) for c in taken])

    async def store_idempotent_responses(
        self, conn: Conn, answers: Sequence[tuple[str, str, int, bytes]]
    ) -> None:
        """Store ``(scope, key, status, body)`` answers of keys claimed in ``conn``."""
        await conn.execute(
            """UPDATE idempotency_keys k SET status_code = a.status, response = a.body
               FROM unnest($1::text[], $2::text[], $3::int[], $4::bytea[])
                   AS a(scope, key, status, body)
               WHERE k.scope = a.scope AND k.key = a.key""",
            [a[0] for a in answers],
            [a[1] for a in answers],
            [a[2] for a in answers],
            [a[3] for a in answers],
        )

    async def store_refusals(
        self, answers: Sequence[tuple[str, str, bytes, int, bytes]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        """Claim ``(scope, key, body hash, status, body)`` keys with their answers at once,
        outside any transaction (refusals that needed no row); returns the records of
        those someone already had.

        One autocommit statement inserts the new keys and reads the records committed
        before it. A key whose claim was in flight elsewhere made the insert wait for that
        transaction, whose answer the statement's snapshot does not see: a second
        statement reads those. A key used twice in ``answers`` is stored by the first; a
        key dropped or purged meanwhile is claimed again (bounded)."""
        taken: dict[tuple[str, str], IdempotencyRecord] = {}
        todo = sorted(answers, key=lambda a: (a[0], a[1]))
        async with self.connection() as conn:
            for _ in range(3):
                rows = await conn.fetch(
                    _STORE_ANSWERED, *(list(c) for c in zip(*todo, strict=True))
                )
                done = {(r["scope"], r["key"]) for r in rows if r["inserted"]}
                taken.update(
                    ((r["scope"], r["key"]), _record(r)) for r in rows if not r["inserted"]
                )
                unseen = [(a[0], a[1]) for a in todo if (a[0], a[1]) not in done | taken.keys()]
                if not unseen:
                    return taken
                taken.update(await _records(conn, unseen))
                todo = [a for a in todo if (a[0], a[1]) not in done | taken.keys()]
                if not todo:
                    return taken
        raise Contention("an Idempotency-Key kept changing under the request; retry")

    async def drop_idempotency_keys(self, conn: Conn, keys: Sequence[tuple[str, str]]) -> None:
        """Forget keys claimed in this transaction whose answer is not stored (a 422)."""
        await conn.execute(
            """DELETE FROM idempotency_keys k USING unnest($1::text[], $2::text[]) AS d(scope, key)
               WHERE k.scope = d.scope AND k.key = d.key""",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )

    async def purge_idempotency_keys(self, older_than_hours: int, limit: int) -> int:
        """Delete up to ``limit`` keys older than ``older_than_hours`` in one short
        transaction; returns how many."""
        async with self.transaction() as conn:
            status = await conn.execute(_PURGE_CHUNK, older_than_hours, limit)
        return int(status.split()[-1])


async def _records(
    conn: Conn, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], IdempotencyRecord]:
    rows = await conn.fetch(
        """SELECT k.scope, k.key, k.body_hash, k.status_code, k.response
           FROM idempotency_keys k
           JOIN unnest($1::text[], $2::text[]) AS t(scope, key)
             ON k.scope = t.scope AND k.key = t.key""",
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    return {(r["scope"], r["key"]): _record(r) for r in rows}


def _record(r: Any) -> IdempotencyRecord:
    return IdempotencyRecord(bytes(r["body_hash"]), r["status_code"], r["response"])
