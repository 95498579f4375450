"""The ``inventory`` console script.

Every command has ``--help``. Failures a user can cause (a bad option, an unreachable
server, a port in use) end with one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, Settings, default_data_dir
from ..domain.model import InventoryError
from ..http.guards import is_loopback_name
from ..logs import configure_logging, default_format, uvicorn_log_config
from .embedded import EmbeddedError, EmbeddedPostgres, EmbeddedValkey
from .startup import StartupError, check_data_dir, check_redis, database_error

__all__ = ["main"]

log = logging.getLogger("inventory")


class _Terminated(Exception):
    """SIGTERM arrived (after uvicorn's graceful shutdown)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


class CliError(Exception):
    """A failure reported as one line and exit status 1."""


@contextlib.contextmanager
def servers(settings: Settings, *, redis: bool = True) -> Iterator[Settings]:
    """Settings with URLs for both servers, starting embedded ones for those not given.

    Embedded servers started here are stopped on exit (a PostgreSQL that was already
    running on the data directory, e.g. under ``inventory serve``, is reused and left
    alone).
    """
    pg = vk = None
    if settings.database_url is None or (redis and settings.redis_url is None):
        check_data_dir(settings.data_dir)
    try:
        if settings.database_url is None:
            pg = EmbeddedPostgres(settings.data_dir / "postgres")
            settings = settings.with_overrides(database_url=pg.start())
            log.info("embedded PostgreSQL at %s (data in %s)", pg.url, pg.pgdata)
        if redis and settings.redis_url is None:
            vk = EmbeddedValkey(settings.data_dir / "valkey")
            settings = settings.with_overrides(redis_url=vk.start())
            log.info("embedded Valkey at %s", vk.url)
        yield settings
    finally:
        if vk is not None:
            vk.stop()
        if pg is not None:
            pg.stop()


def _migrate(url: str) -> list[str]:
    from ..store.migrate import migrate

    try:
        return asyncio.run(migrate(url))
    except InventoryError as exc:
        if exc.code == "unavailable":
            raise database_error(url, exc) from None
        raise


def _metrics_dir() -> None:
    """A fresh prometheus multiprocess directory for this run's worker processes."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = Path(tempfile.mkdtemp(prefix="inventory-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    atexit.register(shutil.rmtree, path, True)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_env().with_overrides(
        host=args.host, port=args.port, workers=args.workers, data_dir=args.data_dir
    )
    if not settings.tokens and not is_loopback_name(settings.host):
        raise CliError(
            f"refusing to listen on {settings.host} without authentication: "
            "set INVENTORY_TOKENS or bind to 127.0.0.1"
        )
    import uvicorn

    from ..http.limits import LimitedHttpToolsProtocol  # fails loudly on an incompatible uvicorn

    with servers(settings) as settings:
        applied = _migrate(settings.database_url or "")
        check_redis(settings.redis_url or "")
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        if not settings.tokens:
            log.warning("no INVENTORY_TOKENS: the API is unauthenticated (loopback only)")
        os.environ.update(settings.to_env())
        _metrics_dir()
        # uvicorn shuts down gracefully, then re-raises the signal it caught: make that
        # an exception so the embedded servers are still stopped on the way out.
        signal.signal(signal.SIGTERM, _raise_terminated)
        with contextlib.suppress(_Terminated):
            uvicorn.run(
                "inventory.ops.app:app_from_env",
                factory=True,
                host=settings.host,
                port=settings.port,
                workers=settings.workers,
                loop="uvloop",
                http=LimitedHttpToolsProtocol,  # httptools with the 16 KiB head limit
                ws="websockets-sansio",
                ws_max_size=64 * 1024,
                # Per-message deflate costs zlib time per client per message and ~40 KiB
                # of state per connection; stock messages are small.
                ws_per_message_deflate=False,
                log_level=settings.log_level,
                log_config=_log_config(settings, access_log=args.access_log),
                timeout_graceful_shutdown=10,
                access_log=args.access_log,
            )
    return 0


def _log_config(settings: Settings, *, access_log: bool) -> dict[str, object]:
    """The normal logging configuration; ``access_log`` lets uvicorn's access lines through
    (the same handlers, so the same formatting and redaction as every other line)."""
    config = uvicorn_log_config(settings.log_format, settings.log_level)
    if access_log:
        config["loggers"]["uvicorn.access"]["level"] = "INFO"
    return config


def cmd_tokens_new(args: argparse.Namespace) -> int:
    """A new random token and the ``sha256:`` key to put in ``INVENTORY_TOKENS``."""
    import hashlib
    import json
    import secrets

    scopes = [x.strip() for x in args.scopes.split(",") if x.strip()]
    unknown = sorted(set(scopes) - {"read", "reserve", "admin"})
    if not scopes or unknown:
        raise CliError(f"--scopes takes read, reserve and admin, got {args.scopes!r}")
    token = secrets.token_urlsafe(32)
    key = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    print(f"token:  {token}")
    print(f"key:    {key}")
    print(f"INVENTORY_TOKENS='{json.dumps({key: scopes})}'")
    return 0


def _client(args: argparse.Namespace) -> Any:
    from ..client import Client

    return Client(args.url, os.environ.get("INVENTORY_TOKEN") or None, timeout=60)


def cmd_import(args: argparse.Namespace) -> int:
    from .transfer import TransferError, import_file

    with _client(args) as client:
        try:
            summary = import_file(client, args.file, args.format, concurrency=args.concurrency)
        except TransferError as exc:
            raise CliError(str(exc)) from None
    print(
        f"{summary.rows} rows: {summary.imported} imported, {summary.failed} failed",
        file=sys.stderr,
    )
    return 1 if summary.failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .transfer import TransferError, export_rows

    with _client(args) as client, contextlib.ExitStack() as stack:
        out = sys.stdout
        if args.output is not None:
            out = stack.enter_context(args.output.open("w", encoding="utf-8", newline=""))
        try:
            count = export_rows(client, out, args.format)
        except TransferError as exc:
            raise CliError(str(exc)) from None
    print(f"exported {count} stock rows", file=sys.stderr)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = Settings.from_env().with_overrides(data_dir=args.data_dir)
    with servers(settings, redis=False) as settings:
        applied = _migrate(settings.database_url or "")
    print(f"applied: {', '.join(applied)}" if applied else "the schema is up to date")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check

    settings = Settings.from_env().with_overrides(data_dir=args.data_dir)
    with servers(settings, redis=False) as settings:
        url = settings.database_url or ""
        try:
            ok = asyncio.run(run_check(url, sys.stdout))
        except InventoryError as exc:
            if exc.code == "unavailable":
                raise database_error(url, exc) from None
            raise
    return 0 if ok else 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("inventory-server")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inventory",
        description="High-concurrency, real-time inventory server. With no "
        "INVENTORY_DATABASE_URL / INVENTORY_REDIS_URL, embedded PostgreSQL and Valkey "
        f"are started under the data directory (default {default_data_dir()}).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            type=Path,
            help="where embedded servers keep their data "
            f"(env INVENTORY_DATA_DIR; default {default_data_dir()})",
            default=None,
        )

    serve = sub.add_parser(
        "serve", help="run the server", description="Run the HTTP and WebSocket server."
    )
    serve.add_argument("--host", help="address to bind (env INVENTORY_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (env INVENTORY_PORT; default 8000)")
    serve.add_argument(
        "--workers", type=int, help="worker processes (env INVENTORY_WORKERS; default 1)"
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="log one line per HTTP request (off by default; credentials are redacted)",
    )
    data_dir_option(serve)
    serve.set_defaults(func=cmd_serve)

    tokens = sub.add_parser(
        "tokens", help="make API tokens", description="Make API tokens for INVENTORY_TOKENS."
    )
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    new = tokens_sub.add_parser(
        "new",
        help="print a new token and its sha256: key",
        description="Print a new random token, its sha256: key and an INVENTORY_TOKENS "
        "value that grants it the scopes (the configuration then holds only the digest).",
    )
    new.add_argument(
        "--scopes", default="read", help="comma-separated: read, reserve, admin (default read)"
    )
    new.set_defaults(func=cmd_tokens_new)

    def url_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--url",
            default="http://127.0.0.1:8000",
            help="the server's base URL (default http://127.0.0.1:8000); a token is "
            "taken from INVENTORY_TOKEN",
        )

    imp = sub.add_parser(
        "import",
        help="set on-hand stock from a CSV or JSON lines file, through the HTTP API",
        description="Set on-hand stock from FILE: CSV with the header "
        "product_id,warehouse_id,quantity[,reason] or JSON lines (.jsonl) with those keys. "
        "Rows go in batches of 1,000 through POST /v1/stock/bulk; a failing row is "
        "reported with its line number and the rest goes on; exit 1 if any row failed.",
    )
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--format", choices=("csv", "jsonl"), help="default: by file name")
    imp.add_argument(
        "--concurrency", type=int, default=4, metavar="N",
        help="batches in flight at once (default 4); a row named again waits for its "
        "earlier batch, so file order per row holds",
    )  # fmt: skip
    url_option(imp)
    imp.set_defaults(func=cmd_import)

    exp = sub.add_parser(
        "export",
        help="write every stock row as CSV or JSON lines, through the HTTP API",
        description="Write every stock row (product_id, warehouse_id, quantity, reserved, "
        "available, version, updated_at) to standard output or --output.",
    )
    exp.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    exp.add_argument("--output", type=Path, metavar="FILE", help="default: standard output")
    url_option(exp)
    exp.set_defaults(func=cmd_export)

    migrate = sub.add_parser(
        "migrate", help="apply database migrations and exit", description="Apply migrations."
    )
    data_dir_option(migrate)
    migrate.set_defaults(func=cmd_migrate)

    check = sub.add_parser(
        "check",
        help="verify the stock invariants; exit 1 on a violation",
        description="Verify: 0 <= reserved <= quantity; reserved equals the active "
        "reservation lines; the ledger replays to every row; versions are contiguous.",
    )
    data_dir_option(check)
    check.set_defaults(func=cmd_check)

    # These two parse their own options (their modules own them).
    sub.add_parser(
        "bench", help="run the end-to-end benchmark harness (see 'inventory bench --help')",
        add_help=False,
    )  # fmt: skip
    sub.add_parser(
        "demo", help="seed demo data and run a bounded shopper load against a running server",
        add_help=False,
    )  # fmt: skip
    return parser


def _delegate(command: str, argv: Sequence[str]) -> int:
    if command == "bench":
        from bench.harness import main as bench_main

        return bench_main(list(argv))
    from .demo import main as demo_main

    return demo_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("bench", "demo"):
        try:
            return _delegate(argv[0], argv[1:])
        except KeyboardInterrupt:
            return 130
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(default_format(), "debug" if args.verbose else "info")
    if getattr(args, "port", None) is not None and not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if getattr(args, "workers", None) is not None and not 1 <= args.workers <= 64:
        parser.error("--workers must be between 1 and 64")
    try:
        code: int = args.func(args)
        return code
    except (CliError, ConfigError, EmbeddedError, InventoryError, StartupError, OSError) as exc:
        print(f"inventory: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
