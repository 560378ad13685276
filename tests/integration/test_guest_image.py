# SPDX-License-Identifier: GPL-2.0-or-later
"""The lab guest disk: it boots under QEMU (TCG) from virtio, SATA and IDE and prints its marker;
the marker and an autorun script are changed from outside; what the guest writes lands on its disk.

One image is built per module (a copy from images/build/ once the recipe is cached) and copied per test.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from appliance.errors import LabError
from appliance.lab import guest
from tests.conftest import require

UP_TIMEOUT = 60.0  # TCG: the guest is up in about 7 s on an idle machine

BUSES = {
    "virtio": ["-drive", "file={img},format=raw,if=virtio"],
    "sata": [
        "-drive",
        "file={img},format=raw,if=none,id=d0",
        "-device",
        "ahci,id=ahci",
        "-device",
        "ide-hd,drive=d0,bus=ahci.0",
    ],
    "ide": ["-drive", "file={img},format=raw,if=ide"],
}


class Guest:
    """A QEMU process booting a disk, its serial console in a file."""

    def __init__(self, img: Path, bus: str, folder: Path) -> None:
        self.console = folder / f"console-{time.monotonic_ns()}.log"
        self.qmp = folder / "qmp.sock"
        self.qmp.unlink(missing_ok=True)
        drive = [arg.format(img=img) for arg in BUSES[bus]]
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-display", "none", "-no-reboot",
            "-nic", "none", "-serial", f"file:{self.console}", "-qmp", f"unix:{self.qmp},server=on,wait=off",
            *drive,
        ]  # fmt: skip
        self.stderr = self.console.with_suffix(".stderr")
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.started = time.monotonic()

    def text(self) -> str:
        try:
            return self.console.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = UP_TIMEOUT) -> str:
        """The console up to `pattern`; fails with the console's tail if it does not come."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if pattern in text:
                return text
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        stderr = self.stderr.read_text(errors="replace").strip()
        tail = "\n".join(self.text().splitlines()[-30:])
        pytest.fail(f"no {pattern!r} after {time.monotonic() - self.started:.0f} s; qemu: {stderr}\nconsole:\n{tail}")

    def marker(self) -> str | None:
        return guest.marker_from_console(self.wait_for("APPLIANCE-GUEST-UP"))

    def power_button(self) -> None:
        qmp = QEMUMonitorProtocol(str(self.qmp))
        qmp.connect()
        try:
            qmp.cmd("system_powerdown")
        finally:
            qmp.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


Boot = Callable[..., Guest]


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for binary in ("qemu-system-x86_64", "debugfs", "e2fsck", "mke2fs", "sfdisk", "extlinux", "losetup"):
        require(binary)
    return guest.build_guest_image(tmp_path_factory.mktemp("guest") / "base.img", marker="hello-1")


@pytest.fixture
def img(base_image: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(base_image), str(copy)], check=True)
    return copy


@pytest.fixture
def boot(tmp_path: Path) -> Iterator[Boot]:
    """Boot a disk; every guest is killed at the end of the test."""
    guests: list[Guest] = []

    class _Guest(Guest):
        def __init__(self, img: Path, bus: str = "virtio") -> None:
            super().__init__(img, bus, tmp_path)
            guests.append(self)

    yield _Guest
    for g in guests:
        g.kill()


@pytest.mark.slow
@pytest.mark.parametrize("bus", list(BUSES))
def test_guest_prints_its_marker_when_booted_from_each_bus(img: Path, boot: Boot, bus: str) -> None:
    g = boot(img, bus)
    assert g.marker() == "hello-1"
    lines = g.text().splitlines()
    assert sum(1 for line in lines if "APPLIANCE-GUEST-UP" in line) == 1
    assert any(line.startswith("APPLIANCE-GUEST kernel ") for line in lines)


@pytest.mark.slow
def test_a_changed_marker_is_printed_at_the_next_boot(img: Path, boot: Boot) -> None:
    first = boot(img)
    assert first.marker() == "hello-1"
    first.kill()  # the disk is left with a journal to replay, as after a crash
    guest.set_marker(img, "hello-2")
    assert guest.read_marker(img) == "hello-2"
    assert boot(img).marker() == "hello-2"


@pytest.mark.slow
def test_autorun_makes_the_guest_write_to_its_own_disk(img: Path, boot: Boot) -> None:
    guest.write_autorun(img, "echo written > /root/from-guest.txt\n")
    g = boot(img)
    text = g.wait_for("APPLIANCE-AUTORUN-DONE")
    assert guest.AUTORUN_DONE_PATTERN.search(text) and "rc=0" in text
    g.kill()
    assert guest.read_file(img, "/from-guest.txt") == b"written\n"


@pytest.mark.slow
def test_the_acpi_power_button_powers_the_guest_off(img: Path, boot: Boot) -> None:
    g = boot(img)
    g.marker()
    for _ in range(20):  # the guest listens for the button a moment after its UP line: press until it goes
        g.power_button()
        try:
            assert g.proc.wait(timeout=3) == 0
            break
        except subprocess.TimeoutExpired:
            continue
    assert g.proc.poll() == 0
    assert "APPLIANCE-GUEST-POWEROFF" in g.text()


def test_marker_is_changed_on_a_loop_device_of_the_disk(img: Path) -> None:
    device = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True)
    loop = device.stdout.strip()
    try:
        guest.set_marker(loop, "on-loop")
        assert guest.read_marker(loop) == "on-loop"
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    assert guest.read_marker(img) == "on-loop"


@pytest.mark.slow
def test_a_disk_in_use_by_qemu_is_refused(img: Path, boot: Boot) -> None:
    boot(img).wait_for("SYSLINUX")  # QEMU has opened (and locked) the disk before the BIOS runs
    with pytest.raises(LabError, match="in use"):
        guest.read_marker(img)


def test_marker_with_spaces_is_refused(img: Path) -> None:
    with pytest.raises(LabError, match="one word"):
        guest.set_marker(img, "two words")
    assert guest.read_marker(img) == "hello-1"


def test_missing_recipe_is_a_lab_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(guest, "RECIPE", tmp_path / "no-such" / "build.sh")
    with pytest.raises(LabError, match="recipe"):
        guest.build_guest_image(tmp_path / "x.img")


def test_marker_is_read_from_console_text() -> None:
    console = "SYSLINUX\nAPPLIANCE-GUEST-UP marker=p1\r\n...\nAPPLIANCE-GUEST-UP marker=p2\r\n/ # "
    assert guest.marker_from_console(console) == "p2"
    assert guest.marker_from_console("booting...") is None
