"""One embedded Valkey per data directory (inventory.embedded)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from inventory.ops.embedded import EmbeddedError, EmbeddedValkey, free_port

from .test_cli import ROOT, _serve, _wait_ready


def test_a_second_valkey_on_one_directory_is_refused_until_the_first_stops(
    tmp_path: Path,
) -> None:
    first = EmbeddedValkey(tmp_path / "valkey")
    first.start()
    try:
        with pytest.raises(EmbeddedError, match=f"process {os.getpid()}, Valkey on port"):
            EmbeddedValkey(tmp_path / "valkey").start()
        assert redis.Redis.from_url(first.url).ping()  # the first one is untouched
    finally:
        first.stop()
    second = EmbeddedValkey(tmp_path / "valkey")
    second.start()
    second.stop()


def test_second_serve_on_one_data_directory_refuses_with_a_clear_message(
    tmp_path: Path,
) -> None:
    """The second ``inventory serve`` on the same data directory exits at once with a
    one-line explanation instead of running on a Valkey of its own."""
    port = free_port()
    first = _serve(tmp_path, port)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", first, 60)
        env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
        second = subprocess.run(
            [sys.executable, "-m", "inventory.ops.cli", "serve", "--data-dir", str(tmp_path),
             "--port", str(free_port())],
            env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert second.returncode != 0
        assert "another inventory server already runs on the data directory" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one still serves
        _wait_ready(f"http://127.0.0.1:{port}", first, 5)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
