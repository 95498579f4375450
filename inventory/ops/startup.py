"""Start-up checks that name what failed, in one line, without credentials.

``inventory serve`` (and ``migrate``/``check``) used to end with ``database unavailable:
ConnectionRefusedError`` or, for Redis, start anyway and log retries forever. These
checks run before the server starts and raise :class:`StartupError` with the server's
kind and ``host:port`` (never the user or password of the URL) or the data directory.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["StartupError", "check_data_dir", "check_redis", "where"]


class StartupError(Exception):
    """A server the process needs is unreachable or a directory is unusable."""


def where(url: str) -> str:
    """``host:port`` of a URL (defaults filled in), without user, password or path."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        port = parts.port
    except ValueError:
        return "(an unparsable URL)"
    if port is None:
        port = 6379 if parts.scheme.startswith("redis") else 5432
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: BaseException) -> str:
    """A short cause: ``connection refused``, ``timed out``, the OS error text, ..."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def database_error(url: str, exc: BaseException) -> StartupError:
    """The one-line error for an unreachable or refusing PostgreSQL at ``url``."""
    cause = exc.__cause__ or exc
    return StartupError(f"cannot reach PostgreSQL at {where(url)}: {_reason(cause)}")


async def _ping_redis(url: str, timeout: float) -> None:
    from realtime.sharded import redis_from_url

    client = redis_from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        await client.ping()
    finally:
        await client.aclose()


def check_redis(url: str, timeout: float = 3.0) -> None:
    """Ping Redis once; :class:`StartupError` naming ``host:port`` when it does not answer."""
    import redis.exceptions

    try:
        asyncio.run(_ping_redis(url, timeout))
    except (OSError, redis.exceptions.RedisError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        reason = _reason(cause)
        if "authentication" in reason.lower() or "noauth" in reason.lower():
            reason = "authentication failed"
        elif isinstance(exc, redis.exceptions.ConnectionError) and cause is exc:
            reason = "connection failed"
        raise StartupError(f"cannot reach Redis at {where(url)}: {reason}") from None
    except ValueError as exc:
        raise StartupError(f"INVENTORY_REDIS_URL is not a Redis URL: {exc}") from None


def check_data_dir(path: Path) -> None:
    """The data directory exists (or can be made) and is writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot use the data directory {path}: {_reason(exc)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StartupError(f"cannot use the data directory {path}: not writable")
