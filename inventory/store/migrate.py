"""A small migration runner on asyncpg.

Migrations are the ``NNNN_name.sql`` files of :mod:`inventory.store.migrations`, applied in
order, each in its own transaction, and recorded in ``schema_migrations``. A
session-level advisory lock serialises runners, so several processes starting at
once apply each migration exactly once. Chosen over a third-party tool: the whole job is
forty lines and needs nothing beyond the driver the server already uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from .db import _translated

__all__ = ["Migration", "apply_migrations", "load_migrations", "migrate"]

_LOCK_KEY = 0x1A7E_5701  # arbitrary, constant: the advisory lock all runners share
_NAME_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("inventory.store.migrations").iterdir():
        m = _NAME_RE.fullmatch(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    return sorted(found, key=lambda x: x.version)


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing; returns the names applied by this call.

    The advisory lock is held for the whole run (session level, released on exit or when
    the session dies), so one runner applies every missing migration and the others find
    nothing left to do; each migration still commits on its own.
    """
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[str] = []
        for migration in load_migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(f"{migration.version:04d}_{migration.name}")
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


async def migrate(url: str) -> list[str]:
    """Apply missing migrations on a one-off connection."""
    with _translated():
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await apply_migrations(conn)
        finally:
            await conn.close()
