# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench failover`: RTO of a failover against the floor and the naive restore, in one run.

The guest is the lab guest; the RTO ends when it prints its UP line on the serial console. The floor is
the same guest's raw disk booted directly with qemu-system-x86_64; the naive path converts the point to
a standalone image with `qemu-img convert`, then boots that. The appliance chooses its accelerator as a
user's failover does (`--accel auto`: KVM, or TCG where KVM fails); the floor and the naive path boot
with the accelerator it ended up with and the same memory, so only what differs between the paths shows.
The time libvirt takes to start an empty domain (`virsh create`) is shown too: on a machine where
libvirt's QEMU capabilities cache does not stay valid, it is most of the gap to the floor.
"""

from __future__ import annotations

import re
import secrets
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
_ACCEL = re.compile(r"is running point .* \((KVM|TCG)\)")
Row = tuple[str, str, str, float, list[float]]  # path, disk, accel, median seconds, each run


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def run_failover_bench(big: int = 64 << 30, big_data: int = 8 << 30) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-failover-", dir="/var/tmp"))
    home = work / "home"
    lab = Lab(work / "lab")
    appliance = [sys.executable, "-m", "appliance", "--home", str(home)]
    rows: list[Row] = []
    notes: set[str] = set()  # what the appliance said when it fell back from KVM
    try:
        for name, size, data in (("small", 1 << 30, 0), ("big", big, big_data)):
            host = lab.up([name], disk_size=size, with_guest=True)[-1]
            _fill(host, data)
            _run([*appliance, "host", "add", name, "--address", f"root@{host.address}", "--disk", host.disk,
                  "--key", str(lab.key_file), "--trust-first-use"])  # fmt: skip
            _run([*appliance, "host", "set", name, "--boot-check", "console:APPLIANCE-GUEST-UP", "--vm-memory", MEMORY])
            _run([*appliance, "backup", name])
            label = f"{size >> 30} GiB" + (f", {data >> 30} GiB data" if data else "")
            app_runs: list[float] = []
            floor_runs: list[float] = []
            for _ in range(REPEAT):  # interleaved, so that a busy moment of the machine slows both alike
                rto, accel, note = _failover(appliance, name)
                app_runs.append(rto)
                notes.add(note)
                floor_runs.append(boot_until_up(Path(host.disk), "raw", accel=accel))
            rows.append(("libvirt: virsh create of an empty domain", "-", accel, _virsh_create_empty(accel, work), []))
            rows.append(("floor: qemu-system-x86_64 on the raw disk", label, accel, _median(floor_runs), floor_runs))
            rows.append(("appliance failover", label, accel, _median(app_runs), app_runs))
            if data:
                rows.append(("naive: qemu-img convert, then boot", label, accel, _naive(home, name, work, accel), []))
        _print(rows, sorted(n for n in notes if n))
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


def _failover(appliance: list[str], name: str) -> tuple[float, str, str]:
    """The RTO the appliance reports (from the command's start to the guest's UP line), the accelerator
    it ended up with, and its KVM fallback line if it had to fall back."""
    done = subprocess.run([*appliance, "failover", name], capture_output=True, text=True, check=False)
    _run([*appliance, "failover", "stop", name])
    rto, accel = _RTO.search(done.stdout), _ACCEL.search(done.stdout)
    if done.returncode != 0 or rto is None or accel is None:
        raise RuntimeError(f"failover {name} failed: {done.stdout[-300:]} {done.stderr[-500:]}")
    fallback = next((line for line in done.stderr.splitlines() if line.startswith("KVM failed")), "")
    return float(rto.group(1)), accel.group(1).lower(), fallback


def _virsh_create_empty(accel: str, work: Path) -> float:
    """Seconds `virsh create` takes to start a domain with no disk (median of 3): libvirt's own cost of a
    VM start, which grows by seconds when its QEMU capabilities cache does not stay valid."""
    return _median([_virsh_create_once(accel, work) for _ in range(REPEAT)])


def _virsh_create_once(accel: str, work: Path) -> float:
    name = f"bench-empty-{secrets.token_hex(3)}"
    xml = work / f"{name}.xml"
    xml.write_text(
        f"<domain type='{'kvm' if accel == 'kvm' else 'qemu'}'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>"
    )
    virsh = ["virsh", "-q", "-c", "qemu:///system"]
    started = time.monotonic()
    subprocess.run([*virsh, "create", str(xml)], capture_output=True, check=True)
    seconds = time.monotonic() - started
    subprocess.run([*virsh, "destroy", name], capture_output=True, check=False)
    return seconds


def _naive(home: Path, name: str, work: Path, accel: str) -> float:
    """Restore the newest point to a standalone image, then boot it: what a restore without instant boot costs."""
    point = max((home / "store" / name / "disk0").glob("*.qcow2"), key=lambda p: p.stat().st_mtime)
    restored = work / "restored.qcow2"
    subprocess.run(["sync"], check=False)
    started = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(point), str(restored)], check=True)
    subprocess.run(["sync"], check=False)
    converted = time.monotonic() - started
    total = converted + boot_until_up(restored, "qcow2", accel=accel)
    restored.unlink()
    return total


def _print(rows: list[Row], notes: list[str]) -> None:
    print("\nfailover benchmark: the lab guest, RTO = start to the guest's UP line (median of 3)\n")
    print(f"{'path':<42} {'disk':<19} {'accel':<6} {'seconds':>7}  runs")
    for path, disk, accel, seconds, runs in rows:
        print(f"{path:<42} {disk:<19} {accel:<6} {seconds:>7.2f}  {' '.join(f'{r:.2f}' for r in runs)}")
    for note in notes:
        print(f"  (an appliance run fell back and said: {note})")
    rto = {(path.split(":")[0], disk.split(",")[0]): seconds for path, disk, _, seconds, _ in rows}
    small, big = "1 GiB", next(d.split(",")[0] for _, d, _, _, _ in rows if d not in ("1 GiB", "-"))
    app_small, app_big = rto[("appliance failover", small)], rto[("appliance failover", big)]
    print("\ntargets:")
    print(f"  appliance above the floor, {small}     {app_small - rto[('floor', small)]:+.2f} s  (<= 1.5 s)")
    print(f"  appliance above the floor, {big}    {app_big - rto[('floor', big)]:+.2f} s  (<= 1.5 s)")
    print(f"  appliance {big} against {small}      {app_big - app_small:+.2f} s  (the same within noise)")
    print(f"  naive restore / appliance, {big}    {rto[('naive', big)] / app_big:.1f}x  (>= 10x)")
