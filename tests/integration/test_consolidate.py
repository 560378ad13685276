# SPDX-License-Identifier: GPL-2.0-or-later
"""Consolidation on real qcow2 chains: every kept point reads byte for byte as before, merging costs the
data of the points involved (never the disk), a kill at any moment is finished by the next run."""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest

from appliance.errors import ChainCorruptError, ChainLockedError, ConfigError, StoreFullError
from appliance.lab import disks
from tests.conftest import points_json, run_cli, start_cli
from tests.integration.helpers import point_raw_digest, store_state, wait_for_lock

SIZE = 32 << 20


def _chain(make_host, home: Path, points: int, size: int = SIZE):  # type: ignore[no-untyped-def]
    host = make_host(size=size, data=0.3)
    for seed in range(points):
        if seed:
            disks.write_extents(host.disk, size, 0.03, seed=seed, zero_fraction=0.005)
        r = run_cli(home, "backup", host.name)
        assert r.rc == 0, r.err
    return host


def _digests(home: Path, host: str, scratch: Path) -> dict[str, str]:
    """Every listed point's raw content, read by stock qemu-img."""
    out = {}
    for p in points_json(home, host):
        d = p["disks"][0]  # type: ignore[index]
        out[str(p["id"])] = point_raw_digest(home / "store" / host / d["file"], d["size"], scratch)
    return out


def _files(home: Path, host: str) -> set[str]:
    return {p.name for p in (home / "store" / host).rglob("*") if p.is_file()}


def test_many_merges_keep_every_kept_point_identical(make_host, home: Path, tmp_path: Path) -> None:
    host = _chain(make_host, home, 8)
    before = _digests(home, host.name, tmp_path)
    ids = list(before)
    # drop the oldest (the base), some in the middle, and keep the newest
    assert run_cli(home, "host", "set", host.name, "--keep-last", "5").rc == 0
    r = run_cli(home, "consolidate", host.name, "--dry-run")
    assert r.rc == 0 and r.out.count("merge ") == 3 and "last 5/5" in r.out
    assert [p["id"] for p in points_json(home, host.name)] == ids  # a dry run changes nothing
    r = run_cli(home, "consolidate", host.name)
    assert r.rc == 0, r.err
    after = _digests(home, host.name, tmp_path)
    assert list(after) == ids[3:]
    assert after == {k: before[k] for k in ids[3:]}
    assert run_cli(home, "verify", host.name).rc == 0
    assert _files(home, host.name) == {"chain.json", "lock"} | {f"{i}.qcow2" for i in ids[3:]} | {f"{ids[-1]}.hashes"}
    # then again down to two: the oldest, now a merged base, goes too; backups go on incrementally
    assert run_cli(home, "host", "set", host.name, "--keep-last", "2").rc == 0
    assert run_cli(home, "consolidate", host.name).rc == 0
    assert _digests(home, host.name, tmp_path) == {k: before[k] for k in ids[-2:]}
    disks.write_extents(host.disk, SIZE, 0.02, seed=99)
    assert run_cli(home, "backup", host.name).rc == 0
    assert points_json(home, host.name)[-1]["sent_bytes"] < SIZE // 10
    assert run_cli(home, "verify", host.name).rc == 0


def test_merging_costs_the_points_data_not_the_disk(make_host, home: Path) -> None:
    """A 1 GiB disk with 30 % data, changes of 3 %: merging the two older points away writes about the
    data of the two newer points, not the 300 MiB base."""
    host = _chain(make_host, home, 3, size=1 << 30)
    folder = home / "store" / host.name / "disk0"
    ids = [p["id"] for p in points_json(home, host.name)]
    base = (folder / f"{ids[0]}.qcow2").stat().st_blocks * 512
    merged_in = sum((folder / f"{i}.qcow2").stat().st_blocks * 512 for i in ids[1:])
    assert run_cli(home, "host", "set", host.name, "--keep-last", "1").rc == 0
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512
    r = run_cli(home, "consolidate", host.name)
    written = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512 - before
    assert r.rc == 0, r.err
    assert base > 250 << 20
    assert written < 2 * merged_in + (8 << 20), (written, merged_in, base)


CRASH_POINTS = ["consolidate.marked", "consolidate.committed:2", "consolidate.renamed:3"]


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_killed_mid_merge_then_finished(make_host, home: Path, tmp_path: Path, crash_at: str) -> None:
    host = _chain(make_host, home, 6)
    before = _digests(home, host.name, tmp_path)
    assert run_cli(home, "host", "set", host.name, "--keep-last", "2").rc == 0
    r = run_cli(home, "consolidate", host.name, env={"APPLIANCE_CRASH_AT": crash_at})
    assert r.rc == -signal.SIGKILL
    listed = [p for p in points_json(home, host.name) if not p["dropping"]]
    # every point still listed as a point reads exactly as before
    for p in listed:
        d = p["disks"][0]  # type: ignore[index]
        assert point_raw_digest(home / "store" / host.name / d["file"], d["size"], tmp_path) == before[str(p["id"])]
    # a backup in between is refused while the chain is mid-merge? no: it finishes on top of the chain
    r = run_cli(home, "consolidate", host.name)
    assert r.rc == 0, r.err
    ids = list(before)
    assert _digests(home, host.name, tmp_path) == {k: before[k] for k in ids[-2:]}
    assert _files(home, host.name) == {"chain.json", "lock"} | {f"{i}.qcow2" for i in ids[-2:]} | {f"{ids[-1]}.hashes"}
    assert run_cli(home, "verify", host.name).rc == 0


def test_killed_at_random_moments_of_consolidation(make_host, home: Path, tmp_path: Path) -> None:
    host = _chain(make_host, home, 12, size=64 << 20)
    before = _digests(home, host.name, tmp_path)
    assert run_cli(home, "host", "set", host.name, "--keep-last", "3").rc == 0
    rng = random.Random(3)
    for _ in range(5):
        proc = start_cli(home, "consolidate", host.name)
        time.sleep(rng.uniform(0.3, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        for p in points_json(home, host.name):
            if not p["dropping"]:
                d = p["disks"][0]  # type: ignore[index]
                digest = point_raw_digest(home / "store" / host.name / d["file"], d["size"], tmp_path)
                assert digest == before[str(p["id"])]
    assert run_cli(home, "consolidate", host.name).rc == 0
    ids = list(before)
    assert _digests(home, host.name, tmp_path) == {k: before[k] for k in ids[-3:]}
    assert run_cli(home, "verify", host.name).rc == 0


def test_points_a_recovery_vm_needs_are_deferred(make_host, guest_image, home: Path) -> None:  # type: ignore[no-untyped-def]
    host = make_host(image=guest_image)
    assert (
        run_cli(home, "host", "set", host.name, "--boot-check", "console:APPLIANCE-GUEST-UP", "--vm-memory", "256").rc
        == 0
    )
    for n in range(5):
        from appliance.lab import guest

        guest.set_marker(host.disk, f"p{n}")
        assert run_cli(home, "backup", host.name).rc == 0
    ids = [p["id"] for p in points_json(home, host.name)]
    r = run_cli(home, "failover", host.name, "--point", str(ids[2]), "--timeout", "180")
    assert r.rc == 0, r.err
    try:
        assert run_cli(home, "host", "set", host.name, "--keep-last", "1").rc == 0
        r = run_cli(home, "consolidate", host.name)
        assert r.rc == 0, r.err
        assert "deferred" in r.out and "pinned: failover VM" in r.out
        left = [p["id"] for p in points_json(home, host.name)]
        assert left == [ids[0], ids[1], ids[2], ids[4]]  # ids[3] merged; older than the pinned point deferred
    finally:
        assert run_cli(home, "failover", "stop", host.name).rc == 0
    assert run_cli(home, "consolidate", host.name).rc == 0
    assert [p["id"] for p in points_json(home, host.name)] == [ids[4]]
    r = run_cli(home, "failover", host.name, "--timeout", "180")
    assert r.rc == 0 and "marker=p4" in r.out
    run_cli(home, "failover", "stop", host.name)


def test_consolidation_and_backup_never_run_at_once(make_host, home: Path) -> None:
    host = _chain(make_host, home, 3)
    assert run_cli(home, "host", "set", host.name, "--keep-last", "1", "--pre-hook", "sleep 3").rc == 0
    backup = start_cli(home, "backup", host.name)
    wait_for_lock(home, host.name)
    r = run_cli(home, "consolidate", host.name)
    assert r.rc == ChainLockedError.exit_code and "busy" in r.err
    assert backup.wait(60) == 0
    assert run_cli(home, "consolidate", host.name, "--wait", "30").rc == 0
    assert len(points_json(home, host.name)) == 1


def test_store_full_mid_merge_keeps_the_chain(make_host, lab, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "small"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(home)], check=True)
    try:
        host = make_host(add=False, size=48 << 20, data=0.0)
        from tests.integration.helpers import host_add

        assert run_cli(home, *host_add(host, lab.key_file, "--trust-first-use")).rc == 0
        for seed in range(3):  # three points, 10 MiB each in a place of its own: merging needs room
            fd = os.open(host.disk, os.O_WRONLY)
            os.pwrite(fd, disks.noise(10 << 20, seed), seed * (12 << 20))
            os.close(fd)
            assert run_cli(home, "backup", host.name).rc == 0
        before = _digests(home, host.name, tmp_path)
        st = os.statvfs(home)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used + (2 << 20)}", str(home)], check=True)
        assert run_cli(home, "host", "set", host.name, "--keep-last", "1").rc == 0
        r = run_cli(home, "consolidate", host.name)
        assert r.rc == StoreFullError.exit_code, r.out + r.err
        assert "Traceback" not in r.err
        for p in points_json(home, host.name):
            if not p["dropping"]:
                d = p["disks"][0]  # type: ignore[index]
                assert (
                    point_raw_digest(home / "store" / host.name / d["file"], d["size"], tmp_path)
                    == before[str(p["id"])]
                )
        subprocess.run(["mount", "-o", "remount,size=160m", str(home)], check=True)
        assert run_cli(home, "consolidate", host.name).rc == 0
        assert _digests(home, host.name, tmp_path) == {k: before[k] for k in list(before)[-1:]}
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_a_corrupted_point_stops_the_merge_and_keeps_everything(make_host, home: Path) -> None:
    host = _chain(make_host, home, 4)
    ids = [p["id"] for p in points_json(home, host.name)]
    second = home / "store" / host.name / "disk0" / f"{ids[1]}.qcow2"
    with open(second, "r+b") as f:
        f.write(b"\0" * 4)  # its qcow2 magic
    before = store_state(home, host.name)
    assert run_cli(home, "host", "set", host.name, "--keep-last", "1").rc == 0
    r = run_cli(home, "consolidate", host.name)
    assert r.rc == ChainCorruptError.exit_code, r.err
    assert f"check failed on {ids[1]}.qcow2" in r.err and "Traceback" not in r.err
    assert store_state(home, host.name) == before  # not even the catalog changed


def test_invalid_policy_and_interval(make_host, home: Path) -> None:
    host = _chain(make_host, home, 1)
    for args in (["--keep-last", "-1"], ["--interval", "soon"], ["--interval", "0m"]):
        r = run_cli(home, "host", "set", host.name, *args)
        assert (
            r.rc == ConfigError.exit_code
            and r.error_lines[0].startswith("error: invalid ")
            and "Traceback" not in r.err
        ), (args, r.err)
