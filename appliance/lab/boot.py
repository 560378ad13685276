# SPDX-License-Identifier: GPL-2.0-or-later
"""Boot a lab guest disk directly with QEMU (no libvirt, no appliance): the floor of failover, and the
proof that a failback target boots."""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path

from appliance.errors import LabError
from appliance.lab import guest

MEMORY = "512"


def boot_until_up(disk: Path, fmt: str, timeout: float = 120.0, accel: str = "tcg") -> float:
    """Seconds from starting QEMU on `disk` until the guest prints its UP line."""
    return boot_and_read(disk, fmt, timeout, accel)[0]


def boot_and_read(disk: Path, fmt: str, timeout: float = 120.0, accel: str = "tcg") -> tuple[float, str]:
    """(seconds until the UP line, the UP line), booting `disk` with `accel` (kvm gets the host's CPU, as a
    recovery VM does); QEMU is killed afterwards."""
    cpu = ["-cpu", "host"] if accel == "kvm" else []
    argv = ["qemu-system-x86_64", "-accel", accel, *cpu, "-m", MEMORY, "-display", "none", "-serial", "stdio",
            "-monitor", "none", "-no-reboot", "-drive", f"file={disk},format={fmt},if=virtio"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    try:
        while time.monotonic() - started < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 0.05)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
                text = seen.decode(errors="replace")
                match = guest.UP_PATTERN.search(text[: text.rfind("\n") + 1])  # complete lines only
                if match:
                    return time.monotonic() - started, match.group(0)
        raise LabError(f"{disk} did not boot: {seen[-300:]!r}")
    finally:
        proc.kill()
        proc.wait()
