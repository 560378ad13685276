# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon's replication job at the DR site: the newest point it pulled boots here when the host asks
for boot verification, as a backup's point does at the source."""

from __future__ import annotations

from appliance.services.daemon import _replicated
from appliance.services.replicate import HostReport
from tests.unit.services.helpers import Lab


def test_the_newest_pulled_point_is_boot_verified_when_the_host_asks(lab: Lab) -> None:
    older, newest = lab.back_up(), lab.back_up()
    report = HostReport("web1", pulled=[older, newest], newest_here=newest.id)
    assert _replicated(lab.home, lab.tools, report) == f"web1: 2 pulled, newest here {newest.id}"
    assert "boot" not in lab.chain().find(newest.id).extra
    lab.set_host(verify_boot=True, boot_check="console:APPLIANCE-GUEST-UP")  # what the fake guest prints
    assert _replicated(lab.home, lab.tools, report).endswith(", boot ok")
    verdicts = {p.id: p.extra.get("boot") for p in lab.chain().points}
    assert verdicts[older.id] is None and isinstance(verdicts[newest.id], dict) and verdicts[newest.id]["ok"]


def test_a_run_that_pulled_nothing_boots_nothing(lab: Lab) -> None:
    lab.set_host(verify_boot=True)
    point = lab.back_up()
    assert _replicated(lab.home, lab.tools, HostReport("web1", newest_here=point.id)) == (
        f"web1: 0 pulled, newest here {point.id}"
    )
