"""Settings: one frozen object built from the environment, overridden by CLI options.

Every variable is documented in the README's configuration table. Invalid values raise
:class:`ConfigError` with a one-line message (the CLI prints it and exits non-zero).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from .logs import default_format as default_log_format

__all__ = [
    "DISTRIBUTION",
    "SCOPES",
    "TRACE_EXPORTERS",
    "ConfigError",
    "Settings",
    "check_tracing",
    "default_data_dir",
    "otel_missing",
    "trace_exporters",
]

SCOPES = ("read", "reserve", "admin")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A setting is missing or malformed."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/inventory`` (default ``~/.local/share/inventory``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "inventory"


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = (env.get(name) or default).lower()
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _origins(raw: str) -> tuple[str, ...]:
    """``INVENTORY_CORS_ORIGINS``: comma-separated ``scheme://host[:port]`` origins."""
    origins = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        if not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", item) or item.endswith("/"):
            raise ConfigError(
                f"INVENTORY_CORS_ORIGINS: {item!r} is not an origin like https://shop.example"
            )
        origins.append(item.lower())
    return tuple(origins)


def parse_tokens(raw: str) -> dict[str, frozenset[str]]:
    """Parse ``INVENTORY_TOKENS``: a JSON object token -> list of scopes.

    Keys are stored as SHA-256 hex digests (``sha256:<hex>`` keys are taken as given), so
    the running process never keeps a plain token. ``admin`` implies the other scopes.
    """
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ConfigError("INVENTORY_TOKENS must be a JSON object") from None
    if not isinstance(data, dict):
        raise ConfigError("INVENTORY_TOKENS must be a JSON object of token -> [scopes]")
    tokens: dict[str, frozenset[str]] = {}
    for key, scopes in data.items():
        if not key or not isinstance(scopes, list) or not all(s in SCOPES for s in scopes):
            raise ConfigError(
                f"INVENTORY_TOKENS: each token needs a list of scopes from {', '.join(SCOPES)}"
            )
        if key.startswith("sha256:"):
            digest = key[len("sha256:") :].lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError("INVENTORY_TOKENS: a sha256: key needs 64 hex digits")
        else:
            digest = hashlib.sha256(key.encode()).hexdigest()
        granted = set(scopes)
        if "admin" in granted:
            granted.update(SCOPES)
        tokens[digest] = frozenset(granted)
    return tokens


# --- INVENTORY_TRACING=on: checked here, with nothing of OpenTelemetry imported ----

DISTRIBUTION = "inventory-server"
TRACE_EXPORTERS = ("otlp", "console", "none")

# What INVENTORY_TRACING=on imports; checked without importing them.
_REQUIRED = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.instrumentation.asgi",
    "opentelemetry.instrumentation.asyncpg",
    "opentelemetry.instrumentation.redis",
)


def otel_missing(detail: str) -> ConfigError:
    return ConfigError(
        f"INVENTORY_TRACING=on needs OpenTelemetry, which is not installed ({detail}): "
        f"pip install '{DISTRIBUTION}[otel]'"
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or half-imported
        return False


def trace_exporters(env: Mapping[str, str]) -> list[str]:
    """The exporters ``OTEL_TRACES_EXPORTER`` asks for, ``none`` left out."""
    raw = env.get("OTEL_TRACES_EXPORTER") or "otlp"
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    if not names or any(name not in TRACE_EXPORTERS for name in names):
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER must be {', '.join(TRACE_EXPORTERS)} (or a comma-separated "
            f"list of them), got {raw!r}"
        )
    if "otlp" in names:
        protocol = (
            env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        )
        if protocol != "http/protobuf":
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf is supported, got {protocol!r}"
            )
    return [name for name in names if name != "none"]


def check_tracing(env: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` unless tracing can start: the ``otel`` extra is
    installed and the ``OTEL_TRACES_EXPORTER`` settings are valid. Imports nothing."""
    missing = [module for module in _REQUIRED if not _importable(module)]
    if missing:
        raise otel_missing(f"no module {', '.join(missing)}")
    trace_exporters(env)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a server process needs; picklable so uvicorn workers can rebuild it."""

    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    reserve_strategy: str = "optimistic"
    tokens: dict[str, frozenset[str]] = field(default_factory=dict)
    metrics_public: bool = True
    ready_public: bool = True
    redis_prefix: str = "inventory"
    db_pool_min: int = 2
    db_pool_max: int = 10
    db_timeout: float = 5.0
    lock_ttl: float = 10.0
    lock_wait: float = 2.0
    reserve_lanes: int = 4
    sweep_interval: float = 0.25
    sweep_batch: int = 1000
    idempotency_ttl_hours: int = 48
    relay_poll_interval: float = 0.01
    log_level: str = "info"
    log_format: str = "json"
    tracing: str = "off"
    webhook_allow_private: bool = False
    webhook_retry_base: float = 5.0
    webhook_retry_max: float = 3600.0
    webhook_retry_window: float = 86400.0
    webhook_concurrency: int = 8
    max_streams: int = 10_000  # open WebSocket/SSE connections per process
    cors_origins: tuple[str, ...] = ()
    header_timeout: float = 30.0

    @property
    def process_lanes(self) -> int:
        """Reservation lanes of one worker process: ``reserve_lanes`` is for the whole
        server, split over its workers, so that more workers do not mean more, smaller
        batch transactions at the same load."""
        return max(1, -(-self.reserve_lanes // self.workers))

    @property
    def embedded(self) -> bool:
        """True when at least one of the two servers must be started locally."""
        return self.database_url is None or self.redis_url is None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        strategy = env.get("INVENTORY_RESERVE_STRATEGY", "optimistic") or "optimistic"
        if strategy not in ("optimistic", "lock"):
            raise ConfigError(
                f"INVENTORY_RESERVE_STRATEGY must be 'optimistic' or 'lock', got {strategy!r}"
            )
        tokens_raw = env.get("INVENTORY_TOKENS", "").strip()
        tracing = _choice(env, "INVENTORY_TRACING", "off", ("off", "on"))
        if tracing == "on":
            check_tracing(env)  # the otel extra is installed, OTEL_TRACES_EXPORTER is valid
        return cls(
            database_url=env.get("INVENTORY_DATABASE_URL") or None,
            redis_url=env.get("INVENTORY_REDIS_URL") or None,
            data_dir=Path(env["INVENTORY_DATA_DIR"]).expanduser()
            if env.get("INVENTORY_DATA_DIR")
            else default_data_dir(),
            host=env.get("INVENTORY_HOST", "127.0.0.1") or "127.0.0.1",
            port=_int(env, "INVENTORY_PORT", 8000, 0, 65535),
            workers=_int(env, "INVENTORY_WORKERS", 1, 1, 64),
            reserve_strategy=strategy,
            tokens=parse_tokens(tokens_raw) if tokens_raw else {},
            metrics_public=_bool(env, "INVENTORY_METRICS_PUBLIC", True),
            ready_public=_bool(env, "INVENTORY_READY_PUBLIC", True),
            redis_prefix=env.get("INVENTORY_REDIS_PREFIX", "inventory") or "inventory",
            db_pool_min=_int(env, "INVENTORY_DB_POOL_MIN", 2, 1, 100),
            db_pool_max=_int(env, "INVENTORY_DB_POOL_MAX", 10, 1, 200),
            db_timeout=_float(env, "INVENTORY_DB_TIMEOUT", 5.0, 0.1, 300),
            lock_ttl=_float(env, "INVENTORY_LOCK_TTL", 10.0, 0.1, 3600),
            lock_wait=_float(env, "INVENTORY_LOCK_WAIT", 2.0, 0.0, 60),
            reserve_lanes=_int(env, "INVENTORY_RESERVE_LANES", 4, 1, 64),
            sweep_interval=_float(env, "INVENTORY_SWEEP_INTERVAL", 0.25, 0.01, 60),
            log_level=_choice(env, "INVENTORY_LOG_LEVEL", "info", LOG_LEVELS),
            log_format=_choice(env, "INVENTORY_LOG_FORMAT", default_log_format(), ("json", "text")),
            tracing=tracing,
            webhook_allow_private=_bool(env, "INVENTORY_WEBHOOK_ALLOW_PRIVATE", False),
            webhook_retry_base=_float(env, "INVENTORY_WEBHOOK_RETRY_BASE", 5.0, 0.01, 3600),
            webhook_retry_max=_float(env, "INVENTORY_WEBHOOK_RETRY_MAX", 3600.0, 0.01, 86400),
            webhook_retry_window=_float(
                env, "INVENTORY_WEBHOOK_RETRY_WINDOW", 86400.0, 1, 7 * 86400
            ),
            webhook_concurrency=_int(env, "INVENTORY_WEBHOOK_CONCURRENCY", 8, 1, 256),
            max_streams=_int(env, "INVENTORY_MAX_STREAMS", 10_000, 1, 1_000_000),
            cors_origins=_origins(env.get("INVENTORY_CORS_ORIGINS", "")),
            header_timeout=_float(env, "INVENTORY_HEADER_TIMEOUT", 30.0, 0.1, 3600),
        )

    def with_overrides(self, **overrides: Any) -> Settings:
        """Apply CLI options that were given (None means 'not given')."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """The variables that make a worker process rebuild these settings' server URLs."""
        env = {"INVENTORY_DATA_DIR": str(self.data_dir)}
        if self.database_url:
            env["INVENTORY_DATABASE_URL"] = self.database_url
        if self.redis_url:
            env["INVENTORY_REDIS_URL"] = self.redis_url
        env["INVENTORY_RESERVE_STRATEGY"] = self.reserve_strategy
        env["INVENTORY_WORKERS"] = str(self.workers)
        return env
