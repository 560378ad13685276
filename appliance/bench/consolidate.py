# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench consolidate`: merging a point away against the peers' ways of thinning a chain,
and the cost of reading through a deep chain.

A real 10-point chain taken by the appliance from a lab host (2 GiB, 40 % data, 1 % changed between
points). Dropping the middle point is timed three ways, each on its own copy of the chain: the
appliance's merge (commit of the child into the dropped point, then rename), `qemu-img convert` of the
point to a standalone image (a full rewrite), and `qemu-img commit` of the point down into the base.
Bytes written are each process's own block writes (GNU time's %O, 512-byte units).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.lab import Lab
from appliance.store import catalog
from appliance.store.layout import Home


def _measured(argv: list[str]) -> tuple[float, int]:
    """(seconds, bytes written) of a command and its children."""
    with tempfile.NamedTemporaryFile("r") as out:
        subprocess.run(["sync"], check=False)
        started = time.monotonic()
        subprocess.run(["/usr/bin/time", "-q", "-f", "%O", "-o", out.name, *argv], check=True, capture_output=True)
        subprocess.run(["sync"], check=False)
        return time.monotonic() - started, int(out.read().split()[-1]) * 512


def run_consolidate_bench(size: int = 2 << 30, points: int = 10, deep: int = 100) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-consolidate-", dir="/var/tmp"))
    home = Home(work / "home")
    lab = Lab(work / "lab")
    appliance = [sys.executable, "-m", "appliance", "--home", str(home.root)]
    try:
        host = lab.up(["bench1"], disk_size=size, data_fraction=0.4)[0]
        subprocess.run([*appliance, "host", "add", "bench1", "--address", f"root@{host.address}", "--disk", host.disk,
                        "--key", str(lab.key_file), "--trust-first-use"], check=True, capture_output=True)  # fmt: skip
        for n in range(points):
            if n:
                lab.change("bench1", 0.01, seed=n)
            subprocess.run([*appliance, "backup", "bench1"], check=True, capture_output=True)
        chain = catalog.load(home.chain_dir("bench1"), "bench1")
        middle = chain.points[points // 2]
        folder = home.chain_dir("bench1") / "disk0"
        child = chain.points[points // 2 + 1]
        data = (folder / f"{middle.id}.qcow2").stat().st_blocks * 512
        child_data = (folder / f"{child.id}.qcow2").stat().st_blocks * 512
        rows = []
        copy = work / "copy"
        shutil.copytree(folder, copy)
        point_copy, base_copy = copy / f"{middle.id}.qcow2", copy / f"{chain.points[0].id}.qcow2"
        convert = ["qemu-img", "convert", "-O", "qcow2", str(point_copy), str(work / "x.qcow2")]
        rows.append(("qemu-img convert (full rewrite)", *_measured(convert)))
        (work / "x.qcow2").unlink()
        commit = ["qemu-img", "commit", "-b", str(base_copy), str(point_copy)]
        rows.append(("qemu-img commit into the base", *_measured(commit)))
        shutil.rmtree(copy)
        script = (
            "import sys, time; from appliance import bootstrap; from appliance.services.consolidate import drop_point; "
            "h = bootstrap.home(sys.argv[1]); t = time.monotonic(); "
            "drop_point(h, bootstrap.tools(h), 'bench1', sys.argv[2]); "
            "open(sys.argv[3], 'w').write(str(time.monotonic() - t))"
        )
        inner = work / "merge-seconds"
        merge = [sys.executable, "-c", script, str(home.root), middle.id, str(inner)]
        seconds, written = _measured(merge)
        rows.append(("appliance merge, with Python's start", seconds, written))
        rows.append(("appliance merge itself", float(inner.read_text()), written))
        print(f"\nconsolidation benchmark: {size >> 30} GiB disk, 40 % data, {points} points of 1 % changes;")
        print(f"dropping point {points // 2 + 1} ({data >> 20} MiB of own data; child {child_data >> 20} MiB)\n")
        print(f"{'way':<36} {'seconds':>8} {'MiB written':>12}")
        for way, seconds, written in rows:
            print(f"{way:<36} {seconds:>8.2f} {written / (1 << 20):>12.1f}")
        full = rows[0]
        print(
            f"\ntargets: the merge writes {rows[3][2] / full[2]:.3f}x of the full rewrite's bytes (<= 0.1x) and "
            f"takes {rows[3][1] / full[1]:.2f}x of its time ({rows[2][1] / full[1]:.2f}x with Python's start)"
        )
        _deep_chain(work, size, deep)
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def _deep_chain(work: Path, size: int, depth: int) -> None:
    """Read the whole disk through QEMU at depth 1 and at `depth` (points of 2 MiB changes each)."""
    folder = work / "deep"
    folder.mkdir()
    opts = ["-o", "cluster_size=32k"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(folder / "c0.qcow2"), str(size)], check=True)
    subprocess.run(["qemu-io", "-c", f"write -P 0x11 0 {int(size * 0.4)}", str(folder / "c0.qcow2")], check=True,
                   capture_output=True)  # fmt: skip
    for i in range(1, depth):
        img = folder / f"c{i}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, "-b", f"c{i - 1}.qcow2", "-F", "qcow2",
                        str(img)], check=True, cwd=folder)  # fmt: skip
        offset = (i * 7919 % (size >> 21)) << 21
        subprocess.run(["qemu-io", "-c", f"write -P {i % 250 + 1} {offset} 2M", str(img)], check=True,
                       capture_output=True)  # fmt: skip
    reads = [arg for off in range(0, size, 64 << 20) for arg in ("-c", f"read {off} {64 << 20}")]
    results = {}
    for top in (0, depth - 1):
        times = []
        for _ in range(3):
            started = time.monotonic()
            subprocess.run(["qemu-io", "-r", "-f", "qcow2", *reads, str(folder / f"c{top}.qcow2")], check=True,
                           capture_output=True)  # fmt: skip
            times.append(time.monotonic() - started)
        results[top + 1] = sorted(times)[1]
    print(f"\ndeep chains: reading the whole {size >> 30} GiB disk through QEMU (qemu-io, median of 3)")
    for depth_, seconds in results.items():
        print(f"  depth {depth_:>3}: {seconds:.2f} s, {size / seconds / 1e6:.0f} MB/s")
    cost = results[depth] / results[1] - 1
    print(f"  depth {depth} costs {cost:+.0%} against depth 1 (bound the depth if > +20 %)")
