# SPDX-License-Identifier: GPL-2.0-or-later
"""Recovery points of a server that writes while it is backed up: do they restore clean?

Boots the busy server (images/server: a real Debian 12 whose workload commits to sqlite and rewrites
files all the time, each row and file with its own sha256) under TCG, backs it up POINTS times with the
appliance CLI by each method below, and checks every point as a restore would (`check_point`). A method
whose points may be damaged is still checked and reported point by point, never skipped: the report is
what this test is for. Minutes per method; run it alone:

    .venv/bin/pytest -n 0 -m heavy tests/heavy -x -s
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import bootstrap
from appliance.lab.server import BusyServer, PointCheck, WorkloadStats, build_server_image, check_point
from appliance.services.backup import back_up
from appliance.services.reader_pool import ReaderPool
from appliance.store.layout import Home
from tests.conftest import points_json, run_cli, start_cli

HOST = "busy"
POINTS = 3


@dataclass(frozen=True)
class Method:
    """How the appliance is told to take a point of the busy server, and what its points must show."""

    add_options: tuple[str, ...]  # added to `appliance host add`
    set_options: tuple[str, ...]  # then `appliance host set busy ...`, if any
    must_be_clean: bool  # False: damage is possible; it is reported, not failed
    data_volume: str | None = None  # the workload on that LVM volume (BusyServer), which is then the disk
    kind: str | None = None  # what every point must say it is (its consistency kind), if anything


_HOOKS = ("--pre-hook", "fsfreeze -f /", "--post-hook", "fsfreeze -u /")
# A new way to take points is one more entry here.
METHODS = {
    # Plain reads of a disk that changes meanwhile: the old default, no moment at all.
    "live": Method((), ("--consistency", "live"), must_be_clean=False),
    # Plain reads between the user's hooks: the root file system frozen for the whole read.
    "fsfreeze-hooks": Method(_HOOKS, ("--consistency", "live"), must_be_clean=True),
    # The default: one frozen moment, the file systems frozen only for the last copy.
    "auto": Method((), (), must_be_clean=True, kind="frozen"),
    # Where the kernel cannot trace writes: LVM snapshots of the volume the workload writes to.
    "lvm-thin": Method((), ("--consistency", "lvm-snapshot"), True, data_volume="thin", kind="lvm-snapshot"),
    "lvm-thick": Method((), ("--consistency", "lvm-snapshot"), True, data_volume="thick", kind="lvm-snapshot"),
}


@dataclass(frozen=True)
class Backup:
    """One `appliance backup` of the busy server, with what the workload went through meanwhile."""

    seconds: float
    stats: WorkloadStats  # read right after the backup; its longest stall covers exactly this backup
    ops_during: int
    output: str


@pytest.fixture(scope="module")
def server_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if os.geteuid() != 0:
        pytest.fail("the busy server test runs as root (debootstrap, loop devices, mounts)")
    for binary in ("debootstrap", "qemu-system-x86_64", "qemu-img", "e2fsck", "ssh"):
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is required: run ./install --dev")
    started = time.monotonic()
    image = build_server_image(tmp_path_factory.mktemp("server") / "server.img")
    print(f"\nbusy server image: {time.monotonic() - started:.1f} s (build.sh, cached or not)")
    return image


@pytest.mark.heavy
@pytest.mark.parametrize("method_name", list(METHODS))
def test_points_of_a_busy_server_restore_clean(method_name: str, server_image: Path, tmp_path: Path) -> None:
    method = METHODS[method_name]
    home = tmp_path / "home"
    home.mkdir()
    with BusyServer(tmp_path / "vm", server_image, data_volume=method.data_volume) as server:
        boot, ready = server.boot_seconds, server.ready_seconds
        print(f"\n[{method_name}] boot: sshd after {boot:.1f} s, workload writing after {ready:.1f} s")
        _added(home, server, method)
        backups = [_back_up(home, server) for _ in range(POINTS)]
        assert server.stats().running, "the workload must still be writing after the backups"
        if method.data_volume:
            assert _snapshots_left(server) == [], "every snapshot the reader made must be gone"
    checks = [check_point(image, tmp_path / "scratch") for image in _point_files(home)]
    assert len(checks) == POINTS
    _report(method_name, backups, checks)
    kinds = [p["consistency"]["kind"] for p in points_json(home, HOST)]  # type: ignore[index]
    assert method.kind is None or kinds == [method.kind] * POINTS, kinds
    for check in checks:  # "clean" means every file and row was there to check
        assert check.files > 0 or not check.clean, f"{check.image.name}: clean, but no workload file was checked"
    if method.must_be_clean:
        damaged = [f"{c.image.name}: {'; '.join(c.problems)}" for c in checks if not c.clean]
        assert not damaged, f"{method_name}: every point must restore clean:\n" + "\n".join(damaged)


def _added(home: Path, server: BusyServer, method: Method) -> None:
    if method.data_volume:  # busy-lvm mounted the volume for the workload: not the root file system
        assert server.ssh("findmnt", "-n", "-o", "SOURCE", "/var/lib/busy").strip().endswith(method.data_volume)
    r = run_cli(home, *_host_add(server, method))
    assert r.rc == 0, r.err
    if method.set_options:
        r = run_cli(home, "host", "set", HOST, *method.set_options)
        assert r.rc == 0, r.err


def _snapshots_left(server: BusyServer) -> list[str]:
    names = server.ssh("lvs", "--noheadings", "-o", "lv_name", "busyvg").split()
    return [n for n in names if "appliance" in n]


def _host_add(server: BusyServer, method: Method) -> list[str]:
    """`host add` as a user types it, pinning the host key the image was built with."""
    return [
        "host", "add", HOST, "--address", server.address, "--port", str(server.ssh_port), "--disk", server.disk,
        "--key", str(server.key_file), "--host-key-fingerprint", server.host_key_fingerprint, *method.add_options,
    ]  # fmt: skip


def _back_up(home: Path, server: BusyServer) -> Backup:
    before = server.reset_stats()
    started = time.monotonic()
    r = run_cli(home, "backup", HOST, timeout=3600)
    seconds = time.monotonic() - started
    assert r.rc == 0, r.err
    after = server.stats()
    assert after.ops > before.ops, "the workload wrote nothing during or after the backup"
    # Its result lines (the point, its consistency), not its log.
    lines = r.out.splitlines() + [line for line in r.err.splitlines() if line.startswith(f"{HOST}: ")]
    output = " | ".join(line.strip() for line in lines if line.strip())
    return Backup(seconds, after, after.ops - before.ops, output)


def _point_files(home: Path) -> list[Path]:
    return [home / "store" / HOST / str(p["disks"][0]["file"]) for p in points_json(home, HOST)]  # type: ignore[index]


def _report(method_name: str, backups: list[Backup], checks: list[PointCheck]) -> None:
    """Per point: backup time, the workload's longest stall, clean or damaged with every problem."""
    for i, (b, c) in enumerate(zip(backups, checks, strict=True), start=1):
        verdict = "clean" if c.clean else f"DAMAGED ({len(c.problems)} problem lines)"
        errors = sum(w.errors for w in b.stats.writers.values())
        print(
            f"[{method_name}] point {i} {c.image.name}: backup {b.seconds:.1f} s, longest stall "
            f"{b.stats.longest_stall:.2f} s ({b.stats.longest_stall_writer}), {b.ops_during} writes meanwhile"
            f"{f' ({errors} failed)' if errors else ''}, checked {c.rows} rows + {c.files} files in "
            f"{c.seconds:.1f} s: {verdict}"
        )
        print(f"[{method_name}]     appliance: {b.output}")
        for problem in c.problems:
            print(f"[{method_name}]     {problem}")
    damaged = sum(not c.clean for c in checks)
    print(
        f"[{method_name}] {damaged}/{len(checks)} points damaged; longest stall "
        f"{max(b.stats.longest_stall for b in backups):.2f} s; {sum(b.seconds for b in backups) / len(backups):.1f} s "
        "per point"
    )


@pytest.mark.heavy
def test_change_tracked_points_of_a_busy_server_restore_clean(server_image: Path, tmp_path: Path) -> None:
    """The daemon's way: the reader stays on the server between points and each point after the first reads
    only the blocks written since; every one is still a frozen moment that restores clean."""
    home = tmp_path / "home"
    home.mkdir()
    store = Home(home)
    readers = ReaderPool()
    with BusyServer(tmp_path / "vm", server_image) as server:
        r = run_cli(home, *_host_add(server, METHODS["auto"]))
        assert r.rc == 0, r.err
        tools = bootstrap.tools(store)
        try:
            points = [back_up(store, tools, HOST, pool=readers) for _ in range(POINTS + 1)]
        finally:
            readers.close()
    size = points[0].disks[0].size
    read = [sum(d.read_bytes for d in p.disks) for p in points]
    print(f"\n[tracked] bytes read on the server per point: {read}; consistency {[str(p.consistency) for p in points]}")
    assert read[0] >= size and all(n < size // 4 for n in read[1:]), read
    assert all(p.consistency is not None and p.consistency.kind == "frozen" for p in points)
    checks = [check_point(image, tmp_path / "scratch") for image in _point_files(home)]
    damaged = [f"{c.image.name}: {'; '.join(c.problems)}" for c in checks if not c.clean]
    assert not damaged, "every change-tracked point must restore clean:\n" + "\n".join(damaged)


_MORE_WRITES = (
    "for i in $(seq 0 59); do dd if=/dev/urandom of=/var/lib/busy/filler bs=1M count=2 seek=$((i % 40 * 2))"
    " conv=notrunc oflag=direct status=none; sleep 0.5; done; rm -f /var/lib/busy/filler"
)


@pytest.mark.heavy
def test_a_thick_snapshot_that_fills_up_discards_the_point(server_image: Path, tmp_path: Path) -> None:
    """A thick snapshot gets the volume group's free extents; when the writes during the read outgrow them,
    the snapshot is invalid and so would the point be: the backup fails, records nothing, leaves no
    snapshot, and the next one (with room again) is a clean lvm-snapshot point. A reader killed with
    SIGKILL while it reads its snapshot leaves none either: its watchdog removes it."""
    home = tmp_path / "home"
    home.mkdir()
    method = METHODS["lvm-thick"]
    with BusyServer(tmp_path / "vm", server_image, data_volume="thick") as server:
        _added(home, server, method)
        _back_up(home, server)
        free = int(server.ssh("vgs", "--noheadings", "-o", "vg_free_count", "busyvg"))
        server.ssh("lvcreate", "-q", "-y", "-n", "filler", "-l", str(free - 1), "busyvg")  # one 4 MiB extent left
        # The workload writes ~3 MiB/s; 4 MiB a second more, to new blocks, for a minute: the snapshot's
        # room is gone long before its read ends.
        writer = server.ssh_popen("sh", "-c", _MORE_WRITES)
        r = run_cli(home, "backup", HOST, timeout=3600)
        writer.wait(timeout=600)
        assert r.rc != 0 and "filled up during the read" in r.err and "nothing was recorded" in r.err, r.err
        assert len(points_json(home, HOST)) == 1
        assert _snapshots_left(server) == []
        server.ssh("lvremove", "-q", "-y", "busyvg/filler")
        _back_up(home, server)
        assert _snapshots_left(server) == []
        _a_killed_reader_leaves_no_snapshot(home, server)
    points = points_json(home, HOST)
    assert [p["consistency"]["kind"] for p in points] == ["lvm-snapshot"] * 2  # type: ignore[index]
    check = check_point(_point_files(home)[-1], tmp_path / "scratch")
    assert check.clean, check.problems


def _a_killed_reader_leaves_no_snapshot(home: Path, server: BusyServer) -> None:
    backup = start_cli(home, "backup", HOST)
    try:
        deadline = time.monotonic() + 120
        while not _snapshots_left(server):
            assert backup.poll() is None and time.monotonic() < deadline, "the backup made no snapshot"
            time.sleep(0.2)
        server.ssh("pkill", "-KILL", "-f", "appliance-reade[r]")  # the pattern does not match itself
        deadline = time.monotonic() + 60
        while _snapshots_left(server):
            assert time.monotonic() < deadline, "the snapshot outlived its reader by a minute"
            time.sleep(0.5)
    finally:
        backup.kill()
        backup.communicate()
