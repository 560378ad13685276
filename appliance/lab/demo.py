# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance lab demo`: the main job, end to end, on a lab host; each step is the real CLI command.

The lab host's disk is the lab guest, a small Linux that prints its marker when it boots. Each backup
is taken after a new marker is written, so the failover proves which point it booted; then a
consolidation thins the chain to the two newest points; last, the VM fails back to a repaired server
(another lab host, blank) and that disk boots with what the VM wrote.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from appliance.errors import LabError
from appliance.lab import Lab

HOST = "lab1"
REPAIRED = "repaired"


def _appliance(home: Path, *args: str) -> str:
    shown = shlex.join(["appliance", *args])
    print(f"\n$ {shown}", flush=True)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "appliance", "--home", str(home), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
    )  # fmt: skip
    print("\n".join(line for line in done.stdout.splitlines() if "[info     ]" not in line), flush=True)
    if done.returncode != 0:
        raise LabError(f"demo step failed (exit {done.returncode}): {shown}")
    print(f"  [{time.monotonic() - started:.1f} s]", flush=True)
    return done.stdout


def _quiet(home: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run([sys.executable, "-m", "appliance", "--home", str(home), *args],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if check and done.returncode != 0:
        raise LabError(f"demo step failed (exit {done.returncode}): appliance {shlex.join(args)}")
    return done.stdout


def run_demo(home: Path) -> None:
    lab = Lab(home / "lab")
    print("Tearing down any earlier demo ...", flush=True)
    if (home / "hosts" / f"{HOST}.json").exists():
        _quiet(home, "failover", "stop", HOST, check=False)
        _appliance(home, "host", "remove", HOST, "--purge")
    lab.down()
    _appliance(home, "lab", "up", "--host", HOST, "--disk-size", "1G")
    h = lab.host(HOST)
    _appliance(home, "host", "add", HOST, "--address", f"root@{h.address}", "--disk", h.disk,
               "--key", str(lab.key_file), "--trust-first-use")  # fmt: skip
    _appliance(home, "host", "set", HOST, "--boot-check", "console:APPLIANCE-GUEST-UP", "--vm-memory", "512")
    _appliance(home, "lab", "change", HOST, "--percent", "10", "--marker", "monday")
    _appliance(home, "backup", HOST)
    _appliance(home, "lab", "change", HOST, "--percent", "1", "--marker", "tuesday", "--seed", "2")
    _appliance(home, "backup", HOST)
    _appliance(home, "points", HOST)
    _appliance(home, "verify", HOST)
    first = json.loads(_quiet(home, "points", HOST, "--json"))[0]["id"]
    print("\nThe server dies. Boot Monday's point, the older one, as a VM:", flush=True)
    _appliance(home, "failover", HOST, "--point", first)
    _appliance(home, "failover", "status")
    _appliance(home, "failover", "stop", HOST)
    print("\nNightly consolidation: keep the two newest points; Monday's is merged into Tuesday's.", flush=True)
    autorun = "echo written-during-failover > /root/marker.txt; sync"
    _appliance(
        home, "lab", "change", HOST, "--percent", "1", "--marker", "wednesday", "--seed", "3", "--autorun", autorun
    )
    _appliance(home, "backup", HOST)
    _appliance(home, "host", "set", HOST, "--keep-last", "2")
    _appliance(home, "consolidate", HOST, "--dry-run")
    _appliance(home, "consolidate", HOST)
    _appliance(home, "points", HOST)
    _appliance(home, "verify", HOST)
    print("\nThe server dies again; its VM runs and writes (its marker becomes written-during-failover).", flush=True)
    _appliance(home, "failover", HOST)
    print("\nThe server is repaired (a blank disk): fail back while the VM runs, then cut over.", flush=True)
    _appliance(home, "lab", "up", "--host", REPAIRED, "--blank", "--data", "0", "--disk-size", "1G")
    r = lab.host(REPAIRED)
    _appliance(home, "failback", HOST, "--to", f"root@{r.address}", "--disk", f"{h.disk}={r.disk}", "--trust-first-use")
    _appliance(home, "failback", "status", HOST)
    _appliance(home, "lab", "boot", REPAIRED)
    _appliance(home, "points", HOST)
    print(f"\nDemo complete. The lab host is still up: try `appliance --home {home} failover {HOST}`; "
          f"`appliance --home {home} lab down` removes it.", flush=True)  # fmt: skip
