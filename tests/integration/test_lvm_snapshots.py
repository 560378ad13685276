# SPDX-License-Identifier: GPL-2.0-or-later
"""The reader's LVM snapshot method, around a stand-in `lvm` (fake_lvm.py): which disks are volumes, how
a snapshot is made and sized, that the disk is then read from it, that a full one is caught, and that no
snapshot outlives its reader. This machine's kernel has no device-mapper; the real LVM runs in
tests/heavy, inside the busy server."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.agent import reader
from tests.conftest import points_json, run_cli

FAKE_LVM = Path(__file__).with_name("fake_lvm.py")
MiB = 1 << 20


class FakeLvm:
    def __init__(self, state: Path) -> None:
        self.state = state

    def read(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.state.read_text())  # type: ignore[no-any-return]

    def write(self, doc: dict) -> None:  # type: ignore[type-arg]
        self.state.write_text(json.dumps(doc))

    def update(self, **changes: object) -> None:
        doc = self.read()
        doc.update(changes)
        self.write(doc)

    def calls(self, command: str) -> list[list[str]]:
        return [c for c in self.read()["calls"] if c[0] == command]

    def names(self) -> list[str]:
        return [lv["lv_name"] for lv in self.read()["lvs"]]


def _loop(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return subprocess.run(["losetup", "--find", "--show", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def _row(device: str, name: str, segtype: str, free: int = 100) -> dict[str, str]:
    st = os.stat(device)
    return {
        "vg_name": "vg0", "lv_name": name, "lv_path": f"/dev/vg0/{name}", "lv_attr": "-wi-ao----",
        "segtype": segtype, "pool_lv": "pool" if segtype == "thin" else "",
        "lv_kernel_major": str(os.major(st.st_rdev)), "lv_kernel_minor": str(os.minor(st.st_rdev)),
        "lv_size": str(8 * MiB), "lv_tags": "",
        "vg_free_count": str(free), "vg_extent_size": str(4 * MiB), "snap_percent": "", "data_percent": "12.50",
    }  # fmt: skip


@pytest.fixture
def devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, FakeLvm]]:
    """(an 'LVM volume' of 8 MiB of 0xAA, the device its snapshot appears as, of 0xBB, the fake lvm)."""
    if os.geteuid() != 0:
        pytest.fail("loop devices need root")
    origin = _loop(tmp_path / "origin.img", b"\xaa" * (8 * MiB))
    snapshot = _loop(tmp_path / "snapshot.img", b"\xbb" * (8 * MiB))
    fake = FakeLvm(tmp_path / "lvm.json")
    fake.write({"lvs": [], "calls": [], "snapshot_device": snapshot})
    monkeypatch.setenv("FAKE_LVM_STATE", str(fake.state))
    monkeypatch.setattr(reader, "LVM", (str(FAKE_LVM),))
    try:
        yield origin, snapshot, fake
    finally:
        for device in (origin, snapshot):
            subprocess.run(["losetup", "-d", device], check=False)


class Keeper:
    """What the watchdog was told: the snapshots it must remove if the reader goes away."""

    def __init__(self) -> None:
        self.kept: list[str] = []

    def keep(self, name: str) -> None:
        self.kept.append(name)

    def forget(self, name: str) -> None:
        self.kept.remove(name)


def test_a_thin_volume_is_read_from_its_snapshot_which_is_then_removed(devices) -> None:  # type: ignore[no-untyped-def]
    origin, _, fake = devices
    pool = dict(_row(origin, "pool", "thin-pool"), lv_kernel_minor="9999", data_percent="42.20")
    fake.update(lvs=[_row(origin, "data", "thin"), pool])
    disk = reader.Disk(0, origin, 65536)
    try:
        snapshots = reader.Snapshots([disk])
        keeper = Keeper()
        snapshots.take(keeper)
        name = f"data-appliance-{os.getpid()}"
        assert keeper.kept == [f"vg0/{name}"] and name in fake.names()
        (create,) = fake.calls("lvcreate")
        assert "--setactivationskip" in create and "--extents" not in create and create[-1] == "vg0/data"
        assert disk.read(0, 4096) == b"\xbb" * 4096  # from the snapshot, not the changing volume
        assert snapshots.overflowed() == []
        assert snapshots.snapshots[0].describe() == "vg0/data: thin snapshot, pool vg0/pool 42% full"
        snapshots.remove(keeper)
        assert keeper.kept == [] and fake.names() == ["data", "pool"]
        assert disk.read(0, 4096) == b"\xaa" * 4096
    finally:
        disk.close()


def test_a_thick_snapshot_gets_the_free_extents_up_to_the_volume_size(devices) -> None:  # type: ignore[no-untyped-def]
    origin, _, fake = devices
    for free, extents in ((100, 2 + 2 + 0), (3, 3)):  # 8 MiB = 2 extents of 4 MiB, plus room for its table
        fake.update(lvs=[_row(origin, "data", "linear", free=free)], calls=[])
        disk = reader.Disk(0, origin, 65536)
        try:
            snapshots, keeper = reader.Snapshots([disk]), Keeper()
            snapshots.take(keeper)
            (create,) = fake.calls("lvcreate")
            assert create[create.index("--extents") + 1] == str(extents)
            snapshots.remove(keeper)
        finally:
            disk.close()


def test_no_free_extents_means_no_snapshot_and_nothing_left(devices) -> None:  # type: ignore[no-untyped-def]
    origin, _, fake = devices
    fake.update(lvs=[_row(origin, "data", "linear", free=0)])
    disk = reader.Disk(0, origin, 65536)
    try:
        keeper = Keeper()
        with pytest.raises(reader.Unavailable, match="no free extents"):
            reader.Snapshots([disk]).take(keeper)
        assert keeper.kept == [] and fake.calls("lvcreate") == [] and disk.read(0, 16) == b"\xaa" * 16
    finally:
        disk.close()


def test_a_failed_lvcreate_says_why(devices) -> None:  # type: ignore[no-untyped-def]
    origin, _, fake = devices
    refusal = "Cannot create new thin volume, free space in thin pool vg0/pool reached threshold."
    fake.update(lvs=[_row(origin, "data", "thin")], fail={"lvcreate": refusal})
    disk = reader.Disk(0, origin, 65536)
    try:
        keeper = Keeper()
        with pytest.raises(reader.Unavailable, match="lvm lvcreate: Cannot create new thin volume"):
            reader.Snapshots([disk]).take(keeper)
        assert keeper.kept == []
    finally:
        disk.close()


def test_a_thick_snapshot_that_filled_up_is_caught(devices) -> None:  # type: ignore[no-untyped-def]
    origin, _, fake = devices
    fake.update(lvs=[_row(origin, "data", "linear")])
    disk = reader.Disk(0, origin, 65536)
    try:
        snapshots, keeper = reader.Snapshots([disk]), Keeper()
        snapshots.take(keeper)
        doc = fake.read()
        doc["lvs"][1].update(lv_attr="swi-I-s---", snap_percent="100.00")  # what LVM shows once it is invalid
        fake.write(doc)
        assert [s.origin for s in snapshots.overflowed()] == ["vg0/data"]
        snapshots.remove(keeper)
        assert fake.names() == ["data"]
    finally:
        disk.close()


def test_disks_that_are_not_volumes_get_no_snapshot(devices, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    origin, _, fake = devices
    fake.update(lvs=[])
    disk = reader.Disk(0, origin, 65536)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    file_disk = reader.Disk(0, str(image), 65536)
    try:
        with pytest.raises(reader.Unavailable, match="is not an LVM volume"):
            reader.Snapshots([disk])
        with pytest.raises(reader.Unavailable, match="image file"):
            reader.Snapshots([file_disk])
        plan = reader.consistency_plan(
            {"disks": [{"path": origin, "block_size": 65536}], "consistency": "lvm-snapshot"}
        )
        assert plan == ("live", f"no LVM snapshot: {origin} is not an LVM volume")
    finally:
        disk.close()
        file_disk.close()


def test_stale_snapshots_of_dead_readers_are_removed(devices) -> None:  # type: ignore[no-untyped-def]
    origin, _, fake = devices
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = dict(_row(origin, f"data-appliance-{dead.pid}", "linear"), lv_tags=reader.SNAPSHOT_TAG)
    alive = dict(_row(origin, "data-appliance-1", "linear"), lv_tags=reader.SNAPSHOT_TAG)  # pid 1: alive
    theirs = dict(_row(origin, f"data-appliance-{dead.pid}-x", "linear"), lv_tags="")  # not tagged: not ours
    fake.update(lvs=[_row(origin, "data", "thin"), stale, alive, theirs])
    reader._remove_stale_snapshots(str(FAKE_LVM), reader.logical_volumes(str(FAKE_LVM)))
    assert fake.names() == ["data", "data-appliance-1", f"data-appliance-{dead.pid}-x"]


def test_the_watchdog_removes_the_snapshots_of_a_reader_that_went_away(devices) -> None:  # type: ignore[no-untyped-def]
    _, _, fake = devices
    session_read, session_write = os.pipe()
    try:
        watchdog = reader.Watchdog([], 10.0, session_write, str(FAKE_LVM))
        watchdog.keep("vg0/a-appliance-1")
        watchdog.keep("vg0/b-appliance-1")
        watchdog.forget("vg0/a-appliance-1")  # the reader removed that one itself
        watchdog.proc.stdin.close()  # the reader is gone: its pipe to the watchdog closed
        watchdog.proc.wait(30)
    finally:
        os.close(session_read)
        os.close(session_write)
    assert fake.calls("lvremove") == [["lvremove", "--force", "--yes", "vg0/b-appliance-1"]]


def test_a_host_asked_for_snapshots_of_a_plain_disk_gets_a_live_point_that_says_why(make_host, home: Path) -> None:  # type: ignore[no-untyped-def]
    host = make_host(size=64 << 20, data=0.2, loop=True)
    assert run_cli(home, "host", "set", host.name, "--consistency", "lvm-snapshot").rc == 0
    r = run_cli(home, "backup", host.name)
    assert r.rc == 0, r.err
    assert "backup.live_read" in r.err and "no LVM snapshot:" in r.err, r.err
    assert points_json(home, host.name)[-1]["consistency"]["kind"] == "live"  # type: ignore[index]
