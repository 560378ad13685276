# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench capture`: the appliance against rsync and OpenSSH `cat`, in one run, on one lab host.

All three pull the same disk through the same sshd. Bytes on the wire are the lab link's own counters
(both directions, TCP/IP and SSH framing included), so hash exchanges and protocol overhead count.
Peak RSS is the pulling process's own (`wait4`), on the appliance side.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.lab import Lab, LabHost, disks

KEY_OPTS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]


REPEAT = 3


def _median(samples: list[tuple[float, int, int]]) -> tuple[float, int, int]:
    return sorted(samples)[len(samples) // 2]


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
        done = subprocess.run(
            ["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name, *argv],
            stdout=stdout,
            stderr=subprocess.PIPE,
            check=False,
        )
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


def _cache(state: str, *paths: str | Path) -> None:
    """'cold': drop the page cache, as for a server whose disk is not in memory; 'warm': read it in."""
    subprocess.run(["sync"], check=False)
    if state == "cold":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    else:
        for p in paths:
            subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=False)


def run_capture_bench(
    home_root: Path, disk_size: int, data: float, change: float, block_size: str = "32K", big: int = 64 << 30
) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="bench-capture-", dir="/var/tmp"))
    home = work / "home"
    lab = Lab(work / "lab")
    appliance = [sys.executable, "-m", "appliance", "--home", str(home)]
    rows: list[Row] = []

    def add(host: LabHost) -> None:
        subprocess.run(
            [
                *appliance,
                "host",
                "add",
                host.name,
                "--address",
                f"root@{host.address}",
                "--disk",
                host.disk,
                "--key",
                str(lab.key_file),
                "--trust-first-use",
                "--block-size",
                block_size,
                "--python",
                "/usr/bin/python3",
            ],
            check=True,
            capture_output=True,
        )

    try:
        host = lab.up(["bench1"], disk_size=disk_size, data_fraction=data)[0]
        add(host)
        ssh = ["ssh", "-i", str(lab.key_file), *KEY_OPTS, "-c", "aes128-gcm@openssh.com"]
        remote = f"root@{host.address}"
        rsync_copy = work / "rsync-copy.img"
        rsync = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "-e", " ".join(ssh)]
        runs = {
            "appliance": [*appliance, "backup", "bench1"],
            "rsync": [*rsync, f"{remote}:{host.disk}", str(rsync_copy)],
            "OpenSSH cat": [*ssh, remote, "cat", host.disk],
        }
        for tool in ("appliance", "OpenSSH cat", "rsync"):
            samples = []
            for _ in range(REPEAT):  # the median of three: this machine's disk writeback is noisy
                if tool == "appliance":
                    subprocess.run([*appliance, "host", "remove", "bench1", "--purge"], check=True, capture_output=True)
                    add(host)
                elif tool == "rsync":
                    rsync_copy.unlink(missing_ok=True)
                _cache("warm", host.disk)
                samples.append(_measure(host, runs[tool]))
            rows.append(Row(tool, "full", *_median(samples), note="warm"))
        changed = {}
        for seed, cache in ((17, "warm"), (18, "cold")):
            old = work / "before-change.img"
            shutil.copyfile(host.disk, old)
            disks.write_extents(host.disk, disk_size, change, seed=seed)
            changed[cache] = _changed_bytes(old, host.disk)
            old.unlink()
            for tool in ("appliance", "rsync"):
                _cache(cache, host.disk, rsync_copy)
                rows.append(Row(tool, f"{change:.0%} changed", *_measure(host, runs[tool]), note=cache))
        _print(rows, disk_size, data, changed)
        if big:
            _big_disk(lab, add, appliance, big)
        return rows
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def _big_disk(lab: Lab, add: Callable[[LabHost], None], appliance: list[str], size: int) -> None:
    """Appliance memory must not grow with the disk: a large sparse disk with 1 GiB of data."""
    host = lab.up(["bench2"], disk_size=size, data_fraction=(1 << 30) / size)[1]
    add(host)
    full = _measure(host, [*appliance, "backup", host.name])
    disks.write_extents(host.disk, size, (64 << 20) / size, seed=3)
    inc = _measure(host, [*appliance, "backup", host.name])
    print(
        f"\n{size >> 30} GiB sparse disk with 1 GiB of data: full {full[0]:.1f} s, peak RSS {full[2] / 1024:.0f} MiB; "
        f"incremental (64 MiB changed) {inc[0]:.1f} s, peak RSS {inc[2] / 1024:.0f} MiB   (target < 200 MiB)"
    )


def _print(rows: list[Row], disk_size: int, data: float, changed: dict[str, int]) -> None:
    mib = 1 << 20
    print(
        f"\ncapture benchmark: {disk_size / (1 << 30):.1f} GiB disk, ~{data:.0%} data; each change touches "
        f"{changed['warm'] / mib:.1f} / {changed['cold'] / mib:.1f} MiB (4 KiB blocks that differ)\n"
    )
    header = ("tool", "run", "cache", "seconds", "MB/s", "wire MiB", "wire/changed", "RSS MiB")
    print("{:<12} {:<11} {:<5} {:>8} {:>6} {:>9} {:>12} {:>8}".format(*header))
    for r in rows:
        ratio = f"{r.wire / changed[r.note]:.2f}x" if r.run != "full" else "-"
        print(
            f"{r.tool:<12} {r.run:<11} {r.note:<5} {r.seconds:>8.2f} {disk_size / r.seconds / 1e6:>6.0f} "
            f"{r.wire / mib:>9.1f} {ratio:>12} {r.rss / 1024:>8.0f}"
        )

    def pick(tool: str, run: str, note: str = "warm") -> Row:
        return next(r for r in rows if r.tool == tool and (r.run == "full") == (run == "full") and r.note == note)

    print("\ntargets:")
    full_ratio = pick("OpenSSH cat", "full").seconds / pick("appliance", "full").seconds
    print(f"  full throughput vs OpenSSH cat       {full_ratio:.2f}x  (>= 0.8x)")
    for note in ("warm", "cold"):
        app, peer = pick("appliance", "inc", note), pick("rsync", "inc", note)
        print(f"  incremental wire vs rsync ({note})     {app.wire / peer.wire:.2f}x  (<= 1.0x)")
        print(f"  incremental wire vs changed ({note})   {app.wire / changed[note]:.2f}x  (<= 1.5x)")
        print(f"  incremental time vs rsync ({note})     {app.seconds / peer.seconds:.2f}x  (<= 0.5x)")
