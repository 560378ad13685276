# SPDX-License-Identifier: GPL-2.0-or-later
"""Capture end to end: real sshd in a namespace, the real CLI, real qcow2 chains read by stock qemu-img."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from appliance.domain.models import DEFAULT_BLOCK_SIZE
from appliance.lab import disks
from tests.conftest import points_json, run_cli
from tests.integration.helpers import chain_files, file_digest, point_raw_digest


def _backup(home: Path, host: str) -> dict[str, object]:
    r = run_cli(home, "backup", host)
    assert r.rc == 0, r.err
    return points_json(home, host)[-1]


def test_every_point_reads_back_exactly_as_the_disk_was(make_host, home: Path, tmp_path: Path) -> None:
    host = make_host(size=64 << 20)
    expected = []
    for step in range(4):
        if step:
            disks.write_extents(host.disk, 64 << 20, 0.02, seed=step, zero_fraction=0.01 if step == 2 else 0.0)
        expected.append(file_digest(host.disk))
        _backup(home, host.name)
    files = chain_files(home, host.name)
    assert len(files) == 4
    for f, want in zip(files, expected, strict=True):
        assert point_raw_digest(f, 64 << 20, tmp_path) == want
    # A plain qcow2 chain with relative backing names, as stock tools see it.
    info = subprocess.run(
        ["qemu-img", "info", "--backing-chain", str(files[-1])], capture_output=True, text=True, check=True
    ).stdout
    for older in files[:-1]:
        assert f"backing file: {older.name} " in info
    assert "backing file format: qcow2" in info


def test_incremental_sends_only_changed_blocks_and_full_is_sparse(make_host, home: Path) -> None:
    host = make_host(size=64 << 20, data=0.25)
    full = _backup(home, host.name)
    allocated = int(os.stat(home / "store" / host.name / full["disks"][0]["file"]).st_blocks) * 512  # type: ignore[index]
    data_bytes = 64 * 2**20 - _zero_bytes(host.disk)
    assert full["sent_bytes"] <= data_bytes + (1 << 20)
    assert allocated < data_bytes * 1.1 + (2 << 20), "zero blocks must not land on disk"
    unchanged = _backup(home, host.name)
    assert unchanged["sent_bytes"] == 0 and unchanged["changed_bytes"] == 0
    assert unchanged["wire_bytes"] < 200_000  # hash prefixes of data blocks only, zero runs coded
    # One 4 KiB write: exactly one block travels.
    block = DEFAULT_BLOCK_SIZE
    fd = os.open(host.disk, os.O_WRONLY)
    os.pwrite(fd, b"\xab" * 4096, 5 * block + 8192)
    os.close(fd)
    one = _backup(home, host.name)
    assert one["sent_bytes"] == block


def _zero_bytes(path: str) -> int:
    zero = bytes(DEFAULT_BLOCK_SIZE)
    n = 0
    with open(path, "rb") as f:
        while block := f.read(DEFAULT_BLOCK_SIZE):
            n += len(block) if block == zero[: len(block)] else 0
    return n


def test_block_that_became_zero_reads_zero_not_the_backing_data(make_host, home: Path, tmp_path: Path) -> None:
    """The FUSE trap: a punched hole in an overlay would read the backing file's old data."""
    host = make_host(size=16 << 20, data=0.0)
    fd = os.open(host.disk, os.O_WRONLY)
    os.pwrite(fd, b"\x5a" * (1 << 20), 2 << 20)
    os.fsync(fd)
    _backup(home, host.name)
    os.pwrite(fd, bytes(1 << 20), 2 << 20)
    os.fsync(fd)
    os.close(fd)
    p = _backup(home, host.name)
    assert p["changed_bytes"] == 1 << 20 and p["sent_bytes"] == 0
    assert point_raw_digest(chain_files(home, host.name)[-1], 16 << 20, tmp_path) == file_digest(host.disk)


def test_odd_sized_disk_and_changes_in_its_last_partial_block(make_host, home: Path, tmp_path: Path) -> None:
    host = make_host(size=(16 << 20) + 512 * 7, data=0.3)  # no block size divides it
    size = disks.disk_size(host.disk)
    _backup(home, host.name)
    fd = os.open(host.disk, os.O_WRONLY)
    os.pwrite(fd, b"tail!" * 100, size - 600)
    os.close(fd)
    _backup(home, host.name)
    for f in chain_files(home, host.name)[-1:]:
        assert point_raw_digest(f, size, tmp_path) == file_digest(host.disk)
    assert run_cli(home, "verify", host.name).rc == 0


def test_grown_and_shrunk_disk(make_host, home: Path, tmp_path: Path) -> None:
    host = make_host(size=(8 << 20) + 512 * 3, data=0.5)
    _backup(home, host.name)
    os.truncate(host.disk, (12 << 20) + 512 * 5)
    disks.write_extents(host.disk, (12 << 20) + 512 * 5, 0.05, seed=9)
    grown = _backup(home, host.name)
    assert point_raw_digest(chain_files(home, host.name)[-1], (12 << 20) + 512 * 5, tmp_path) == file_digest(host.disk)
    assert grown["disks"][0]["size"] == (12 << 20) + 512 * 5  # type: ignore[index]
    os.truncate(host.disk, 6 << 20)
    _backup(home, host.name)
    assert point_raw_digest(chain_files(home, host.name)[-1], 6 << 20, tmp_path) == file_digest(host.disk)
    assert run_cli(home, "verify", host.name).rc == 0


def test_block_device_disk(make_host, home: Path, tmp_path: Path) -> None:
    host = make_host(size=32 << 20, loop=True)
    assert host.disk.startswith("/dev/loop")
    _backup(home, host.name)
    disks.write_extents(host.disk, 32 << 20, 0.03, seed=4)
    _backup(home, host.name)
    assert point_raw_digest(chain_files(home, host.name)[-1], 32 << 20, tmp_path) == file_digest(host.disk)


def test_two_disks_make_one_point(make_host, home: Path, tmp_path: Path) -> None:
    host = make_host(size=16 << 20, disks=2)
    second = Path(host.folder) / "disk1.img"
    _backup(home, host.name)
    disks.write_extents(second, disks.disk_size(str(second)), 0.05, seed=3)
    p = _backup(home, host.name)
    assert [d["slot"] for d in p["disks"]] == ["disk0", "disk1"]  # type: ignore[index]
    assert p["disks"][0]["changed_bytes"] == 0  # type: ignore[index]
    image = home / "store" / host.name / p["disks"][1]["file"]  # type: ignore[index]
    assert point_raw_digest(image, disks.disk_size(str(second)), tmp_path) == file_digest(second)


def test_a_home_deeper_than_a_unix_socket_path_can_be(make_host, lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """qemu-storage-daemon's QMP socket lives in the home's run folder; past AF_UNIX's 107 bytes it goes to
    a short private folder instead of failing every backup."""
    from tests.integration.helpers import host_add

    deep = tmp_path / ("a-folder-with-a-long-name-" * 5) / "home"
    host = make_host(add=False)
    assert run_cli(deep, *host_add(host, lab.key_file, "--trust-first-use")).rc == 0
    r = run_cli(deep, "backup", host.name)
    assert r.rc == 0, r.err
    assert run_cli(deep, "verify", host.name).rc == 0
