# SPDX-License-Identifier: GPL-2.0-or-later
"""Points of a busy file system: one frozen moment, restored clean; a freeze that never outlives its run.

The host's disk is a loop device with ext4 mounted on it and the lab workload writing to it all the time
(sqlite commits with fsync, files rewritten and renamed, each carrying its own checksum). Each point is
checked as a restore finds it: its journal replayed on a copy, `e2fsck -fn` clean, every row and file
matching its checksum.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import bootstrap
from appliance.lab import Lab, workload
from appliance.services.backup import back_up
from appliance.services.reader_pool import ReaderPool
from appliance.store.layout import Home
from tests.conftest import points_json, run_cli, start_cli
from tests.integration.helpers import host_add

FIFREEZE, FITHAW = 0xC0045877, 0xC0045878


@dataclass
class BusyDisk:
    host: object
    mount: Path
    stats: Path

    @property
    def longest_stall(self) -> float:
        return float(json.loads(self.stats.read_text())["longest_stall"])

    def reset_stall(self) -> None:
        """The workload keeps its own longest stall: restart the count by starting over its stats file."""
        self.stats.write_text(json.dumps({"longest_stall": 0.0, "operations": 0}))


@pytest.fixture
def busy(make_host, lab: Lab, tmp_path: Path) -> Iterator[BusyDisk]:  # type: ignore[no-untyped-def]
    host = make_host(size=256 << 20, data=0.0, loop=True)
    mount = tmp_path / "mnt"
    mount.mkdir()
    subprocess.run(["mkfs.ext4", "-q", host.disk], check=True)
    subprocess.run(["mount", host.disk, str(mount)], check=True)
    lab.restart_sshd(host.name)  # its mount namespace, a copy made when it started, now shows the mount
    stats = tmp_path / "stats.json"
    writer = subprocess.Popen([sys.executable, workload.__file__, "run", str(mount), "--stats", str(stats)])
    try:
        _wait_for(lambda: stats.exists() and json.loads(stats.read_text())["operations"] > 50, 30)
        yield BusyDisk(host, mount, stats)
    finally:
        writer.kill()
        writer.wait()
        _thaw(mount)
        for _ in range(50):
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)


def _wait_for(condition, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _frozen(mount: Path) -> bool:
    """Whether the file system is frozen now: a write to it does not finish within a second. (Not a second
    FIFREEZE: freezing to find out would race the watchdog's own freeze.) A write that waits finishes, in
    its thread, at the thaw."""
    done = threading.Event()

    def write() -> None:
        (mount / "probe").write_text("written")
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return not done.wait(1.0)


def _thaw(mount: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        finally:
            os.close(fd)


def restore_problems(image: Path, scratch: Path) -> list[str]:
    """What a restore of the point would find: its journal replayed on a copy, then fsck, then the data."""
    raw = scratch / "restored.img"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    replay = subprocess.run(["e2fsck", "-p", "-E", "journal_only", str(raw)], capture_output=True, text=True)
    problems = [f"journal replay exited {replay.returncode}: {replay.stdout.strip()}"] if replay.returncode > 1 else []
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    if fsck.returncode != 0:
        problems.append(f"e2fsck -fn exited {fsck.returncode}: {fsck.stdout.strip().splitlines()[-1:]}")
    mount = scratch / "restored"
    mount.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop,ro,noload", str(raw), str(mount)], check=True)
    try:
        problems += workload.check(str(mount))
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        raw.unlink()
    return problems


def _point_image(home: Path, host: str, point: dict[str, object]) -> Path:
    return home / "store" / host / point["disks"][0]["file"]  # type: ignore[index]


def test_points_of_a_busy_file_system_are_frozen_moments_that_restore_clean(
    busy: BusyDisk, home: Path, tmp_path: Path
) -> None:
    name = busy.host.name  # type: ignore[attr-defined]
    stalls = []
    for _ in range(3):
        busy.reset_stall()
        r = run_cli(home, "backup", name)
        assert r.rc == 0, r.err
        assert "frozen" in r.out, r.out
        stalls.append(busy.longest_stall)
    points = points_json(home, name)
    for p in points:
        consistency = p["consistency"]
        assert consistency["kind"] == "frozen", consistency  # type: ignore[index]
        assert restore_problems(_point_image(home, name, p), tmp_path) == [], p["id"]
    listing = run_cli(home, "points", name).out
    assert "frozen " in listing and " s " in listing
    print(f"frozen points: longest stall of the workload per point {[round(s, 3) for s in stalls]} s")


def test_a_live_read_says_so(busy: BusyDisk, home: Path) -> None:
    name = busy.host.name  # type: ignore[attr-defined]
    assert run_cli(home, "host", "set", name, "--consistency", "live").rc == 0
    r = run_cli(home, "backup", name)
    assert r.rc == 0, r.err
    assert "live (not consistent)" in r.err and "backup.live_read" in r.err
    assert points_json(home, name)[-1]["consistency"]["kind"] == "live"  # type: ignore[index]
    assert "live (not consistent)" in run_cli(home, "points", name).out


def _reader_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "appliance-reader"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found if int(p) != os.getpid()]


def _frozen_by_a_held_backup(busy: BusyDisk, home: Path, seconds: float) -> subprocess.Popen[str]:
    name = busy.host.name  # type: ignore[attr-defined]
    assert run_cli(home, "host", "set", name, "--freeze-limit", "60").rc == 0
    os.environ["APPLIANCE_PAUSE"] = f"frozen:{seconds}"
    try:
        proc = start_cli(home, "backup", name)
    finally:
        del os.environ["APPLIANCE_PAUSE"]
    deadline = time.monotonic() + 60
    while not _frozen(busy.mount):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the backup did not freeze the file system (exit {proc.returncode}): {out}{err}")
        time.sleep(0.1)
    return proc


def test_a_freeze_ends_when_the_reader_is_killed(busy: BusyDisk, home: Path) -> None:
    before = points_json(home, busy.host.name)  # type: ignore[attr-defined]
    proc = _frozen_by_a_held_backup(busy, home, 120)
    for pid in _reader_pids():
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not _frozen(busy.mount), 5)  # the watchdog saw its reader go
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert points_json(home, busy.host.name) == before  # type: ignore[attr-defined]


def test_a_freeze_ends_when_the_appliance_goes_away(busy: BusyDisk, home: Path) -> None:
    proc = _frozen_by_a_held_backup(busy, home, 120)
    proc.kill()  # the SSH session dies with the appliance's end of it
    proc.wait()
    _wait_for(lambda: not _frozen(busy.mount), 10)


def test_a_freeze_never_outlives_its_limit(busy: BusyDisk, home: Path) -> None:
    name = busy.host.name  # type: ignore[attr-defined]
    assert run_cli(home, "host", "set", name, "--freeze-limit", "1").rc == 0
    started = time.monotonic()
    r = run_cli(home, "backup", name, env={"APPLIANCE_PAUSE": "frozen:4"})
    assert r.rc == 0, r.err
    consistency = points_json(home, name)[-1]["consistency"]
    assert consistency["kind"] == "live" and "limit of 1 s" in consistency["detail"], consistency  # type: ignore[index]
    assert time.monotonic() - started < 60


def test_the_read_leaves_the_host_page_cache_alone(busy: BusyDisk, home: Path) -> None:
    """Direct reads: the device's pages are not read through the host's cache, so a backup neither returns
    stale cached blocks nor evicts the server's working set to make room for a copy of the disk."""
    disk = busy.host.disk  # type: ignore[attr-defined]
    cached_before = _cached_bytes(disk)
    assert run_cli(home, "backup", busy.host.name).rc == 0  # type: ignore[attr-defined]
    grown = _cached_bytes(disk) - cached_before
    assert grown < 64 << 20, f"the device's page cache grew by {grown} bytes during a 256 MiB read"


def _cached_bytes(path: str) -> int:
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", path], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def test_a_kept_reader_reads_only_what_was_written_since_its_last_point(
    busy: BusyDisk, home: Path, tmp_path: Path
) -> None:
    """The daemon's way: the reader stays on the host between points, tracing writes; the next point reads
    those blocks only, and is still one frozen moment that restores clean. A point it did not take itself
    in between (here a plain `appliance backup`) is a doubt: the next point reads everything again."""
    name = busy.host.name  # type: ignore[attr-defined]
    store, tools = Home(home), bootstrap.tools(Home(home))
    size = 256 << 20
    readers = ReaderPool()
    try:
        points = [back_up(store, tools, name, pool=readers) for _ in range(3)]
        assert run_cli(home, "backup", name).rc == 0
        points.append(back_up(store, tools, name, pool=readers))
    finally:
        readers.close()
    read = [sum(d.read_bytes for d in p.disks) for p in points]
    assert read[0] >= size and read[3] >= size, read  # a first point, and one after a point of another reader
    assert read[1] < size // 4 and read[2] < size // 4, read  # only the blocks written meanwhile
    for p in points:
        assert p.consistency is not None and p.consistency.kind == "frozen", p.consistency
    for p in points_json(home, name)[1:3]:
        assert restore_problems(_point_image(home, name, p), tmp_path) == [], p["id"]
    print(f"bytes read on the host per point: {read}")


def test_host_add_says_how_points_will_be_taken(busy: BusyDisk, lab: Lab, home: Path, make_host) -> None:  # type: ignore[no-untyped-def]
    host = busy.host
    args = host_add(host, lab.key_file, "--trust-first-use", name="again")
    r = run_cli(home, *args)
    assert r.rc == 0, r.err
    assert f"points: one moment, file systems frozen for the last copy (frozen: {busy.mount})" in r.out, r.out
    image_host = make_host(add=False)  # an image file, not a block device: nothing to trace
    r = run_cli(home, *host_add(image_host, lab.key_file, "--trust-first-use"))
    assert r.rc == 0, r.err
    assert "points: live reads, NOT consistent" in r.out and "not a block device" in r.out, r.out
