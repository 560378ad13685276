# SPDX-License-Identifier: GPL-2.0-or-later
"""Running at the DR site: the first site burned, a replicated point boots at the DR appliance as a local
one does, and its VM fails back to the repaired server at the first site with only what differs sent.

The host is the lab guest; its settings for running (the boot check, the VM's memory) come with it from
the source. The guest writes to its disk when it boots, as in test_failback.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from appliance.lab import Lab, guest
from tests.conftest import run_cli
from tests.integration.sites import add_site, two_sites
from tests.integration.test_failback import WRITES, _boots_with


def test_a_replicated_point_fails_over_at_the_dr_site_and_back_to_the_repaired_server(
    make_host,  # type: ignore[no-untyped-def]
    guest_image: Path,
    home: Path,
    tmp_path: Path,
    lab: Lab,
) -> None:
    host = make_host(image=guest_image)
    assert run_cli(home, "host", "set", host.name, "--boot-check", "console:APPLIANCE-AUTORUN-DONE rc=0",
                   "--vm-memory", "256").rc == 0  # fmt: skip
    guest.set_marker(host.disk, "original")
    guest.write_autorun(host.disk, WRITES)
    s = two_sites(make_host, home, tmp_path, host=host)
    assert run_cli(s.source, "backup", host.name).rc == 0
    add_site(s)
    assert run_cli(s.dr, "replicate", "hq").rc == 0
    repaired = make_host(size=1 << 30, data=0.0, add=False)
    subprocess.run(["cp", "--sparse=always", host.disk, repaired.disk], check=True)  # the server's old disk

    r = run_cli(s.dr, "failover", host.name, "--accel", "tcg", "--timeout", "180")
    assert r.rc == 0 and "APPLIANCE-AUTORUN-DONE" in r.out + r.err, r.out + r.err
    try:
        back = ["failback", host.name, "--to", f"root@{repaired.address}", "--disk", f"{host.disk}={repaired.disk}",
                "--trust-first-use"]  # fmt: skip
        refused = run_cli(s.dr, *back)
        assert refused.rc != 0 and "replica of site hq" in refused.err and "--key" in refused.err, refused.err
        r = run_cli(s.dr, *back, "--key", str(lab.key_file))
        assert r.rc == 0, r.out + r.err
    finally:
        run_cli(s.dr, "failover", "stop", host.name)
    sent = json.loads((s.dr / "failback" / f"{host.name}.json").read_text())["bytes_sent"]
    assert sent < (8 << 20) * 1.2 + (4 << 20), sent  # the guest wrote 8 MiB, and a few blocks of metadata
    _boots_with(repaired.disk, "written-in-failover")
