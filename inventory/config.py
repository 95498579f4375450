"""Settings: one frozen object built from the environment, overridden by CLI options.

:class:`Settings` is a msgspec Struct whose field types and ``Meta`` bounds are the schema
of the ``INVENTORY_*`` variables; msgspec converts the environment's text (lax mode) and
this module only adds what it cannot know: booleans spelled yes/no/on/off, case-insensitive
choices, the JSON token table and the comma-separated origin list. Every variable is
documented in the README's configuration table. Invalid values raise :class:`ConfigError`
with a one-line message naming the variable, what it expects and what it got (the CLI
prints it and exits non-zero).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, cast, get_args

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

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

Scope = Literal["read", "reserve", "admin"]
SCOPES: tuple[str, ...] = get_args(Scope)


class ConfigError(Exception):
    """A setting is missing or malformed."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/inventory`` (default ``~/.local/share/inventory``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "inventory"


def _origins(raw: str) -> list[str]:
    """``INVENTORY_CORS_ORIGINS``: comma-separated origins, lower-cased (each one is
    checked against :data:`Origin` by the conversion)."""
    return [item.lower() for item in (x.strip() for x in raw.split(",")) if item]


_Tokens = dict[Annotated[str, Meta(min_length=1)], list[Scope]]


def parse_tokens(raw: str) -> dict[str, frozenset[str]]:
    """Parse ``INVENTORY_TOKENS``: a JSON object token -> list of scopes.

    Keys are stored as SHA-256 hex digests (``sha256:<hex>`` keys are taken as given), so
    the running process never keeps a plain token. ``admin`` implies the other scopes.
    """
    try:
        data = msgspec.json.decode(raw, type=_Tokens)
    except msgspec.ValidationError as exc:
        raise ConfigError(
            f"INVENTORY_TOKENS must be a JSON object of token -> list of scopes from "
            f"{', '.join(SCOPES)} ({exc})"
        ) from None
    except msgspec.DecodeError:
        raise ConfigError("INVENTORY_TOKENS must be a JSON object") from None
    tokens: dict[str, frozenset[str]] = {}
    for key, scopes in data.items():
        if key.startswith("sha256:"):
            digest = key[len("sha256:") :].lower()
            if not re.fullmatch("[0-9a-f]{64}", digest):
                raise ConfigError("INVENTORY_TOKENS: a sha256: key needs 64 hex digits")
        else:
            digest = hashlib.sha256(key.encode()).hexdigest()
        tokens[digest] = frozenset(SCOPES if "admin" in scopes else scopes)
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


def _env_name(name: str) -> str | None:
    """Each setting's variable is ``INVENTORY_<NAME>``; a few tuning knobs have none."""
    return None if name in _NOT_FROM_ENV else f"INVENTORY_{name.upper()}"


_NOT_FROM_ENV = frozenset({"sweep_batch", "idempotency_ttl_hours", "relay_poll_interval"})

# An origin as browsers send it: ``scheme://host[:port]``, no path (not even ``/``).
Origin = Annotated[
    str,
    Meta(
        pattern=r"^https?://[a-z0-9.\-\[\]:]+$", description="an origin like https://shop.example"
    ),
]


class Settings(msgspec.Struct, frozen=True, kw_only=True, rename=_env_name):
    """Everything a server process needs; picklable so uvicorn workers can rebuild it.

    The fields, their types and their bounds are the schema of the environment:
    :meth:`from_env` converts the ``INVENTORY_*`` variables with msgspec, and a bad value
    becomes a :class:`ConfigError` naming the variable and what it expects.
    """

    database_url: str | None = None
    redis_url: str | None = None
    data_dir: Path = msgspec.field(default_factory=default_data_dir)
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    reserve_strategy: Literal["optimistic", "lock"] = "optimistic"
    tokens: dict[str, frozenset[str]] = {}
    metrics_public: bool = True
    ready_public: bool = True
    redis_prefix: str = "inventory"
    db_pool_min: Annotated[int, Meta(ge=1, le=100)] = 2
    db_pool_max: Annotated[int, Meta(ge=1, le=200)] = 10
    db_timeout: Annotated[float, Meta(ge=0.1, le=300)] = 5.0
    lock_ttl: Annotated[float, Meta(ge=0.1, le=3600)] = 10.0
    lock_wait: Annotated[float, Meta(ge=0, le=60)] = 2.0
    reserve_lanes: Annotated[int, Meta(ge=1, le=64)] = 4
    sweep_interval: Annotated[float, Meta(ge=0.01, le=60)] = 0.25
    sweep_batch: int = 1000
    idempotency_ttl_hours: int = 48
    relay_poll_interval: float = 0.01
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = msgspec.field(default_factory=default_log_format)
    tracing: Literal["off", "on"] = "off"
    webhook_allow_private: bool = False
    webhook_retry_base: Annotated[float, Meta(ge=0.01, le=3600)] = 5.0
    webhook_retry_max: Annotated[float, Meta(ge=0.01, le=86400)] = 3600.0
    webhook_retry_window: Annotated[float, Meta(ge=1, le=7 * 86400)] = 86400.0
    webhook_concurrency: Annotated[int, Meta(ge=1, le=256)] = 8
    max_streams: Annotated[int, Meta(ge=1, le=1_000_000)] = 10_000  # WebSocket/SSE per process
    cors_origins: tuple[Origin, ...] = ()
    header_timeout: Annotated[float, Meta(ge=0.1, le=3600)] = 30.0

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
        """The settings the ``INVENTORY_*`` variables give (an empty variable means its
        default); raises :class:`ConfigError` on the first bad one."""
        env = os.environ if env is None else env
        raw = {
            f.encode_name: _prepare(f, env[f.encode_name].strip())
            for f in _ENV_FIELDS.values()
            if env.get(f.encode_name, "").strip()
        }
        try:
            settings = msgspec.convert(raw, cls, strict=False, dec_hook=_decode_path)
        except msgspec.ValidationError as exc:
            raise _config_error(exc, raw) from None
        if settings.tracing == "on":
            check_tracing(env)  # the otel extra is installed, OTEL_TRACES_EXPORTER is valid
        return settings

    def with_overrides(self, **overrides: Any) -> Settings:
        """Apply CLI options that were given (None means 'not given')."""
        return msgspec.structs.replace(
            self, **{k: v for k, v in overrides.items() if v is not None}
        )

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


# --- from the environment: what msgspec's lax conversion does not do by itself ---------

_ENV_FIELDS = {
    f.encode_name: f
    for f in cast(mi.StructType, mi.type_info(Settings)).fields
    if f.encode_name != f.name
}
# Variables that are not one scalar: their own parser turns the text into the field's shape.
_PARSERS: dict[str, Callable[[str], object]] = {
    "INVENTORY_TOKENS": parse_tokens,
    "INVENTORY_CORS_ORIGINS": _origins,
}
# Besides the true/false/1/0 msgspec accepts.
_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}


def _prepare(field: mi.Field, value: str) -> object:
    """A variable's text made ready for the conversion: choices and booleans are
    case-insensitive, structured variables go through their parser."""
    if field.encode_name in _PARSERS:
        return _PARSERS[field.encode_name](value)
    if isinstance(field.type, mi.LiteralType):
        return value.lower()
    if isinstance(field.type, mi.BoolType):
        return _BOOL_WORDS.get(value.lower(), value)
    return value


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value).expanduser()
    raise NotImplementedError(kind)


def _expected(kind: mi.Type) -> str:
    """What a value of ``kind`` must be, in words."""
    if isinstance(kind, mi.Metadata):
        description = (kind.extra_json_schema or {}).get("description")
        return str(description) if description else _expected(kind.type)
    if isinstance(kind, mi.BoolType):
        return "true or false"
    if isinstance(kind, mi.LiteralType):
        return f"one of {', '.join(map(str, kind.values))}"
    if isinstance(kind, mi.IntType | mi.FloatType):
        noun = "an integer" if isinstance(kind, mi.IntType) else "a number"
        return f"{noun} between {kind.ge} and {kind.le}"
    return f"a valid {type(kind).__name__.removesuffix('Type').lower()}"


def _config_error(exc: msgspec.ValidationError, raw: Mapping[str, object]) -> ConfigError:
    """msgspec's error ("... - at `$.INVENTORY_PORT`") as one line naming the variable,
    what it expects and the value it got."""
    where = re.search(r"- at `\$\.(\w+)(?:\[(\d+)\])?`$", str(exc))
    field = _ENV_FIELDS.get(where[1]) if where else None
    if where is None or field is None:
        return ConfigError(str(exc))
    value = raw[field.encode_name]
    if where[2] is not None and isinstance(field.type, mi.VarTupleType):  # one list item
        item = cast(list[str], value)[int(where[2])]
        return ConfigError(
            f"{field.encode_name}: {item!r} is not {_expected(field.type.item_type)}"
        )
    return ConfigError(f"{field.encode_name} must be {_expected(field.type)}, got {value!r}")
