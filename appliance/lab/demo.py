# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance lab demo`: the main job, end to end, on a lab host; each step is the real CLI command."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from appliance.errors import LabError
from appliance.lab import Lab

HOST = "lab1"


def _appliance(home: Path, *args: str, check: bool = True) -> str:
    shown = shlex.join(["appliance", *args])
    print(f"\n$ {shown}", flush=True)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "--home", str(home), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    print(done.stdout.rstrip(), flush=True)
    if check and done.returncode != 0:
        raise LabError(f"demo step failed (exit {done.returncode}): {shown}")
    print(f"  [{time.monotonic() - started:.1f} s]", flush=True)
    return done.stdout


def run_demo(home: Path) -> None:
    lab = Lab(home / "lab")
    print("Tearing down any earlier demo ...", flush=True)
    lab.down()
    if (home / "hosts" / f"{HOST}.json").exists():
        _appliance(home, "host", "remove", HOST, "--purge")
    _appliance(home, "lab", "up", "--host", HOST, "--disk-size", "1G", "--data", "0.4")
    h = lab.host(HOST)
    _appliance(
        home,
        "host",
        "add",
        HOST,
        "--address",
        f"root@{h.address}",
        "--disk",
        h.disk,
        "--key",
        str(lab.key_file),
        "--trust-first-use",
    )
    _appliance(home, "backup", HOST)
    _appliance(home, "lab", "change", HOST, "--percent", "1")
    _appliance(home, "backup", HOST)
    _appliance(home, "points", HOST)
    _appliance(home, "verify", HOST)
    print(
        f"\nDemo complete. The lab host is still up: try `appliance --home {home} points {HOST}`; "
        f"`appliance --home {home} lab down` removes it.",
        flush=True,
    )
