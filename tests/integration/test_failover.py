# SPDX-License-Identifier: GPL-2.0-or-later
"""Failover boot on real libvirtd and QEMU: the lab guest's disk, backed up point by point, booted back.

Each point of the lab host's disk carries its own marker; booting point N must print marker N. The
chain's files must not change by a single byte while a recovery VM runs and writes to its disk.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from appliance.errors import ChainCorruptError, FailoverError, HostNotFoundError, HypervisorError, PointNotFoundError
from appliance.lab import guest
from tests.conftest import points_json, run_cli, start_cli
from tests.integration.helpers import store_state

UP = "console:APPLIANCE-GUEST-UP"


@pytest.fixture
def guest_host(make_host, guest_image: Path, home: Path):  # type: ignore[no-untyped-def]
    """A lab host whose disk is the lab guest, with three points: markers point-1, point-2, point-3."""
    host = make_host(image=guest_image)
    assert run_cli(home, "host", "set", host.name, "--boot-check", UP, "--vm-memory", "256").rc == 0
    for n in (1, 2, 3):
        guest.set_marker(host.disk, f"point-{n}")
        if n == 2:  # the guest of point 2 writes to its own disk when it boots
            guest.write_autorun(host.disk, "echo written-by-the-recovery-vm > /root/from-guest.txt\n")
        r = run_cli(home, "backup", host.name)
        assert r.rc == 0, r.err
    yield host
    run_cli(home, "failover", "stop", host.name)


def _virsh_list() -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True).stdout


def test_booting_a_point_shows_that_points_data_and_never_writes_the_chain(guest_host, home: Path) -> None:
    ids = [p["id"] for p in points_json(home, guest_host.name)]
    before = store_state(home, guest_host.name)
    r = run_cli(home, "failover", guest_host.name, "--point", str(ids[1]), "--timeout", "180")
    assert r.rc == 0, r.out + r.err
    assert "marker=point-2" in r.out and "RTO:" in r.out
    assert f"recovery-{guest_host.name}" in _virsh_list()
    pinned = {p["id"]: p["pinned"] for p in points_json(home, guest_host.name)}
    assert pinned[ids[1]] and f"recovery-{guest_host.name}" in str(pinned[ids[1]]) and pinned[ids[0]] is None
    status = run_cli(home, "failover", "status")
    assert guest_host.name in status.out and str(ids[1]) in status.out and "running" in status.out
    overlay = home / "failover" / guest_host.name / "disk0.qcow2"
    for _ in range(300):  # the guest's autorun writes to its disk: into the overlay, never the chain
        if "APPLIANCE-AUTORUN-DONE rc=0" in (home / "failover" / guest_host.name / "console.log").read_text():
            break
        time.sleep(0.1)
    stop = run_cli(home, "failover", "stop", guest_host.name, "--keep")
    assert stop.rc == 0, stop.err
    assert f"recovery-{guest_host.name}" not in _virsh_list()
    assert store_state(home, guest_host.name) == before
    raw = overlay.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(overlay), str(raw)], check=True)
    assert guest.read_file(raw, "/from-guest.txt") == b"written-by-the-recovery-vm\n"
    assert run_cli(home, "failover", "stop", guest_host.name).rc == 0
    assert not overlay.exists()


def test_the_newest_point_boots_by_default_on_sata_and_ide(guest_host, home: Path) -> None:
    for bus in ("sata", "ide"):
        r = run_cli(home, "failover", guest_host.name, "--disk-bus", bus, "--timeout", "180")
        assert r.rc == 0, r.out + r.err
        assert "marker=point-3" in r.out
        assert run_cli(home, "failover", "stop", guest_host.name).rc == 0


def test_boot_verification_records_verdict_rto_and_screenshot(guest_host, home: Path) -> None:
    r = run_cli(home, "verify", guest_host.name, "--boot", "--timeout", "180")
    assert r.rc == 0, r.out + r.err
    newest = points_json(home, guest_host.name)[-1]
    boot = newest["extra"]["boot"]  # type: ignore[index]
    assert boot["ok"] is True and boot["rto_seconds"] > 0 and "marker=point-3" in boot["detail"]
    shot = Path(boot["screenshot"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000
    assert "boot ok" in run_cli(home, "points", guest_host.name).out
    assert f"verify-{guest_host.name}" not in _virsh_list()
    assert not (home / "failover" / guest_host.name / "verify").exists()


def test_bad_requests_are_refused_clearly(guest_host, home: Path) -> None:
    r = run_cli(home, "failover", guest_host.name, "--point", "2001-01-01T00:00:00Z")
    assert r.rc == PointNotFoundError.exit_code and "no recovery point" in r.err
    r = run_cli(home, "failover", guest_host.name, "--network", "bridge=nosuchbr0")
    assert r.rc == FailoverError.exit_code and "no bridge 'nosuchbr0'" in r.err
    r = run_cli(home, "failover", guest_host.name, "--memory", str(1 << 19))  # 512 GiB
    assert r.rc == FailoverError.exit_code and "not enough memory" in r.err
    r = run_cli(home, "failover", guest_host.name, env={"APPLIANCE_LIBVIRT_URI": "qemu:///system?socket=/nonexistent"})
    assert (
        r.rc == HypervisorError.exit_code
        and "cannot connect to libvirt" in r.err
        and "systemctl start libvirtd" in r.err
    )
    assert run_cli(home, "failover", guest_host.name, "--timeout", "180").rc == 0
    r = run_cli(home, "failover", guest_host.name)
    assert r.rc == FailoverError.exit_code and "already running" in r.err
    for r in (run_cli(home, "failover", "stop", "nohost"), run_cli(home, "failover", "nohost")):
        assert r.rc == HostNotFoundError.exit_code and "no protected host named 'nohost'" in r.err, r.err
        assert "Traceback" not in r.err


def test_a_point_that_failed_verification_is_refused_unless_forced(guest_host, home: Path) -> None:
    newest = home / "store" / guest_host.name / str(points_json(home, guest_host.name)[-1]["disks"][0]["file"])  # type: ignore[index]
    with open(newest, "r+b") as f:  # damage the newest point: its qcow2 magic
        f.write(b"\0" * 4)
    assert run_cli(home, "verify", guest_host.name).rc == ChainCorruptError.exit_code
    r = run_cli(home, "failover", guest_host.name)
    assert r.rc == FailoverError.exit_code and "failed verification" in r.err and "--force" in r.err


def test_every_disk_is_attached_in_order_and_the_screen_check_sees_the_boot(make_host, guest_image, home) -> None:  # type: ignore[no-untyped-def]
    host = make_host(image=guest_image, disks=2)
    assert run_cli(home, "host", "set", host.name, "--vm-memory", "256").rc == 0
    assert run_cli(home, "backup", host.name).rc == 0
    r = run_cli(home, "failover", host.name, "--boot-check", "screen", "--timeout", "180")
    try:
        assert r.rc == 0, r.out + r.err
        assert "RTO:" in r.out and "(screen)" in r.out
        xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", f"recovery-{host.name}"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        overlays = [line for line in xml.splitlines() if "<source file=" in line and "/failover/" in line]
        assert len(overlays) == 2 and "disk0.qcow2" in overlays[0] and "disk1.qcow2" in overlays[1]
        assert "dev='vda'" in xml and "dev='vdb'" in xml
        # the screen check waited for a settled screen, so the guest had printed its UP line by then
        assert "APPLIANCE-GUEST-UP" in (home / "failover" / host.name / "console.log").read_text()
    finally:
        run_cli(home, "failover", "stop", host.name)


def test_verify_boot_after_every_backup_when_the_host_asks(guest_host, home: Path) -> None:
    assert run_cli(home, "host", "set", guest_host.name, "--verify-boot").rc == 0
    guest.set_marker(guest_host.disk, "point-4")
    r = run_cli(home, "backup", guest_host.name)
    assert r.rc == 0, r.out + r.err
    assert "boot ok" in r.out and "marker=point-4" in r.out
    newest = points_json(home, guest_host.name)[-1]
    assert newest["extra"]["boot"]["ok"] is True  # type: ignore[index]


def test_the_tcp_check_finds_the_guest_on_a_bridge_and_waits_for_its_port(make_host, guest_image, home) -> None:  # type: ignore[no-untyped-def]
    """`tcp:PORT` on a bridged VM: the address comes from ARP, the boot is seen when the port answers."""
    from appliance.lab import _free_subnet, _subnet_lock

    bridge = f"brt{secrets.token_hex(2)}"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    host = None
    try:
        with _subnet_lock():  # another run's lab must not take the same subnet meanwhile
            subnet = _free_subnet()
            subprocess.run(["ip", "addr", "add", f"{subnet}.1/24", "dev", bridge], check=True)
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        host = make_host(image=guest_image)
        guest.write_autorun(host.disk, (
            f"ip link set eth0 up\nip addr add {subnet}.50/24 dev eth0\n"
            f"ping -c 3 {subnet}.1 >/dev/null 2>&1\n"  # the appliance learns the guest's address from ARP
            "sleep 2\nnc -ll -p 8080 -e /bin/true &\n"
        ))  # fmt: skip
        assert run_cli(home, "host", "set", host.name, "--boot-check", "tcp:8080", "--vm-memory", "256",
                       "--vm-network", f"bridge={bridge}").rc == 0  # fmt: skip
        assert run_cli(home, "backup", host.name).rc == 0
        r = run_cli(home, "failover", host.name, "--accel", "tcg", "--timeout", "180")
        assert r.rc == 0, r.out + r.err
        assert "RTO:" in r.out
        with socket.create_connection((f"{subnet}.50", 8080), timeout=5):
            pass
    finally:
        if host is not None:
            run_cli(home, "failover", "stop", host.name)
        subprocess.run(["ip", "link", "del", bridge], check=False)


# The guest's first boot writes a file into its disk; every later boot says that it found it there.
WRITE_ONCE = (
    'if [ -f /root/kept.txt ]; then echo "FOUND-KEPT $(cat /root/kept.txt)" >/dev/ttyS0;'
    " else echo written-after-failover > /root/kept.txt; fi\n"
)
FOUND = "FOUND-KEPT written-after-failover"


@pytest.fixture
def writing_host(make_host, guest_image: Path, home: Path):  # type: ignore[no-untyped-def]
    """A lab guest with two points, whose recovery VM writes a file on its first boot."""
    host = make_host(image=guest_image)
    assert run_cli(home, "host", "set", host.name, "--boot-check", UP, "--vm-memory", "256").rc == 0
    guest.write_autorun(host.disk, WRITE_ONCE)
    for n in (1, 2):
        guest.set_marker(host.disk, f"point-{n}")
        assert run_cli(home, "backup", host.name).rc == 0
    yield host
    run_cli(home, "failover", "stop", host.name)


def _autorun_console(home: Path, host: str) -> str:
    """The console of the VM's current boot once the guest's autorun has finished (and synced its disk)."""
    console = home / "failover" / host / "console.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        if guest.AUTORUN_DONE_PATTERN.search(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"the guest's autorun did not finish: {text[-500:]}")


def _kill_qemu(host: str) -> None:
    """QEMU killed as the kernel's OOM killer would: no shutdown, nothing flushed by QEMU itself."""
    name = f"recovery-{host}"
    os.kill(int(Path(f"/run/libvirt/qemu/{name}.pid").read_text()), signal.SIGKILL)
    virsh = ["virsh", "-c", "qemu:///system", "domstate", name]
    for _ in range(100):
        if subprocess.run(virsh, capture_output=True, text=True).stdout.strip() == "shut off":
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} still runs after SIGKILL")


def test_a_killed_recovery_vm_keeps_its_writes_and_failover_brings_it_back(writing_host, home: Path) -> None:
    name = writing_host.name
    first, second = (str(p["id"]) for p in points_json(home, name))
    assert run_cli(home, "failover", name, "--timeout", "180").rc == 0
    assert FOUND not in _autorun_console(home, name)  # the first boot wrote the file
    _kill_qemu(name)
    assert "stopped (writes kept)" in run_cli(home, "failover", "status").out
    r = run_cli(home, "failover", name, "--point", first)
    assert r.rc == FailoverError.exit_code and second in r.err and f"appliance failover stop {name}" in r.err
    r = run_cli(home, "failover", name, "--timeout", "180")
    assert r.rc == 0, r.out + r.err
    assert f"resuming recovery-{name} on its kept writes: point {second}" in r.err and "first started" in r.err
    assert FOUND in _autorun_console(home, name)
    # writes kept by `failover stop --keep` come back the same way
    assert run_cli(home, "failover", "stop", name, "--keep").rc == 0
    assert "stopped (writes kept)" in run_cli(home, "failover", "status").out
    r = run_cli(home, "failover", name, "--timeout", "180")
    assert r.rc == 0 and "resuming" in r.err, r.out + r.err
    assert FOUND in _autorun_console(home, name)


def _daemon_until(home: Path, event: str) -> list[dict[str, str]]:
    """Run `appliance daemon` until it logs `event`, then stop it with SIGTERM; its log events."""
    daemon = start_cli(home, "--log-json", "daemon")
    assert daemon.stderr is not None
    seen, deadline = "", time.monotonic() + 120
    while f'"{event}"' not in seen and time.monotonic() < deadline:
        if select.select([daemon.stderr], [], [], 1.0)[0]:
            chunk = os.read(daemon.stderr.fileno(), 65536)  # unbuffered, so that select sees every line
            if not chunk:
                break
            seen += chunk.decode(errors="replace")
    daemon.send_signal(signal.SIGTERM)
    seen += daemon.communicate(timeout=60)[1]
    assert daemon.returncode == 0 and f'"{event}"' in seen and "Traceback" not in seen, seen
    return [json.loads(line) for line in seen.splitlines() if line.startswith("{")]


def test_the_daemon_restarts_a_recovery_vm_that_was_running_when_the_appliance_stopped(writing_host, home) -> None:  # type: ignore[no-untyped-def]
    name = writing_host.name
    assert run_cli(home, "failover", name, "--timeout", "180").rc == 0
    _autorun_console(home, name)
    _kill_qemu(name)
    assert run_cli(home, "host", "set", name, "--no-vm-restart").rc == 0
    assert "VM restart:  no" in run_cli(home, "host", "show", name).out
    skipped = _daemon_until(home, "failover.restarts_done")
    assert any(e["event"] == "failover.restart_skipped" and e["host"] == name for e in skipped)
    assert "stopped (writes kept)" in run_cli(home, "failover", "status").out
    assert run_cli(home, "host", "set", name, "--vm-restart").rc == 0
    restarted = _daemon_until(home, "failover.restarts_done")
    assert any(e["event"] == "failover.restarted" and e["host"] == name for e in restarted)
    assert FOUND in _autorun_console(home, name)
    assert "running" in run_cli(home, "failover", "status").out
