# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench replication`: a DR appliance pulls an incremental point over a WAN-shaped link, against
rsync of the source's raw image and scp of the point's qcow2 file, in one run, over the same link.

Two appliances on this machine, each its own APPLIANCE_HOME. The source site is a lab namespace whose
sshd runs `serve-replica` for the DR appliance's granted key (and a shell for the lab key, which rsync and
scp use). The link is shaped with `tc tbf` on both ends of the site's veth (the rate) and a delaying TCP
relay of the bench's own in front of its sshd (the round-trip time: `netem` is missing on some kernels).
Bytes on the wire are the site link's own counters, both directions, SSH and TCP/IP framing included.
The lab's data is random (zstd cannot shrink it); one more increment writes text-like data instead, where
zstd on the wire pays, against rsync with its own compression (-z).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance.bench.capture import KEY_OPTS, _cache, _changed_bytes, _wire
from appliance.domain.models import format_size
from appliance.lab import Lab, LabHost
from appliance.lab.relay import Relay


@dataclass
class Row:
    tool: str
    seconds: float
    wire: int
    note: str = ""


@contextlib.contextmanager
def shaped(site: LabHost, rate: str) -> Iterator[None]:
    """`tc tbf` at `rate` on both ends of the site's link."""
    ends = [["tc"], ["ip", "netns", "exec", site.netns, "tc"]]
    devs = [site.veth, "eth0"]
    for tc, dev in zip(ends, devs, strict=True):
        subprocess.run([*tc, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
                        "latency", "400ms"], check=True)  # fmt: skip
    try:
        yield
    finally:
        for tc, dev in zip(ends, devs, strict=True):
            subprocess.run([*tc, "qdisc", "del", "dev", dev, "root"], check=False)


def run_replication_bench(disk_size: int = 2 << 30, data: float = 0.4, change: float = 0.01, rate: str = "100mbit",
                          rtt: float = 0.030) -> list[Row]:  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-replication-", dir="/var/tmp"))
    lab = Lab(work / "lab")
    source, dr = work / "source", work / "dr"
    src = [sys.executable, "-m", "appliance", "--home", str(source)]
    dst = [sys.executable, "-m", "appliance", "--home", str(dr)]
    relay = None
    try:
        web = lab.up(["web"], disk_size=disk_size, data_fraction=data)[0]
        site = next(h for h in lab.up(["site"], disk_size=1 << 20) if h.name == "site")
        _run([*src, "host", "add", "web", "--address", f"root@{web.address}", "--disk", web.disk, "--key",
              str(lab.key_file), "--trust-first-use", "--python", "/usr/bin/python3"])  # fmt: skip
        _run([*src, "backup", "web"])
        dr_key = work / "dr_key"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(dr_key)])
        _run([*src, "site", "grant", "dr1", "--key", f"{dr_key}.pub", "--authorized-keys",
              str(Path(site.folder) / "authorized_keys")])  # fmt: skip
        (Path(site.folder) / "authorized_keys").open("a").write(lab.key_file.with_suffix(".pub").read_text())
        relay = Relay((site.address, 22), one_way=rtt / 2)
        _run([*dst, "site", "add", "hq", "--address", f"root@127.0.0.1:{relay.port}", "--key", str(dr_key),
              "--trust-first-use"])  # fmt: skip
        rows = _measured(work, lab, web, site, relay, src, dst, disk_size, change, rate)
        _print(rows, disk_size, data, change, rate, rtt)
        return rows
    finally:
        if relay is not None:
            relay.close()
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def _measured(work: Path, lab: Lab, web: LabHost, site: LabHost, relay: Relay, src: list[str], dst: list[str],
              disk_size: int, change: float, rate: str) -> list[Row]:  # fmt: skip
    ssh = ["ssh", "-p", str(relay.port), "-i", str(lab.key_file), *KEY_OPTS, "-c", "aes128-gcm@openssh.com"]
    remote = "root@127.0.0.1"
    raw_copy = work / "dr-raw.img"  # rsync's copy of the source's raw image at the DR site
    rows = []
    with shaped(site, rate):
        started, before = time.monotonic(), _wire(site)
        _run([*dst, "replicate", "hq"])
        rows.append(Row("appliance, first full copy", time.monotonic() - started, _wire(site) - before))
        shutil.copyfile(web.disk, raw_copy)  # rsync starts from the same state, without a WAN full copy
        rsync = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "-e", " ".join(ssh),
                 f"{remote}:{web.disk}", str(raw_copy)]  # fmt: skip
        for seed, cache in ((21, "warm"), (23, "cold")):  # cold: both sides' disks read as after a day's work
            old = work / "before.img"
            shutil.copyfile(web.disk, old)
            lab.change("web", change, seed=seed)
            changed = _changed_bytes(old, web.disk)
            old.unlink()
            _run([*src, "backup", "web"])
            _cache(cache, web.disk, raw_copy)
            started, before = time.monotonic(), _wire(site)
            _run([*dst, "replicate", "hq"])
            rows.append(Row(f"appliance, replicate ({cache})", time.monotonic() - started, _wire(site) - before,
                            f"{changed}"))  # fmt: skip
            _cache(cache, web.disk, raw_copy)
            started, before = time.monotonic(), _wire(site)
            _run(rsync)
            rows.append(Row(f"rsync --inplace --no-whole-file ({cache})", time.monotonic() - started,
                            _wire(site) - before))  # fmt: skip
        newest = sorted((source_store(src) / "web" / "disk0").glob("*.qcow2"))[-1]
        started, before = time.monotonic(), _wire(site)
        _run(["scp", "-O", "-P", str(relay.port), "-i", str(lab.key_file), *KEY_OPTS, f"{remote}:{newest}",
              str(work / "scp.qcow2")])  # fmt: skip
        rows.append(Row("scp of the new qcow2", time.monotonic() - started, _wire(site) - before))
        rows += _text_increment(work, web, site, src, dst, rsync, disk_size, change)
        per_changed = rows[1].wire / int(rows[1].note)  # what an uncut increment costs a changed byte
        rows += [_cut_at_half(lab, site, relay, src, dst, change, per_changed, kill) for kill in (False, True)]
    return rows


def _text_increment(work: Path, web: LabHost, site: LabHost, src: list[str], dst: list[str], rsync: list[str],
                    disk_size: int, change: float) -> list[Row]:  # fmt: skip
    """An increment of text-like data (as logs and source trees change), replicated and then rsynced with -z;
    rsync's copy is at the previous point's state already (the cold rows)."""
    old = work / "before.img"
    shutil.copyfile(web.disk, old)
    write_text(web.disk, disk_size, change, seed=24)
    changed = _changed_bytes(old, web.disk)
    old.unlink()
    _run([*src, "backup", "web"])
    _cache("warm", web.disk, rsync[-1])
    started, before = time.monotonic(), _wire(site)
    _run([*dst, "replicate", "hq"])
    rows = [Row("appliance, replicate text-like (warm)", time.monotonic() - started, _wire(site) - before,
                f"{changed}")]  # fmt: skip
    started, before = time.monotonic(), _wire(site)
    _run([rsync[0], "-z", *rsync[1:]])
    rows.append(Row("rsync -z, text-like (warm)", time.monotonic() - started, _wire(site) - before, f"{changed}"))
    return rows


def text_like(n: int, seed: int = 1) -> bytes:
    """`n` compressible bytes, as logs or a source tree are: lines of words of a small vocabulary, never
    repeating exactly (zstd level 3 shrinks them to ~33 %)."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(500)]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(words, k=12)) + b"\n"
    return bytes(out[:n])


def write_text(path: str, size: int, fraction: float, seed: int) -> int:
    """Overwrite about `fraction` of the disk with text-like data, in 4 KiB-aligned extents of 64 KiB to 1 MiB
    at random places (as files are written); returns the bytes written."""
    rng = random.Random(seed)
    target, written = int(size * fraction), 0
    fd = os.open(path, os.O_WRONLY)
    try:
        while written < target:
            length = min(rng.randrange(16, 257) * 4096, size)
            offset = rng.randrange(0, (size - length) // 4096 + 1) * 4096
            os.pwrite(fd, text_like(length, seed=rng.randrange(1 << 30)), offset)
            written += length
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def source_store(src: list[str]) -> Path:
    return Path(src[src.index("--home") + 1]) / "store"


def _cut_at_half(lab: Lab, site: LabHost, relay: Relay, src: list[str], dst: list[str], change: float,
                 per_changed: float, kill: bool) -> Row:  # fmt: skip
    """A replication cut once about half its bytes crossed the link (the link dropped, or the DR appliance
    killed with SIGKILL), then run again: what the second run sends, and what the two sent beyond one
    uncut run (the warm row's bytes per changed byte)."""
    old = Path(tempfile.mkdtemp(dir=source_store(src).parent)) / "before.img"
    web = lab.host("web")
    shutil.copyfile(web.disk, old)
    lab.change("web", change, seed=25 if kill else 22)
    changed = _changed_bytes(old, web.disk)
    shutil.rmtree(old.parent)
    _run([*src, "backup", "web"])
    half = int(changed * per_changed / 2)
    before = _wire(site)
    if kill:
        cut = subprocess.Popen([*dst, "replicate", "hq"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while cut.poll() is None and _wire(site) - before < half:
            time.sleep(0.02)
        cut.send_signal(signal.SIGKILL)
        cut.wait()
    else:
        relay.cut_after(half)
        if subprocess.run([*dst, "replicate", "hq"], capture_output=True, check=False).returncode == 0:
            raise RuntimeError("the replication was not cut")
    first = _wire(site) - before
    started, before = time.monotonic(), _wire(site)
    _run([*dst, "replicate", "hq"])
    second = _wire(site) - before
    resent = max(0, first + second - int(changed * per_changed))
    how = "DR appliance killed" if kill else "link cut"
    return Row(f"appliance, run again after a {how}", time.monotonic() - started, second,
               f"cut after {format_size(first)}; re-sent {format_size(resent)}")  # fmt: skip


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ...: exit {done.returncode}: {done.stderr.strip()[-400:]}")


def _print(rows: list[Row], disk_size: int, data: float, change: float, rate: str, rtt: float) -> None:
    changed = next(int(r.note) for r in rows if r.tool.startswith("appliance, replicate"))
    link = f"link {rate} (tc tbf) and {rtt * 1000:.0f} ms RTT (a relay)"
    print(f"\nreplication: {format_size(disk_size)} lab disk, {data:.0%} data, {change:.0%} changed "
          f"({format_size(changed)} of 4 KiB blocks); {link}\n")  # fmt: skip
    print(f"    {'tool':42} {'seconds':>8} {'wire':>11} {'wire/changed':>13}")
    for r in rows:
        note = f"  ({r.note})" if r.note and not r.note.isdigit() else ""
        own = int(r.note) if "text-like" in r.tool else changed  # the text-like increment is one of its own
        print(f"    {r.tool:42} {r.seconds:8.1f} {format_size(r.wire):>11} {r.wire / own:12.2f}x{note}")
    print("\n    targets:")
    for cache in ("warm", "cold"):
        rep = next(r for r in rows if r.tool == f"appliance, replicate ({cache})")
        rsync = next(r for r in rows if r.tool == f"rsync --inplace --no-whole-file ({cache})")
        print(f"      {cache}: wire vs rsync           {rep.wire / rsync.wire:.2f}x  (<= 1x)")
        print(f"      {cache}: wire vs changed bytes   {rep.wire / int(rep.note):.2f}x  (<= 1.1x)")
        print(f"      {cache}: time vs rsync           {rep.seconds / rsync.seconds:.2f}x  (<= 0.5x)")
    text = next(r for r in rows if r.tool == "appliance, replicate text-like (warm)")
    rsync_z = next(r for r in rows if r.tool == "rsync -z, text-like (warm)")
    print(f"      text-like: wire vs rsync -z     {text.wire / rsync_z.wire:.2f}x  (<= 1x)")
    print(f"      text-like: wire vs changed      {text.wire / int(text.note):.2f}x  (zstd on the wire)")
    for cut in (r for r in rows if r.tool.startswith("appliance, run again")):
        resent = cut.note.rpartition("re-sent ")[2]
        print(f"      {cut.tool.rpartition('after a ')[2] + ': re-sent':30} {resent}  (<= 1 MiB)")
