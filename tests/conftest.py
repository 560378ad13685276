# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared fixtures: a sandboxed environment, the CLI as a subprocess, a lab of real sshd hosts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch a real APPLIANCE_HOME from a test."""
    for key in [k for k in os.environ if k.startswith("APPLIANCE_")]:
        monkeypatch.delenv(key, raising=False)


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith(("error:", "hint:"))]


def run_cli(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600, stdin: str | None = None
) -> Result:
    """The real `appliance` command, as a user runs it (`stdin`: what is piped to it)."""
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        input=stdin,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def start_cli(home: Path, *args: str) -> subprocess.Popen[str]:
    """The real `appliance` command in the background, to race it, cut it or kill it."""
    argv = [sys.executable, "-m", "appliance", "--home", str(home), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is required for this test: run ./install --dev")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def points_json(home: Path, host: str) -> list[dict[str, object]]:
    r = run_cli(home, "points", host, "--json")
    assert r.rc == 0, r.err
    return list(json.loads(r.out))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
