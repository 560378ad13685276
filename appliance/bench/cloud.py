# SPDX-License-Identifier: GPL-2.0-or-later
"""`appliance bench cloud`: the cloud copy against rclone over one shaped link to a real S3 server, and the
RTO of a failover from the bucket against the local failover and a download-then-boot, in one run.

The S3 server is SeaweedFS in a lab namespace (appliance/lab/objectstore.py); its link is shaped with `tc tbf`
on both ends of its veth (bench/replication.py `shaped`). The protected host is the lab guest grown to the
disk size, `data` of it one file of random data (zstd cannot shrink it), so the same host boots for the RTO.
One backup, `cloud add` on a bucket with Object Lock (`--lock-days 1`), then the rows:

- appliance `cloud push` of the first point; then `change` of the disk rewritten (one new file of random data
  and a new marker), a backup, and `cloud push` of that increment. The push runs in this process through the
  appliance's own composition root (appliance.bootstrap), with a bucket factory that keeps each S3Bucket, so
  the requests are the adapter's own count per S3 operation (`S3Bucket.requests`: every call and every page
  of a listing; boto3's retries of a call are not counted again). "objects" is the bytes of objects put
  (PushReport.sent_bytes: packs and the manifest).
- peers: `rclone copy` of the host's raw disk image and of the new point's qcow2 file (the appliance's store),
  to the same locked bucket under prefixes of their own, with rclone's defaults (multipart above 200 MiB, in
  5 MiB parts). rclone is configured by environment variables only; its requests are the `HTTP REQUEST` lines
  of its `--dump headers` log (retries included); "objects" is the file's size.

"wire" is the S3 server's link counters, both directions, HTTP and TCP/IP framing included: the same measure
for every row. The changed bytes are the point's own (`points --json` changed_bytes, the blocks that differ
from the point before).

RTO, the guest's UP line on its console, over the same shaped link: (a) `failover HOST` of the point on the
source appliance (the floor: its store is local); (b) on a fresh APPLIANCE_HOME, `cloud attach` with the key
file, then `failover HOST --from STORE` (the RTO it prints: from the command's start to the UP line, with
the blocks the guest reads fetched first and the rest streaming in behind, on the same link); (c) `cloud
restore` of the point to a raw file, then that file booted directly with qemu-system-x86_64 (lab/boot.py,
the failover bench's floor). A first local failover, not counted, chooses the accelerator as a user's
does (`--accel auto`: KVM, or TCG where KVM fails, which that run's RTO pays for); (a), (b) and (c) then boot
with the one it ended up with, and the same 512 MiB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from appliance import bootstrap
from appliance.adapters.s3 import S3Bucket
from appliance.bench.capture import _wire
from appliance.bench.replication import shaped
from appliance.domain.models import format_size
from appliance.lab import Lab, LabHost, disks, guest
from appliance.lab.boot import boot_until_up
from appliance.lab.objectstore import ObjectStore, start_object_store
from appliance.ports import BucketAccess, ObjectStorage
from appliance.services.cloud import push as cloud_push

HOST = "web"
STORE = "s3"
REMOTE = "BENCH"  # rclone's remote, configured by RCLONE_CONFIG_BENCH_* only
BOOT_CHECK = r"console:APPLIANCE-GUEST-UP marker=\S+"
MEMORY = "512"
_RTO = re.compile(r"RTO: ([0-9.]+) s")
_ACCEL = re.compile(r"is running point .* \((KVM|TCG)\)")


@dataclass
class Row:
    tool: str
    seconds: float
    wire: int  # bytes on the S3 server's link, both directions
    objects: int  # bytes of objects put
    requests: int
    note: str = ""


@dataclass
class Rto:
    path: str
    seconds: float
    wire: int  # bytes on the S3 server's link meanwhile
    note: str = ""


@dataclass
class _Bench:
    work: Path
    lab: Lab
    home: Path  # the source appliance
    fresh: Path  # the appliance on a new machine
    s3: ObjectStore
    creds: Path
    bucket: str
    disk: Path  # the host's disk

    @property
    def app(self) -> list[str]:
        return [sys.executable, "-m", "appliance", "--home", str(self.home)]


@contextlib.contextmanager
def _bench(prefix: str, disk_size: int, fill: Callable[[Lab, LabHost], object]) -> Iterator[_Bench]:
    """The lab guest grown to `disk_size` (`fill` writes its data), an S3 server with a locked bucket, the host
    added to a home and backed up once, `cloud add` of the bucket; everything removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    lab = Lab(work / "lab")
    home, fresh = work / "home", work / "fresh"
    s3: ObjectStore | None = None
    try:
        web = lab.up([HOST], disk_size=disk_size, with_guest=True)[0]
        fill(lab, web)
        s3 = start_object_store(lab, work / "s3", name="s3")
        b = _Bench(work, lab, home, fresh, s3, s3.appliance.write(work / "appliance.creds"),
                   f"bench-{secrets.token_hex(4)}", Path(web.disk))  # fmt: skip
        s3.create_bucket(b.bucket, lock=True)
        _run([*b.app, "host", "add", HOST, "--address", f"root@{web.address}", "--disk", web.disk, "--key",
              str(lab.key_file), "--trust-first-use"])  # fmt: skip
        _run([*b.app, "host", "set", HOST, "--boot-check", BOOT_CHECK, "--vm-memory", MEMORY])
        _run([*b.app, "backup", HOST])
        _run([*b.app, "cloud", "add", STORE, "--endpoint", s3.endpoint, "--bucket", b.bucket, "--credentials-file",
              str(b.creds), "--lock-days", "1"])  # fmt: skip
        yield b
    finally:
        for h in (home, fresh):
            if (h / "hosts" / f"{HOST}.json").exists():
                subprocess.run([sys.executable, "-m", "appliance", "--home", str(h), "failover", "stop", HOST],
                               capture_output=True, check=False)  # fmt: skip
        if s3 is not None:
            s3.stop()
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def run_cloud_bench(disk_size: int = 2 << 30, data: float = 0.4, change: float = 0.01,
                    rate: str = "100mbit") -> tuple[list[Row], list[Rto]]:  # fmt: skip
    with _bench("bench-cloud-", disk_size, lambda lab, _: lab.change(HOST, data, marker="first", seed=1)) as b:
        with shaped(b.s3.host, rate):
            rows = _pushes(b.lab, b.home, b.s3, change)
            rows += _peers(b.work, b.home, b.s3, b.bucket, b.disk)
            rtos = _rtos(b.work, b.home, b.fresh, b.s3, b.creds)
        _print(rows, rtos, disk_size, data, change, rate, _changed(b.home))
        return rows, rtos


def run_cloud_rto_bench(disk_size: int = 64 << 30, data: float = 0.125, rate: str = "100mbit") -> list[Rto]:
    """Only the RTO, for a large disk: the lab guest grown to `disk_size` with `data` of it in files of 1 GiB
    of random data (written through the guest's file system, which spans the disk), pushed over an unshaped
    link (a first push of 8 GiB at 100 Mbit/s would take a quarter of an hour and is not what is measured),
    then (a) and (b) over the shaped link. A download before the boot is not run: at the link's rate it
    takes at least the data's size over the rate, printed as (c)'s floor."""
    files = max(1, round(disk_size * data / (1 << 30)))

    def fill(_: Lab, web: LabHost) -> None:
        for i in range(files):
            guest.write_file(web.disk, f"/data-{i}.bin", disks.noise(1 << 30, seed=100 + i))
        guest.set_marker(web.disk, "large")

    started = time.monotonic()
    with _bench("bench-cloud-rto-", disk_size, fill) as b:
        prepared = time.monotonic() - started
        push = _push(b.home, b.s3, "appliance cloud push (unshaped)")
        with shaped(b.s3.host, rate):
            rtos = _rtos(b.work, b.home, b.fresh, b.s3, b.creds, download=False)
        stored = files << 30
        floor = stored * 8 / _bits_per_second(rate)
        rtos.append(Rto("(c) download first, at least", floor, stored, f"{format_size(stored)} at {rate}"))
        print(f"\ncloud RTO: the lab guest on a {format_size(disk_size)} disk holding {files} GiB of random data; "
              f"lab, backup and cloud add {prepared:.0f} s, push {push.seconds:.0f} s ({format_size(push.objects)}, "
              f"{push.requests} requests, unshaped); SeaweedFS, link {rate} (tc tbf)\n")  # fmt: skip
        print(f"    {'RTO (the guest UP on its console)':40} {'seconds':>8} {'wire':>11}  note")
        for t in rtos:
            print(f"    {t.path:40} {t.seconds:8.1f} {format_size(t.wire):>11}  {t.note}")
        remote = next(t for t in rtos if t.path.startswith("(b)"))
        local = next(t for t in rtos if t.path.startswith("(a)"))
        print(f"\n    failover --from the bucket vs local     {remote.seconds - local.seconds:+.1f} s  (<= +10 s)")
        return rtos


def _bits_per_second(rate: str) -> float:
    """tc's rate ("100mbit", "1gbit", "800kbit") in bits a second."""
    match = re.fullmatch(r"([0-9.]+)([kmg]?)bit", rate.lower())
    if match is None:
        raise ValueError(f"a rate as tc takes it, e.g. 100mbit: {rate!r}")
    return float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]


def _pushes(lab: Lab, home: Path, s3: ObjectStore, change: float) -> list[Row]:
    rows = [_push(home, s3, "appliance cloud push, first point")]
    lab.change(HOST, change, marker="second", seed=2)
    _run([sys.executable, "-m", "appliance", "--home", str(home), "backup", HOST])
    rows.append(_push(home, s3, "appliance cloud push, increment"))
    return rows


def _push(home: Path, s3: ObjectStore, label: str) -> Row:
    """`cloud push STORE HOST` in this process, its buckets kept to read their request counts."""
    made: list[S3Bucket] = []

    def bucket(access: BucketAccess) -> ObjectStorage:
        made.append(S3Bucket(access))
        return made[-1]

    where = bootstrap.home(str(home))
    tools = dataclasses.replace(bootstrap.tools(where), buckets=bucket)
    started, before = time.monotonic(), _wire(s3.host)
    (report,) = cloud_push.push(where, tools, STORE, HOST)
    seconds, wire = time.monotonic() - started, _wire(s3.host) - before
    if report.state != "sent":
        raise RuntimeError(f"cloud push sent nothing: {report.state}")
    requests: Counter[str] = Counter()
    for b in made:
        requests.update(b.requests)
    ops = ", ".join(f"{n} {op}" for op, n in sorted(requests.items(), key=lambda x: -x[1]))
    note = f"{report.new_blocks} new blocks in {report.packs} pack(s); {ops}"
    return Row(label, seconds, wire, report.sent_bytes, sum(requests.values()), note)


def _peers(work: Path, home: Path, s3: ObjectStore, bucket: str, raw: Path) -> list[Row]:
    newest = _points(home)[-1]["id"]
    qcow2 = home / "store" / HOST / "disk0" / f"{newest}.qcow2"
    return [
        _rclone(work, s3, raw, f"{bucket}/rclone-raw", "rclone copy of the raw disk image"),
        _rclone(work, s3, qcow2, f"{bucket}/rclone-qcow2", "rclone copy of the new point's qcow2"),
    ]


def _rclone(work: Path, s3: ObjectStore, path: Path, dest: str, label: str) -> Row:
    """`rclone copy` of one file, configured by environment variables only (no config file is written)."""
    prefix = f"RCLONE_CONFIG_{REMOTE}_"
    # rclone (1.60) refuses to start when AWS_CA_BUNDLE is set and the endpoint is plain HTTP: it is not needed.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env |= {f"{prefix}TYPE": "s3", f"{prefix}PROVIDER": "Other", f"{prefix}ENDPOINT": s3.endpoint,
            f"{prefix}ACCESS_KEY_ID": s3.appliance.access_key, f"{prefix}SECRET_ACCESS_KEY": s3.appliance.secret_key,
            f"{prefix}REGION": "us-east-1", "RCLONE_CONFIG": "/dev/null"}  # fmt: skip
    log_file = work / "rclone.log"
    log_file.unlink(missing_ok=True)
    argv = ["rclone", "copy", str(path), f"{REMOTE}:{dest}", "--s3-no-check-bucket", "--dump", "headers",
            "--log-file", str(log_file)]  # fmt: skip
    started, before = time.monotonic(), _wire(s3.host)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds, wire = time.monotonic() - started, _wire(s3.host) - before
    dump = log_file.read_text(errors="replace")
    log_file.unlink()
    if done.returncode != 0:
        errors = [line for line in dump.splitlines() if "ERROR" in line or "Failed" in line]
        raise RuntimeError(f"rclone copy of {path.name} failed: {(errors or [done.stderr])[-1][-400:]}")
    size = path.stat().st_size
    puts = dump.count(" : PUT /")
    return Row(label, seconds, wire, size, dump.count("HTTP REQUEST"), f"{puts} PUT (multipart parts included)")


def _rtos(work: Path, home: Path, fresh: Path, s3: ObjectStore, creds: Path, download: bool = True) -> list[Rto]:
    src = [sys.executable, "-m", "appliance", "--home", str(home)]
    new = [sys.executable, "-m", "appliance", "--home", str(fresh)]
    rtos = []
    _, accel, fallback = _failover(src, ["--accel", "auto"], s3)  # where KVM fails, this run's RTO pays for it
    local, _, _ = _failover(src, ["--accel", accel], s3)
    rtos.append(Rto("(a) local failover (the floor)", local.seconds, local.wire, f"{accel.upper()}{fallback}"))
    key = work / "store.key"
    key.write_text(_run([*src, "cloud", "key", "export", STORE]))
    key.chmod(0o600)
    fresh.mkdir()
    started, before = time.monotonic(), _wire(s3.host)
    _run([*new, "cloud", "attach", "--key-file", str(key), "--credentials-file", str(creds)])
    attached = time.monotonic() - started
    rtos.append(Rto("    cloud attach on a fresh home", attached, _wire(s3.host) - before))
    remote, _, _ = _failover(new, ["--from", STORE, "--accel", accel], s3)
    rtos.append(Rto("(b) failover --from the bucket", remote.seconds, remote.wire,
                    "RTO as printed; wire: until the command returned"))  # fmt: skip
    rtos.append(Rto("    attach + (b)", attached + remote.seconds, rtos[-2].wire + remote.wire))
    if not download:
        return rtos
    restored = work / "restored.raw"
    started, before = time.monotonic(), _wire(s3.host)
    _run([*new, "cloud", "restore", STORE, HOST, "--to", str(restored)])
    fetched = Rto("    cloud restore to a raw file", time.monotonic() - started, _wire(s3.host) - before)
    boot = boot_until_up(restored, "raw", timeout=300.0, accel=accel)
    restored.unlink()
    rtos += [fetched, Rto("    qemu boot of the restored raw", boot, 0),
             Rto("(c) download + boot", fetched.seconds + boot, fetched.wire)]  # fmt: skip
    return rtos


def _failover(argv: list[str], extra: list[str], s3: ObjectStore) -> tuple[Rto, str, str]:
    """The RTO a failover prints, the bytes on the bucket's link until it returned, the accelerator it ended
    up with and, when it fell back from KVM, what it said; the VM is stopped afterwards."""
    before = _wire(s3.host)
    done = subprocess.run([*argv, "failover", HOST, *extra, "--timeout", "300"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    wire = _wire(s3.host) - before
    _run([*argv, "failover", "stop", HOST])
    rto, accel = _RTO.search(done.stdout), _ACCEL.search(done.stdout)
    if done.returncode != 0 or rto is None or accel is None:
        raise RuntimeError(f"failover {' '.join(extra)} failed: {done.stdout[-300:]} {done.stderr[-500:]}")
    fallback = next((f" ({line})" for line in done.stderr.splitlines() if line.startswith("KVM failed")), "")
    return Rto("", float(rto.group(1)), wire), accel.group(1).lower(), fallback


def _points(home: Path) -> list[dict[str, object]]:
    listed: list[dict[str, object]] = json.loads(
        _run([sys.executable, "-m", "appliance", "--home", str(home), "points", HOST, "--json"])
    )
    return listed


def _changed(home: Path) -> int:
    changed = _points(home)[-1]["changed_bytes"]
    assert isinstance(changed, int)
    return changed


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[3:8])} ...: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return done.stdout


def _print(rows: list[Row], rtos: list[Rto], disk_size: int, data: float, change: float, rate: str,
           changed: int) -> None:  # fmt: skip
    print(
        f"\ncloud copy: the lab guest on a {format_size(disk_size)} disk, {data:.0%} random data, {change:.0%} "
        f"rewritten ({format_size(changed)} changed); SeaweedFS, Object Lock 1 day, link {rate} (tc tbf)\n"
    )
    print(f"    {'tool':40} {'seconds':>8} {'wire':>11} {'objects':>11} {'requests':>9}  note")
    for r in rows:
        print(f"    {r.tool:40} {r.seconds:8.1f} {format_size(r.wire):>11} {format_size(r.objects):>11} "
              f"{r.requests:>9}  {r.note}")  # fmt: skip
    print(f"\n    {'RTO (the guest UP on its console)':40} {'seconds':>8} {'wire':>11}  note")
    for t in rtos:
        print(f"    {t.path:40} {t.seconds:8.1f} {format_size(t.wire):>11}  {t.note}")
    inc = next(r for r in rows if r.tool.endswith("increment"))
    raw = next(r for r in rows if "raw disk" in r.tool)
    qcow2 = next(r for r in rows if "qcow2" in r.tool)
    remote = next(t for t in rtos if t.path.startswith("(b)"))
    floor = next(t for t in rtos if t.path.startswith("(a)"))
    naive = next(t for t in rtos if t.path.startswith("(c)"))
    print("\n    targets:")
    for what, n, peer in (("wire", inc.wire, raw.wire), ("objects", inc.objects, raw.objects)):
        print(f"      increment {what:7} vs changed bytes      {n / changed:.2f}x  (<= 1.2x)")
        print(f"      increment {what:7} vs rclone raw copy    {n / peer:.3f}x  (<= 0.1x)")
    print(f"      increment wire    vs rclone of the qcow2  {inc.wire / qcow2.wire:.2f}x")
    print(f"      failover --from the bucket vs local     {remote.seconds - floor.seconds:+.1f} s")
    print(f"      download + boot / failover --from       {naive.seconds / remote.seconds:.1f}x")
