# SPDX-License-Identifier: GPL-2.0-or-later
"""Interrupted captures: killed appliance, cut connection, dead link, full store. The chain must stay
exactly as it was (catalog and every file byte for byte), and the next run must complete."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from appliance.errors import ChainCorruptError, ConnectionLostError, StoreFullError
from appliance.lab import Lab, disks
from appliance.store.chains import INTENT
from tests.conftest import points_json, run_cli, start_cli
from tests.integration.helpers import (
    chain_files,
    file_digest,
    host_add,
    point_raw_digest,
    store_state,
    wait_for_transfer,
)


def _assert_unchanged(home: Path, host: str, before: dict[str, str]) -> None:
    """Every file of the chain is as it was; anything new is an invisible leftover (hidden partial)."""
    after = store_state(home, host)
    for name, digest in before.items():
        if Path(name).name.startswith("."):
            continue  # a leftover of an earlier interrupted run: the next run removes it
        assert after.get(name) == digest, f"{name} changed"
    extra = set(after) - set(before)
    assert all(Path(e).name.startswith(".") or e.endswith((".qcow2", ".hashes")) or e == INTENT for e in extra), extra
    listed = {p["id"] for p in points_json(home, host)}
    assert all(Path(e).name.split(".")[0].lstrip(".") not in listed for e in extra)


def _next_run_completes(home: Path, host, expected_points: int) -> None:  # type: ignore[no-untyped-def]
    r = run_cli(home, "backup", host.name)
    assert r.rc == 0, r.err
    assert len(points_json(home, host.name)) == expected_points
    v = run_cli(home, "verify", host.name)
    assert v.rc == 0, v.out + v.err
    leftovers = [p for p in (home / "store" / host.name).rglob(".*") if p.is_file()]
    assert leftovers == []
    assert list((home / "run" / host.name).iterdir()) == []


CRASH_POINTS = [
    "capture.created",
    "capture.data:3",
    "capture.written",
    "capture.export_closed",
    "capture.before_rename",
    "capture.renaming",
    "capture.before_catalog",
]


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_killed_at_each_step_leaves_the_chain_as_it_was(make_host, home: Path, crash_at: str, tmp_path: Path) -> None:
    host = make_host(size=32 << 20)
    assert run_cli(home, "backup", host.name).rc == 0
    disks.write_extents(host.disk, 32 << 20, 0.05, seed=5)
    before = store_state(home, host.name)
    r = run_cli(home, "backup", host.name, env={"APPLIANCE_CRASH_AT": crash_at})
    assert r.rc == -signal.SIGKILL, r.err
    _assert_unchanged(home, host.name, before)
    _next_run_completes(home, host, 2)
    assert point_raw_digest(chain_files(home, host.name)[-1], 32 << 20, tmp_path) == file_digest(host.disk)


def test_killed_after_the_catalog_keeps_a_complete_point(make_host, home: Path, tmp_path: Path) -> None:
    host = make_host(size=32 << 20)
    r = run_cli(home, "backup", host.name, env={"APPLIANCE_CRASH_AT": "capture.after_catalog"})
    assert r.rc == -signal.SIGKILL
    assert len(points_json(home, host.name)) == 1
    assert point_raw_digest(chain_files(home, host.name)[0], 32 << 20, tmp_path) == file_digest(host.disk)
    _next_run_completes(home, host, 2)


def test_killed_at_random_moments(make_host, home: Path) -> None:
    """Killed anywhere, a run leaves the chain as it was, or (killed after its catalog write) one more
    complete point; never anything in between."""
    host = make_host(size=512 << 20, data=0.4)
    assert run_cli(home, "backup", host.name).rc == 0
    rng = random.Random(7)
    for attempt in range(8):
        disks.write_extents(host.disk, 512 << 20, 0.1, seed=10 + attempt)
        before = store_state(home, host.name)
        listed = [p["id"] for p in points_json(home, host.name)]
        proc = start_cli(home, "backup", host.name)
        time.sleep(rng.uniform(0.05, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        now = [p["id"] for p in points_json(home, host.name)]
        if now == listed:
            _assert_unchanged(home, host.name, before)
        else:  # it finished before the kill: one more point, the older ones untouched
            assert now[:-1] == listed
            old_files = {k: v for k, v in before.items() if k.endswith(".qcow2")}
            assert {k: v for k, v in store_state(home, host.name).items() if k in old_files} == old_files
    _next_run_completes(home, host, len(points_json(home, host.name)) + 1)
    assert sorted(p.name for p in (home / "run").iterdir()) == [host.name]


def test_connection_cut_mid_transfer(make_host, lab: Lab, home: Path) -> None:
    host = make_host(size=1 << 30, data=0.5)
    marks = Path(host.folder) / "post.log"
    assert run_cli(home, "host", "set", host.name, "--post-hook", f"sh -c 'echo thawed >> {marks}'").rc == 0
    before = store_state(home, host.name) if (home / "store" / host.name).exists() else {}
    proc = start_cli(home, "backup", host.name)
    wait_for_transfer(home, host.name)
    lab.cut(host.name)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ConnectionLostError.exit_code, err
    assert "Traceback" not in err and "error: the connection to" in err and "broke: \n" not in err, err
    _assert_unchanged(home, host.name, before)
    for _ in range(50):  # the reader on the host runs the post hook once it sees the connection gone
        if marks.exists():
            break
        time.sleep(0.1)
    assert marks.read_text().split() == ["thawed"]
    _next_run_completes(home, host, 1)


def test_link_down_times_out_with_a_clear_error(make_host, lab: Lab, home: Path) -> None:
    host = make_host(size=1 << 30, data=0.5)
    assert run_cli(home, "host", "set", host.name, "--timeout", "3").rc == 0
    proc = start_cli(home, "backup", host.name)
    wait_for_transfer(home, host.name)
    subprocess.run(["ip", "link", "set", host.veth, "down"], check=True)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        subprocess.run(["ip", "link", "set", host.veth, "up"], check=True)
    assert proc.returncode == ConnectionLostError.exit_code, err
    assert "no data from" in err and "Traceback" not in err
    assert points_json(home, host.name) == []
    _next_run_completes(home, host, 1)


def test_store_full(make_host, lab: Lab, tmp_path: Path) -> None:
    """APPLIANCE_HOME on a small tmpfs: the point does not fit; nothing is recorded; room made, it works."""
    home = tmp_path / "small"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(home)], check=True)
    try:
        host = make_host(add=False, size=64 << 20, data=0.5)
        r = run_cli(home, *host_add(host, lab.key_file, "--trust-first-use"))
        assert r.rc == 0, r.err
        r = run_cli(home, "backup", host.name)
        assert r.rc == StoreFullError.exit_code, r.err
        assert "Traceback" not in r.err and "full" in r.err
        assert points_json(home, host.name) == []
        assert [p for p in (home / "store" / host.name).rglob("*.qcow2*")] == []
        subprocess.run(["mount", "-o", "remount,size=160m", str(home)], check=True)
        assert run_cli(home, "backup", host.name).rc == 0
        disks.write_extents(host.disk, 64 << 20, 0.3, seed=3)
        st = os.statvfs(home)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used + (4 << 20)}", str(home)], check=True)
        before = store_state(home, host.name)
        r = run_cli(home, "backup", host.name)
        assert r.rc == StoreFullError.exit_code, r.err
        _assert_unchanged(home, host.name, before)
        assert run_cli(home, "verify", host.name).rc == 0
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


def test_a_lost_catalog_never_deletes_points(make_host, home: Path) -> None:
    host = make_host(size=8 << 20)
    for seed in range(2):
        disks.write_extents(host.disk, 8 << 20, 0.05, seed=seed)
        assert run_cli(home, "backup", host.name).rc == 0
    files = sorted((home / "store" / host.name).rglob("*.qcow2"))
    (home / "store" / host.name / "chain.json").unlink()
    r = run_cli(home, "backup", host.name)
    assert r.rc == ChainCorruptError.exit_code and "not in the catalog" in r.err
    assert sorted((home / "store" / host.name).rglob("*.qcow2")) == files


def test_a_lost_catalog_of_a_single_point_is_not_taken_for_a_leftover(make_host, home: Path) -> None:
    host = make_host(size=8 << 20)
    assert run_cli(home, "backup", host.name).rc == 0
    (home / "store" / host.name / "chain.json").unlink()
    assert run_cli(home, "backup", host.name).rc == ChainCorruptError.exit_code
    assert len(list((home / "store" / host.name).rglob("*.qcow2"))) == 1
