# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench capture`: the appliance against rsync and OpenSSH `cat`, in one run, on one lab host.

All three pull the same disk through the same sshd. Bytes on the wire are the lab link's own counters
(both directions, TCP/IP and SSH framing included), so hash exchanges and protocol overhead count.
Peak RSS is the pulling process's own (`wait4`), on the appliance side.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.lab import Lab, LabHost, disks

KEY_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]


@dataclass
class Row:
    tool: str
    run: str
    seconds: float
    wire: int
    rss: int  # KiB
    note: str = ""


def _wire(host: LabHost) -> int:
    stats = Path("/sys/class/net") / host.veth / "statistics"
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def _measure(host: LabHost, argv: list[str], stdout: int | None = subprocess.DEVNULL) -> tuple[float, int, int]:
    """Run argv, return (seconds, bytes on the lab link, peak RSS in KiB of that process).

    GNU time reports the RSS: a child forked straight from this Python process would inherit its
    high-water mark across exec and report this process's size instead of its own.
    """
    with tempfile.NamedTemporaryFile("r") as rss_file:
        before = _wire(host)
        started = time.monotonic()
        done = subprocess.run(["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *argv], stdout=stdout,
                              stderr=subprocess.PIPE, check=False)
        seconds = time.monotonic() - started
        wire = _wire(host) - before
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')[-500:]}")
        return seconds, wire, int(rss_file.read().split()[-1])


def _changed_bytes(old: Path, new: str, granule: int = 4096) -> int:
    """Bytes of the 4 KiB blocks that differ between two versions of the disk: what a change really touched."""
    changed = 0
    with open(old, "rb") as a, open(new, "rb") as b:
        while True:
            x, y = a.read(8 << 20), b.read(8 << 20)
            if not x and not y:
                return changed
            if x != y:
                for i in range(0, max(len(x), len(y)), granule):
                    if x[i : i + granule] != y[i : i + granule]:
                        changed += granule


def _drop_caches() -> None:
    """Every run starts from the same state: the disk in the host's page cache, as a busy server has it."""
    subprocess.run(["sync"], check=False)


def run_capture_bench(home_root: Path, disk_size: int, data: float, change: float, block_size: str = "32K") -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="bench-capture-", dir="/var/tmp"))
    home = work / "home"
    lab = Lab(work / "lab")
    appliance = [sys.executable, "-m", "appliance", "--home", str(home)]
    rows: list[Row] = []
    try:
        host = lab.up(["bench1"], disk_size=disk_size, data_fraction=data)[0]
        subprocess.run([*appliance, "host", "add", "bench1", "--address", f"root@{host.address}", "--disk", host.disk,
                        "--key", str(lab.key_file), "--trust-first-use", "--block-size", block_size,
                        "--python", "/usr/bin/python3"], check=True, capture_output=True)
        ssh = ["ssh", "-i", str(lab.key_file), *KEY_OPTS, "-c", "aes128-gcm@openssh.com"]
        remote = f"root@{host.address}"
        rsync_copy = work / "rsync-copy.img"
        rsync = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "-e", " ".join(ssh)]

        _drop_caches()
        s, w, r = _measure(host, [*appliance, "backup", "bench1"])
        rows.append(Row("appliance", "full", s, w, r))
        s, w, r = _measure(host, [*ssh, remote, "cat", host.disk])
        rows.append(Row("OpenSSH cat", "full", s, w, r))
        s, w, r = _measure(host, [*rsync, f"{remote}:{host.disk}", str(rsync_copy)])
        rows.append(Row("rsync", "full", s, w, r))

        old = work / "before-change.img"
        shutil.copyfile(host.disk, old)
        disks.write_extents(host.disk, disk_size, change, seed=17)
        really_changed = _changed_bytes(old, host.disk)
        old.unlink()

        _drop_caches()
        s, w, r = _measure(host, [*appliance, "backup", "bench1"])
        rows.append(Row("appliance", f"{change:.0%} changed", s, w, r))
        s, w, r = _measure(host, [*rsync, f"{remote}:{host.disk}", str(rsync_copy)])
        rows.append(Row("rsync", f"{change:.0%} changed", s, w, r))
        s, w, r = _measure(host, [*ssh, remote, "cat", host.disk])
        rows.append(Row("OpenSSH cat", f"{change:.0%} changed", s, w, r))
        _print(rows, disk_size, data, really_changed)
        return rows
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def _print(rows: list[Row], disk_size: int, data: float, really_changed: int) -> None:
    mib = 1 << 20
    full_cat = next(r for r in rows if r.tool == "OpenSSH cat" and r.run == "full")
    print(f"\ncapture benchmark: {disk_size / (1 << 30):.1f} GiB disk, ~{data:.0%} data, "
          f"then {really_changed / mib:.1f} MiB really changed (4 KiB blocks that differ)\n")
    print(f"{'tool':<12} {'run':<12} {'seconds':>8} {'MB/s':>8} {'wire MiB':>9} {'wire/changed':>13} {'peak RSS MiB':>13}")
    for r in rows:
        rate = disk_size / r.seconds / 1e6
        ratio = f"{r.wire / really_changed:.2f}x" if r.run != "full" else "-"
        print(f"{r.tool:<12} {r.run:<12} {r.seconds:>8.2f} {rate:>8.0f} {r.wire / mib:>9.1f} {ratio:>13} {r.rss / 1024:>13.0f}")
    app_full = next(r for r in rows if r.tool == "appliance" and r.run == "full")
    app_inc = next(r for r in rows if r.tool == "appliance" and r.run != "full")
    rsync_inc = next(r for r in rows if r.tool == "rsync" and r.run != "full")
    print("\ntargets:")
    print(f"  full throughput vs OpenSSH cat   {full_cat.seconds / app_full.seconds:.2f}x   (target >= 0.8x)")
    print(f"  incremental wire vs rsync        {app_inc.wire / rsync_inc.wire:.2f}x   (target <= 1.0x)")
    print(f"  incremental wire vs changed      {app_inc.wire / really_changed:.2f}x   (target <= 1.5x)")
    print(f"  incremental time vs rsync        {app_inc.seconds / rsync_inc.seconds:.2f}x   (target <= 0.5x)")
