# SPDX-License-Identifier: GPL-2.0-or-later
"""Consistency and change tracking, measured: what each way of taking a point costs and whether it restores.

Two parts, one run:
- a busy server (appliance.lab.server: a real Debian 12 guest writing all the time) backed up by each
  method: today's live read, a freeze for the whole read (`fsfreeze` hooks), the frozen moment with
  tracing, and the change-tracked incremental of a kept reader. Per method: seconds per point, bytes
  read on the host, bytes on the wire, the workload's longest stall, and whether every point restored
  clean (journal replayed, e2fsck, every row and file checksum).
- a 64 GiB disk (a loop device) with 1 % of it changed: the change-tracked point against the full hash
  pass and rsync.
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

from appliance import bootstrap
from appliance.bench import busy_server
from appliance.bench.capture import KEY_OPTS, _measure, _wire
from appliance.domain.models import Point, format_size
from appliance.lab import Lab, LabHost, disks
from appliance.services.backup import back_up
from appliance.services.reader_pool import ReaderPool
from appliance.store.layout import Home


@dataclass
class TrackedRow:
    tool: str
    seconds: float
    read: int  # bytes read on the host
    wire: int


def run_consistency_bench(big: int = 64 << 30, data: int = 4 << 30, change: float = 0.01) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-consistency-", dir="/var/tmp"))
    try:
        rows = _tracked(work, big, data, change)
        _print_tracked(rows, big, data, change)
        busy_server.run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _add(appliance: list[str], lab: Lab, host: LabHost) -> None:
    subprocess.run(
        [*appliance, "host", "add", host.name, "--address", f"root@{host.address}", "--disk", host.disk,
         "--key", str(lab.key_file), "--trust-first-use", "--python", "/usr/bin/python3"],
        check=True, capture_output=True,
    )  # fmt: skip


def _tracked(work: Path, size: int, data: int, change: float) -> list[TrackedRow]:
    """One loop device of `size` bytes with `data` bytes of data; `change` of it rewritten before each run."""
    lab = Lab(work / "lab")
    home = Home(work / "home")
    appliance = [sys.executable, "-m", "appliance", "--home", str(home.root)]
    rows = []
    try:
        host = lab.up(["track1"], disk_size=size, data_fraction=data / size, loop=True)[0]
        _add(appliance, lab, host)
        tools = bootstrap.tools(home)
        readers = ReaderPool()
        try:
            back_up(home, tools, host.name, pool=readers)  # the first point: a full read; the reader stays
            _rewrite(host, size, change, seed=41)
            rows.append(
                _timed("appliance, change-tracked", host, lambda: back_up(home, tools, host.name, pool=readers))
            )
        finally:
            readers.close()
        _rewrite(host, size, change, seed=42)
        rows.append(_timed("appliance, hash pass", host, lambda: back_up(home, tools, host.name)))
        rows.append(_rsync(work, lab, host, size, change))
    finally:
        lab.down()
    return rows


def _rewrite(host: LabHost, size: int, change: float, seed: int) -> None:
    disks.write_extents(host.disk, size, change, seed=seed)
    subprocess.run(["sync"], check=True)


def _timed(tool: str, host: LabHost, take: Callable[[], Point]) -> TrackedRow:
    before = _wire(host)
    started = time.monotonic()
    point = take()
    seconds = time.monotonic() - started
    return TrackedRow(tool, seconds, sum(d.read_bytes for d in point.disks), _wire(host) - before)


def _rsync(work: Path, lab: Lab, host: LabHost, size: int, change: float) -> TrackedRow:
    """rsync of the disk's image (the loop device's backing file): a first copy, a change, then the measured run."""
    copy = work / "rsync-copy.img"
    ssh = " ".join(["ssh", "-i", str(lab.key_file), *KEY_OPTS, "-c", "aes128-gcm@openssh.com"])
    argv = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--sparse", "-e", ssh,
            f"root@{host.address}:{host.image}", str(copy)]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True)
    _rewrite(host, size, change, seed=43)
    seconds, wire, _ = _measure(host, argv)
    return TrackedRow("rsync", seconds, 2 * size, wire)  # it reads the whole image on both sides


def _print_tracked(rows: list[TrackedRow], size: int, data: int, change: float) -> None:
    changed = int(size * change)
    print(
        f"\nchange tracking: {format_size(size)} disk (a loop device) with {format_size(data)} of data; "
        f"{change:.0%} of it ({format_size(changed)}) rewritten before each run"
    )
    print(f"\n    {'tool':28} {'seconds':>8} {'read on host':>13} {'read/changed':>13} {'wire':>10}")
    for r in rows:
        print(
            f"    {r.tool:28} {r.seconds:8.1f} {format_size(r.read):>13} {r.read / changed:12.2f}x "
            f"{format_size(r.wire):>10}"
        )
    by = {r.tool: r for r in rows}
    tracked, hashed = by["appliance, change-tracked"], by["appliance, hash pass"]
    print("\n    targets:")
    print(f"      change-tracked read vs changed bytes     {tracked.read / changed:.2f}x  (<= 1.2x)")
    print(f"      change-tracked time vs hash pass         {tracked.seconds / hashed.seconds:.2f}x  (<= 0.2x)")
    print(f"      change-tracked time vs rsync             {tracked.seconds / by['rsync'].seconds:.2f}x")
