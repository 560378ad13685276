# SPDX-License-Identifier: GPL-2.0-or-later
"""The code's own rules, checked on every run: style, strict typing, and the layers (import-linter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "appliance", "tests"],
        ["ruff", "format", "--check", "appliance", "tests"],
        ["mypy"],
        ["lint-imports"],
    ],
    ids=["ruff", "format", "mypy", "layers"],
)
def test_tool_passes(argv: list[str]) -> None:
    done = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
