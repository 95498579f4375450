"""``Settings.from_env``: the environment converted by msgspec, every bad value a one-line
:class:`ConfigError` that names the variable, what it expects and what it got."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from inventory.config import ConfigError, Settings


def test_defaults_and_empty_variables() -> None:
    empty = {"INVENTORY_PORT": "", "INVENTORY_HOST": "", "INVENTORY_DATABASE_URL": ""}
    assert Settings.from_env(empty) == Settings.from_env({})
    settings = Settings.from_env({})
    assert (settings.port, settings.workers, settings.host) == (8000, 1, "127.0.0.1")
    assert settings.database_url is None
    assert settings.embedded


def test_values_are_converted() -> None:
    settings = Settings.from_env(
        {
            "INVENTORY_PORT": " 9000 ",
            "INVENTORY_DB_TIMEOUT": "2.5",
            "INVENTORY_METRICS_PUBLIC": "Off",
            "INVENTORY_WEBHOOK_ALLOW_PRIVATE": "yes",
            "INVENTORY_READY_PUBLIC": "0",
            "INVENTORY_RESERVE_STRATEGY": "LOCK",
            "INVENTORY_DATA_DIR": "~/inv",
            "INVENTORY_REDIS_URL": "redis://h:1/0",
            "INVENTORY_TOKENS": '{"t": ["read"]}',
        }
    )
    assert settings.port == 9000
    assert settings.db_timeout == 2.5
    assert (settings.metrics_public, settings.ready_public) == (False, False)
    assert settings.webhook_allow_private is True
    assert settings.reserve_strategy == "lock"
    assert settings.data_dir == Path("~/inv").expanduser()
    assert settings.redis_url == "redis://h:1/0"
    assert list(settings.tokens.values()) == [frozenset({"read"})]


def test_tuning_knobs_without_a_variable_are_not_read() -> None:
    assert Settings.from_env({"INVENTORY_SWEEP_BATCH": "5", "sweep_batch": "5"}).sweep_batch == 1000


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PORT", "http", " must be an integer between 0 and 65535, got 'http'"),
        ("WORKERS", "0", " must be an integer between 1 and 64, got '0'"),
        ("WORKERS", "1.5", " must be an integer between 1 and 64, got '1.5'"),
        ("DB_TIMEOUT", "soon", " must be a number between 0.1 and 300, got 'soon'"),
        ("LOCK_WAIT", "-1", " must be a number between 0 and 60, got '-1'"),
        ("READY_PUBLIC", "maybe", " must be true or false, got 'maybe'"),
        ("LOG_LEVEL", "LOUD", " must be one of debug, error, info, warning, got 'loud'"),
        ("RESERVE_STRATEGY", "x", " must be one of lock, optimistic, got 'x'"),
        ("CORS_ORIGINS", "https://a.b, ftp://x", ": 'ftp://x' is not an origin like https://"),
        ("TOKENS", '{"t": ["write"]}', " must be a JSON object of token -> list of scopes"),
    ],
)
def test_bad_values_name_the_variable_and_what_it_expects(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({f"INVENTORY_{name}": value})
    assert str(raised.value).startswith(f"INVENTORY_{name}{message}")


def test_settings_survive_pickling_and_overrides() -> None:
    settings = Settings.from_env({"INVENTORY_CORS_ORIGINS": "https://A.example"})
    assert pickle.loads(pickle.dumps(settings)) == settings
    changed = settings.with_overrides(port=1, host=None)
    assert (changed.port, changed.host, changed.cors_origins) == (
        1,
        "127.0.0.1",
        settings.cors_origins,
    )
    assert Settings.from_env(changed.to_env()).workers == changed.workers
