"""The README's curl session, run against a fresh server: the README cannot drift.

Every ``$ curl ...`` command of the session (the first ``console`` block with curl in it)
runs against a new server on a new database; its output must match the README's line
with ids and times masked: a UUID matches any UUID (and the README's ids are replaced by
the real ones in later commands), an RFC 3339 time matches any time, ``"..."`` matches any
string and a trailing ``,...`` any further fields. ``inventory check`` must print what
the README shows.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

from .conftest import ROOT, ServerFactory

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z"


def session() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of the README's curl session, in order."""
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```console\n(.*?)```", text, re.S) if "$ curl" in b)
    steps: list[tuple[str, list[str]]] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            steps[-1][1].append(line)
            i += 1
            continue
        command = line[2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        steps.append((command, []))
        i += 1
    return steps


def pattern(expected: str) -> str:
    out = []
    for token in re.split(rf'({UUID}|{TIME}|"\.\.\."|,\.\.\.)', expected):
        if re.fullmatch(UUID, token):
            out.append(f"({UUID})")
        elif re.fullmatch(TIME, token):
            out.append(TIME)
        elif token == '"..."':
            out.append('"[^"]*"')
        elif token == ",...":
            out.append("(?:,.*)?")
        else:
            out.append(re.escape(token))
    return "".join(out)


def test_session_is_parsed() -> None:
    steps = session()
    assert sum(cmd.startswith("curl") for cmd, _ in steps) >= 5
    assert all(out for cmd, out in steps if cmd.startswith("curl"))


async def test_readme_curl_session(server_factory: ServerFactory, scratch_database: str) -> None:
    server = await server_factory(env={"INVENTORY_DATABASE_URL": scratch_database})
    ids: dict[str, str] = {}
    for command, expected in session():
        command = command.split("  #", 1)[0].strip()
        if command.startswith("inventory "):
            env = {**os.environ, "INVENTORY_DATABASE_URL": scratch_database}
            args = command.split()[1:]
            done = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "inventory.ops.cli", *args],
                capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
            )  # fmt: skip
            assert done.stdout.splitlines() == expected, done.stderr
            continue
        for readme_id, real in ids.items():
            command = command.replace(readme_id, real)
        command = command.replace("localhost:8000", f"127.0.0.1:{server.port}")
        done = await asyncio.to_thread(
            subprocess.run, ["bash", "-c", command], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        [want] = expected
        match = re.fullmatch(pattern(want), done.stdout.strip())
        assert match, f"$ {command}\nREADME: {want}\nserver: {done.stdout.strip()}"
        for readme_id, real in zip(re.findall(UUID, want), match.groups(), strict=True):
            ids.setdefault(readme_id, real)
