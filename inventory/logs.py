"""Structured logging on the standard library: one JSON object per line.

Every record carries the request id of the HTTP request it was logged under (a
context variable set by the request-id middleware) and, with tracing on, the trace and
span ids of the span it was logged in. Nothing here ever logs a header or a
token; configuration values with secrets are never passed to the logger.

Every line is also redacted on its way out (:func:`redact`), whoever logged it: uvicorn
logs WebSocket handshakes with their query string at INFO, and with debug logging the
``websockets`` protocol logs request headers and uvicorn's trace level whole ASGI scopes.
Credentials in those (``Authorization`` values, bearer tokens, ``ticket=``/``token=``/
``secret=``/``password=`` parameters, ``"secret"``/``"token"`` fields of JSON or reprs, as
in a webhook registration body) become ``[redacted]`` before the line is written, at every
level. :func:`redact` also cleans span attributes (:mod:`inventory.ops.tracing`).
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "redact",
    "request_id_var",
    "set_trace_ids",
    "uvicorn_log_config",
]

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

TraceIds = Callable[[], tuple[str, str] | None]

# Installed by inventory.ops.tracing when tracing is on (so this module never imports
# OpenTelemetry): the current span's (trace_id, span_id) in hex, or None outside a span.
_trace_ids: TraceIds | None = None


def set_trace_ids(getter: TraceIds | None) -> None:
    """Make JSON log lines carry ``trace_id`` and ``span_id`` (``None``: stop)."""
    global _trace_ids
    _trace_ids = getter


_REDACTIONS = (
    # A credential as a query parameter, in a URL or a raw query string (b'ticket=...').
    (
        re.compile(
            r"(?i)((?:^|[?&;\s'\"(])"
            r"(?:ticket|token|access_token|secret|password|api_key|apikey)=)[^&\s'\"#\\]+"
        ),
        r"\1[redacted]",
    ),
    # A credential field of a JSON object or a repr: "secret": "x", 'token': b'x', and
    # the same with escaped quotes (a JSON body inside a JSON log line).
    (
        re.compile(
            r"(?i)((?:\\?['\"])(?:secret|token|ticket|password)\\?['\"]\s*:\s*b?\\?['\"])"
            r"[^'\"\\]*"
        ),
        r"\1[redacted]",
    ),
    # An Authorization header's value: "authorization: x", ('authorization', b'x'), ...
    (
        re.compile(r"(?i)(authorization['\"]?\s*[:=,]\s*(?:b?['\"])?)[^'\"\r\n\\]+"),
        r"\1[redacted]",
    ),
    # A bearer credential wherever it appears.
    (re.compile(r"(?i)\b(bearer\s+)[^\s'\"\\,;]+"), r"\1[redacted]"),
)


def redact(line: str) -> str:
    """``line`` with every credential it carries replaced by ``[redacted]``."""
    for pattern, replacement in _REDACTIONS:
        line = pattern.sub(replacement, line)
    return line


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", "request_id"?, "trace_id"?, "span_id"?, "exc"?,
    ...extra}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        if _trace_ids is not None and (ids := _trace_ids()) is not None:
            entry["trace_id"], entry["span_id"] = ids
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal, redacted like the JSON ones."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _formatter(fmt: str) -> dict[str, Any]:
    if fmt == "json":
        return {"()": JsonFormatter}
    return {"()": TextFormatter, "format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}


def uvicorn_log_config(fmt: str, level: str) -> dict[str, Any]:
    """A ``logging.config`` dict for uvicorn (and our loggers) in worker processes."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": _formatter(fmt)},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": level.upper()},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"level": "WARNING"},
        },
    }


def configure_logging(fmt: str, level: str) -> None:
    import logging.config

    logging.config.dictConfig(uvicorn_log_config(fmt, level))


def default_format() -> Literal["text", "json"]:
    """Readable text on a terminal, JSON lines otherwise."""
    return "text" if sys.stderr.isatty() else "json"
