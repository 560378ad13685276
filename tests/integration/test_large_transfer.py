# SPDX-License-Identifier: GPL-2.0-or-later
"""More than 2 GiB through one paramiko channel: past the SSH rekey limit (paramiko issue #822)."""

from __future__ import annotations

import os
from pathlib import Path

from appliance.lab.disks import _Noise
from tests.conftest import points_json, run_cli

SIZE = (2 << 30) + (512 << 20)


def test_full_backup_of_2_5_gib_of_data_survives_rekeying(make_host, lab, home: Path) -> None:  # type: ignore[no-untyped-def]
    host = make_host(size=16 << 20, data=0.0)
    noise = _Noise(seed=42)
    fd = os.open(host.disk, os.O_WRONLY)
    try:
        for offset in range(0, SIZE, 8 << 20):
            os.pwrite(fd, noise.take(8 << 20), offset)
    finally:
        os.close(fd)
    assert os.path.getsize(host.disk) == SIZE
    r = run_cli(home, "backup", host.name)
    assert r.rc == 0, r.err
    point = points_json(home, host.name)[-1]
    assert point["sent_bytes"] == SIZE
    # The stored point reads back to the very bytes of the disk (verify recomputes the content digest).
    v = run_cli(home, "verify", host.name)
    assert v.rc == 0, v.out + v.err
