# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench failover`: RTO of a failover against the floor and the naive restore, in one run.

The guest is the lab guest; the RTO ends when it prints its UP line on the serial console. The floor is
the same guest's raw disk booted directly with qemu-system-x86_64; the naive path converts the point to
a standalone image with `qemu-img convert`, then boots that. All runs use TCG (this machine's KVM cannot
run guests) with the same memory, so only what differs between the paths shows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.lab import Lab, LabHost, guest
from appliance.lab.boot import boot_until_up

MEMORY = "512"
REPEAT = 3
_RTO = re.compile(r"RTO: ([0-9.]+) s")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_failover_bench(big: int = 64 << 30, big_data: int = 8 << 30) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-failover-", dir="/var/tmp"))
    home = work / "home"
    lab = Lab(work / "lab")
    appliance = [sys.executable, "-m", "appliance", "--home", str(home)]
    rows: list[tuple[str, str, float]] = []
    try:
        for name, size, data in (("small", 1 << 30, 0), ("big", big, big_data)):
            host = lab.up([name], disk_size=size, with_guest=True)[-1]
            _fill(host, data)
            _run([*appliance, "host", "add", name, "--address", f"root@{host.address}", "--disk", host.disk,
                  "--key", str(lab.key_file), "--trust-first-use"])  # fmt: skip
            _run([*appliance, "host", "set", name, "--boot-check", "console:APPLIANCE-GUEST-UP", "--vm-memory", MEMORY])
            _run([*appliance, "backup", name])
            label = f"{size >> 30} GiB" + (f", {data >> 30} GiB data" if data else "")
            rows.append(("floor: qemu-system-x86_64 on the raw disk", label,
                         _median([boot_until_up(Path(host.disk), "raw") for _ in range(REPEAT)])))  # fmt: skip
            rows.append(("appliance failover", label, _median([_failover(appliance, name) for _ in range(REPEAT)])))
            if data:
                rows.append(("naive: qemu-img convert, then boot", label, _naive(home, name, work)))
        _print(rows)
    finally:
        subprocess.run([*appliance, "failover", "stop", "small"], capture_output=True, check=False)
        subprocess.run([*appliance, "failover", "stop", "big"], capture_output=True, check=False)
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[3:])} failed: {done.stderr[-500:]}")
    return done.stdout


def _fill(host: LabHost, data: int) -> None:
    """`data` bytes of incompressible files in the guest's file system, 1 GiB at a time."""
    from appliance.lab.disks import noise

    for i in range(data >> 30):
        guest.write_file(host.disk, f"/data-{i}.bin", noise(1 << 30, seed=i))


def _failover(appliance: list[str], name: str) -> float:
    """The RTO the appliance reports: from the command's start to the guest's UP line."""
    out = _run([*appliance, "failover", name, "--accel", "tcg"])
    _run([*appliance, "failover", "stop", name])
    match = _RTO.search(out)
    if match is None:
        raise RuntimeError(f"no RTO in: {out}")
    return float(match.group(1))


def _naive(home: Path, name: str, work: Path) -> float:
    """Restore the newest point to a standalone image, then boot it: what a restore without instant boot costs."""
    point = max((home / "store" / name / "disk0").glob("*.qcow2"), key=lambda p: p.stat().st_mtime)
    restored = work / "restored.qcow2"
    subprocess.run(["sync"], check=False)
    started = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(point), str(restored)], check=True)
    subprocess.run(["sync"], check=False)
    converted = time.monotonic() - started
    total = converted + boot_until_up(restored, "qcow2")
    restored.unlink()
    return total


def _print(rows: list[tuple[str, str, float]]) -> None:
    print("\nfailover benchmark: the lab guest under TCG, RTO = start to the guest's UP line (median of 3)\n")
    print(f"{'path':<40} {'disk':<20} {'RTO s':>7}")
    for path, disk, seconds in rows:
        print(f"{path:<40} {disk:<20} {seconds:>7.2f}")
    rto = {(path.split(":")[0], disk.split(",")[0]): seconds for path, disk, seconds in rows}
    small, big = "1 GiB", next(d.split(",")[0] for _, d, _ in rows if d != "1 GiB")
    app_small, app_big = rto[("appliance failover", small)], rto[("appliance failover", big)]
    print("\ntargets:")
    print(f"  appliance above the floor, {small}     {app_small - rto[('floor', small)]:+.2f} s  (<= 1.5 s)")
    print(f"  appliance above the floor, {big}    {app_big - rto[('floor', big)]:+.2f} s  (<= 1.5 s)")
    print(f"  appliance {big} against {small}      {app_big - app_small:+.2f} s  (the same within noise)")
    print(f"  naive restore / appliance, {big}    {rto[('naive', big)] / app_big:.1f}x  (>= 10x)")
