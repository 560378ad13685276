# SPDX-License-Identifier: GPL-2.0-or-later
"""Failback on real libvirt, QEMU and sshd: the recovery VM writes while running; afterwards the target
disk, booted directly with qemu-system-x86_64, shows what it wrote."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.errors import (
    ChainLockedError,
    ConfigError,
    ConnectionLostError,
    FailoverError,
    HostKeyError,
    RemoteCommandError,
)
from appliance.lab import LabHost, guest
from appliance.lab.boot import boot_and_read
from tests.conftest import points_json, run_cli, start_cli

HOSTILE_WRITER = Path(__file__).with_name("hostile_writer.py")

WRITES = (
    "echo written-in-failover > /root/marker.txt\n"
    "dd if=/dev/urandom of=/root/churn.bin bs=1M count=8 2>/dev/null\n"
    "sha256sum /root/churn.bin > /root/churn.sha256\n"  # what the guest wrote, to hold the target's copy to
    "sync\n"
    "( while :; do date >> /root/ticks.txt; sync; sleep 0.2; done ) &\n"  # the guest never stops writing
)


@pytest.fixture
def failed_over(make_host, guest_image: Path, home: Path):  # type: ignore[no-untyped-def]
    """A lab host on the lab guest, backed up, failed over; its guest writes to its disk when it boots."""
    host = make_host(image=guest_image)
    # booted = its writes are done: the autorun's end line on the console
    assert run_cli(home, "host", "set", host.name, "--boot-check", "console:APPLIANCE-AUTORUN-DONE rc=0",
                   "--vm-memory", "256").rc == 0  # fmt: skip
    guest.set_marker(host.disk, "original")
    guest.write_autorun(host.disk, WRITES)
    assert run_cli(home, "backup", host.name).rc == 0
    r = run_cli(home, "failover", host.name, "--accel", "tcg", "--timeout", "180")
    assert r.rc == 0, r.out + r.err
    yield host
    run_cli(home, "failover", "stop", host.name)


def _target(make_host, size: int = 1 << 30):  # type: ignore[no-untyped-def]
    return make_host(size=size, data=0.0, add=False)


def _failback(home: Path, host, target, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_cli(home, "failback", host.name, "--to", f"root@{target.address}",
                   "--disk", f"{host.disk}={target.disk}", "--trust-first-use", *extra, env=env)  # fmt: skip


def _boots_with(disk: str, marker: str, churned: bool = True) -> None:
    """The target holds what the VM wrote (when `churned`: its VM ran the WRITES), and boots a copy of itself
    showing `marker`. Read before the boot: the copy's boot runs the guest's autorun again, which writes the same
    files anew."""
    if churned:
        _holds_what_the_guest_wrote(disk)
    copy = Path(disk + ".boot")
    shutil.copyfile(disk, copy)
    try:
        _, up = boot_and_read(copy, "raw")
        assert up == f"APPLIANCE-GUEST-UP marker={marker}"  # printed from the disk, before the autorun
        assert guest.read_marker(copy) == marker
    finally:
        copy.unlink()


def _holds_what_the_guest_wrote(disk: str) -> None:
    """The 8 MiB of random data the recovery VM wrote, byte for byte: its sha256 as the guest computed it."""
    churn = guest.read_file(disk, "/churn.bin")
    recorded = guest.read_file(disk, "/churn.sha256")
    assert churn is not None and recorded is not None
    assert len(churn) == 8 << 20
    assert hashlib.sha256(churn).hexdigest() == recorded.split()[0].decode()


def test_failback_to_a_blank_disk_carries_the_vms_writes(failed_over, make_host, home: Path) -> None:
    host = failed_over
    target = _target(make_host)
    r = _failback(home, host, target)
    assert r.rc == 0, r.out + r.err
    assert "downtime" in r.out and "verified" in r.err
    _boots_with(target.disk, "written-in-failover")  # with /churn.bin as the VM wrote it
    newest = points_json(home, host.name)[-1]
    assert "failback" in str(newest["extra"]["origin"])  # type: ignore[index]
    assert run_cli(home, "verify", host.name).rc == 0
    assert run_cli(home, "failover", "status").out.count(host.name) == 0
    status = run_cli(home, "failback", "status", host.name)
    assert "phase:               done" in status.out and newest["id"] in status.out


def test_a_target_that_holds_the_original_gets_little_more_than_the_writes(failed_over, make_host, home: Path) -> None:
    host = failed_over
    target = _target(make_host)
    subprocess.run(["cp", "--sparse=always", host.disk, target.disk], check=True)  # the server's old disk
    r = _failback(home, host, target)
    assert r.rc == 0, r.out + r.err
    sent = json.loads((home / "failback" / f"{host.name}.json").read_text())["bytes_sent"]
    assert sent < (8 << 20) * 1.2 + (4 << 20)  # the guest wrote 8 MiB of data, and a few blocks of metadata
    _boots_with(target.disk, "written-in-failover")


def test_offline_failback_from_kept_overlays(failed_over, make_host, home: Path) -> None:
    host = failed_over
    assert run_cli(home, "failover", "stop", host.name, "--keep").rc == 0
    target = _target(make_host)
    r = _failback(home, host, target)
    assert r.rc == 0, r.out + r.err
    _boots_with(target.disk, "written-in-failover")


@pytest.mark.parametrize("crash_at", ["failback.bulk_sent", "failback.guest_down"])
def test_an_interrupted_failback_resumes(failed_over, make_host, home: Path, crash_at: str) -> None:
    host = failed_over
    target = _target(make_host)
    r = _failback(home, host, target, env={"APPLIANCE_CRASH_AT": crash_at})
    assert r.rc == -signal.SIGKILL
    assert "done" not in run_cli(home, "failback", "status", host.name).out
    r = _failback(home, host, target)
    assert r.rc == 0, r.out + r.err
    _boots_with(target.disk, "written-in-failover")


def test_a_block_the_target_holds_wrong_fails_the_proof_then_a_new_run_repairs_it(
    failed_over, make_host, home: Path
) -> None:  # fmt: skip
    host = failed_over
    target = _target(make_host)
    r = _failback(home, host, target, env={"APPLIANCE_FAULT": "failback.bad_write"})
    assert r.rc == FailoverError.exit_code and "differs from the VM's disk in 1 blocks" in r.err, r.err
    assert host.name in run_cli(home, "failover", "status").out  # the VM's overlays are kept
    r = _failback(home, host, target)
    assert r.rc == 0, r.out + r.err
    _boots_with(target.disk, "written-in-failover")


def test_writes_the_dirty_tracking_missed_are_caught_before_the_vm_is_removed(
    failed_over, make_host, home: Path
) -> None:  # fmt: skip
    host = failed_over
    target = _target(make_host)
    r = _failback(home, host, target, env={"APPLIANCE_FAULT": "failback.missed_write"})
    assert r.rc == FailoverError.exit_code and "differs from what was sent" in r.err, r.err
    assert host.name in run_cli(home, "failover", "status").out
    r = _failback(home, host, target, "--full-proof")
    assert r.rc == 0, r.out + r.err
    _boots_with(target.disk, "written-in-failover")


def test_bad_requests_change_nothing(failed_over, make_host, lab, home: Path) -> None:  # type: ignore[no-untyped-def]
    host = failed_over
    small = _target(make_host, size=512 << 20)
    before = os.stat(small.disk).st_mtime_ns
    r = _failback(home, host, small)
    assert r.rc == FailoverError.exit_code and "less than" in r.err and "nothing was written" in r.err
    assert os.stat(small.disk).st_mtime_ns == before
    r = run_cli(home, "failback", host.name, "--to", f"root@{small.address}", "--disk", f"/dev/nope={small.disk}")
    assert r.rc == ConfigError.exit_code and "no disk '/dev/nope'" in r.err
    # the target's key was pinned by the first attempt; a new key is refused loudly, --trust-first-use or not
    pinned = _fingerprint(small)
    for f in Path(small.folder).glob("ssh_host_ed25519_key*"):
        f.unlink()
    lab.restart_sshd(small.name)
    new = _fingerprint(small)
    r = _failback(home, host, small)
    assert r.rc == HostKeyError.exit_code and "HOST KEY CHANGED" in r.err and pinned in r.err and new in r.err, r.err
    # the new key's fingerprint, checked out of band, pins it: the run goes on to the disk's size
    plain = ["failback", host.name, "--to", f"root@{small.address}", "--disk", f"{host.disk}={small.disk}"]
    r = run_cli(home, *plain, "--host-key-fingerprint", new)
    assert r.rc == FailoverError.exit_code and "less than" in r.err, r.err
    assert run_cli(home, *plain).rc == FailoverError.exit_code  # pinned for the next runs
    assert run_cli(home, "failover", "stop", host.name).rc == 0
    r = run_cli(home, "failback", host.name, "--to", f"root@{small.address}", "--disk", f"{host.disk}={small.disk}")
    assert r.rc == FailoverError.exit_code and "no recovery VM" in r.err


def test_manual_cutover_waits_for_the_word(failed_over, make_host, home: Path) -> None:
    host = failed_over
    target = _target(make_host)
    proc = start_cli(home, "failback", host.name, "--to", f"root@{target.address}", "--disk",
                     f"{host.disk}={target.disk}", "--trust-first-use", "--cutover", "manual")  # fmt: skip
    for _ in range(600):
        if "waiting for" in run_cli(home, "failback", "status", host.name).out:
            break
        time.sleep(0.2)
    status = run_cli(home, "failback", "status", host.name).out
    assert "waiting for" in status and "estimated downtime" in status
    assert proc.poll() is None  # the VM still runs; nothing is cut over yet
    for job, purpose in (("backup", "backup"), ("verify", "verify")):  # the failback holds the host's lock
        r = run_cli(home, job, host.name)
        assert r.rc == ChainLockedError.exit_code, r.err
        assert (
            r.error_lines[0]
            == f"error: {host.name} is busy: failback (pid {proc.pid}) is running; not starting {purpose}"
            and "Traceback" not in r.err
        ), r.err
    assert run_cli(home, "failback", host.name, "--cutover", "now").rc == 0
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    _boots_with(target.disk, "written-in-failover")


def test_a_target_disk_mounted_on_the_target_is_refused_unless_forced(
    failed_over, make_host, home: Path, tmp_path: Path
) -> None:  # fmt: skip
    host = failed_over
    # smaller than the VM's disk: with --force the run stops at the size check instead, still before any write
    target = make_host(size=512 << 20, data=0.0, loop=True, add=False)
    subprocess.run(["mkfs.ext4", "-q", target.disk], check=True)
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    # sshd's own mounts (`ip netns exec` gave it a mount namespace); --root keeps its root directory, which
    # is not the namespace's root where the appliance itself runs in a chroot
    on_target = ["nsenter", "--target", target.sshd_pid_file.read_text().strip(), "--mount", "--root"]
    subprocess.run([*on_target, "mount", "-o", "ro", target.disk, mount_point], check=True)
    try:
        before = _digest(target.image)
        r = _failback(home, host, target)
        assert r.rc == FailoverError.exit_code, r.err
        assert (
            r.error_lines[0]
            == f"error: target root@{target.address}: {target.disk} is mounted on {mount_point}; nothing was written"
            and "--force" in r.error_lines[1]
        ), r.err
        r = _failback(home, host, target, "--force")
        assert (
            f"--force: writing to {target.disk} on root@{target.address} although it is mounted on {mount_point}"
            in r.err
        ), r.err
        assert r.rc == FailoverError.exit_code and "less than" in r.err, r.err
        assert _digest(target.image) == before
    finally:
        subprocess.run([*on_target, "umount", mount_point], check=True)


HOSTILE = [  # what the stand-in for the writer does, the exit code, what the one error line says
    ("garbage", RemoteCommandError.exit_code, "does not speak the failback writer's protocol: expected b'H'"),
    ("huge-record", RemoteCommandError.exit_code, "a record of 4294967295 bytes, more than the"),
    ("huge-series", RemoteCommandError.exit_code, "4294967295 hashes after 0 for a disk of"),
    ("ends-early", RemoteCommandError.exit_code, "stopped (exit 3): hostile writer: giving up"),
    ("cut", ConnectionLostError.exit_code, "broke during the failback"),
]


def test_a_hostile_target_gets_one_line_and_changes_nothing(
    failed_over, make_host, home: Path, tmp_path: Path
) -> None:  # fmt: skip
    host = failed_over
    target = _target(make_host)
    wrapper = tmp_path / "hostile-python"
    assert run_cli(home, "host", "set", host.name, "--python", str(wrapper)).rc == 0  # the target's interpreter too
    points = points_json(home, host.name)
    for mode, exit_code, says in HOSTILE:
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HOSTILE_WRITER} {mode} "$@"\n')
        wrapper.chmod(0o700)
        r = _failback(home, host, target)
        assert r.rc == exit_code and says in r.error_lines[0], (mode, r.err)
        assert [line for line in r.err.splitlines() if line.startswith("error:")] == [r.error_lines[0]], (mode, r.err)
        assert points_json(home, host.name) == points
        vm = [line for line in run_cli(home, "failover", "status").out.splitlines() if host.name in line]
        assert len(vm) == 1 and "running" in vm[0], (mode, vm)


def _fingerprint(lab_host: LabHost) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(lab_host.host_key_pub)], capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
