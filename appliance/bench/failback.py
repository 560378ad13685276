# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench failback`: failback to a blank target and to one holding the original point, with
the guest writing all along, against the naive path (stop the VM, `qemu-img convert` to raw, stream
it with OpenSSH `cat`). Bytes on the wire are the target link's own counters."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.bench.capture import KEY_OPTS, _changed_bytes, _wire
from appliance.lab import Lab, LabHost, guest

CHURN = (  # the guest keeps writing new data, 4 MiB a second, as a busy server does
    "( i=0; while :; do dd if=/dev/urandom of=/root/new-$i.bin bs=1M count=4 2>/dev/null; sync; "
    "i=$((i+1)); sleep 1; done ) &\n"
)


def run_failback_bench(size: int = 2 << 30, data: float = 0.4) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-failback-", dir="/var/tmp"))
    home = work / "home"
    lab = Lab(work / "lab")
    app = [sys.executable, "-m", "appliance", "--home", str(home)]

    def run(*args: str) -> str:
        done = subprocess.run([*app, *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"appliance {' '.join(args)} failed: {done.stderr[-600:]}")
        return done.stdout

    rows: list[tuple[str, str, float, float, float, str]] = []
    try:
        src = lab.up(["src"], disk_size=size, with_guest=True)[0]
        lab.change("src", data, marker="original")
        guest.write_autorun(src.disk, CHURN)
        original = work / "original.img"
        subprocess.run(["cp", "--sparse=always", src.disk, str(original)], check=True)
        run("host", "add", "src", "--address", f"root@{src.address}", "--disk", src.disk, "--key", str(lab.key_file),
            "--trust-first-use")  # fmt: skip
        run("host", "set", "src", "--boot-check", "console:APPLIANCE-AUTORUN-DONE", "--vm-memory", "512")
        run("backup", "src")
        first = json.loads(run("points", "src", "--json"))[0]["id"]
        for label, stale in (("blank target", False), ("target holds the original point", True)):
            target = lab.up([f"t{len(rows)}"], disk_size=size, data_fraction=0.0)[-1]
            if stale:
                subprocess.run(["cp", "--sparse=always", str(original), target.disk], check=True)
            run("failover", "src", "--point", first)  # --accel auto: KVM, or TCG where KVM fails
            time.sleep(5)  # the guest writes while the copy runs
            wire = _wire(target)
            started = time.monotonic()
            run("failback", "src", "--to", f"root@{target.address}", "--disk", f"{src.disk}={target.disk}",
                "--trust-first-use")  # fmt: skip
            total = time.monotonic() - started
            progress = json.loads((home / "failback" / "src.json").read_text())
            differ = _changed_bytes(original, target.disk) if stale else 0
            note = f"{differ / 2**20:.1f} MiB differ" if stale else ""
            sent = (_wire(target) - wire) / 2**20
            rows.append(("appliance failback", label, sent, total, progress["downtime_seconds"], note))
        rows.append(_naive(lab, app, run, work, size, first))
        _print(rows)
    finally:
        subprocess.run([*app, "failover", "stop", "src"], capture_output=True, check=False)
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def _naive(lab: Lab, app: list[str], run, work: Path, size: int, first: str):  # type: ignore[no-untyped-def]
    """Stop the VM, convert its disk to raw, stream it to the target with OpenSSH cat: all of it is downtime."""
    target: LabHost = lab.up(["naive"], disk_size=size, data_fraction=0.0)[-1]
    run("failover", "src", "--point", first)
    time.sleep(5)
    overlay = Path(app[app.index("--home") + 1]) / "failover" / "src" / "disk0.qcow2"
    raw = work / "naive.raw"
    wire = _wire(target)
    started = time.monotonic()
    run("failover", "stop", "src", "--keep")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
    ssh = ["ssh", "-i", str(lab.key_file), *KEY_OPTS, "-c", "aes128-gcm@openssh.com", f"root@{target.address}"]
    with open(raw, "rb") as f:
        subprocess.run([*ssh, "cat", ">", target.disk], stdin=f, check=True)
    seconds = time.monotonic() - started
    return ("naive: stop, convert, ssh cat", "blank target", (_wire(target) - wire) / 2**20, seconds, seconds, "")


def _print(rows: list[tuple[str, str, float, float, float, str]]) -> None:
    print("\nfailback benchmark: the lab guest, 2 GiB disk, writing 4 MiB of new data a second during the copy (TCG)\n")
    print(f"{'path':<30} {'target':<32} {'wire MiB':>9} {'total s':>8} {'downtime s':>11}  note")
    for path, target, wire, total, down, note in rows:
        print(f"{path:<30} {target:<32} {wire:>9.1f} {total:>8.1f} {down:>11.1f}  {note}")
    naive_down = rows[-1][4]
    print("\ntargets:")
    for _, target, _, _, down, _ in rows[:-1]:
        print(f"  downtime vs naive, {target}: {down / naive_down:.2f}x (<= 0.1x)")
    stale = rows[1]
    differ = float(stale[5].split()[0]) if stale[5] else 0.0
    if differ:
        print(f"  wire vs bytes that differ, target holding the original: {stale[2] / differ:.2f}x (<= 1.2x)")
