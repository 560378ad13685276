# SPDX-License-Identifier: GPL-2.0-or-later
"""The console's templates render every state they can be given (a failback under way, a VM stopped
behind the appliance's back, a failed boot check), without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from appliance.services.failback import Progress
from appliance.services.status import BootCheck, HostStatus, Overview, StoreUsage, VmStatus
from appliance.web.deps import Principal
from appliance.web.pages import templates

NOW = datetime(2026, 11, 26, 14, 0, tzinfo=UTC)
OPERATOR = Principal("oscar", "operator", None)
VIEWER = Principal("victor", "viewer", None)


def _vm(state: str, recorded: str, failback: Progress | None) -> VmStatus:
    return VmStatus(host="web1", name="recovery-web1", point="20261126T130000Z", purpose="failover", state=state,
                    recorded=recorded, started=NOW - timedelta(minutes=42), rto_seconds=7.5, accel="tcg",
                    vnc="127.0.0.1:5900", failback=failback)  # fmt: skip


def test_recovery_vms_with_a_failback_under_way_and_one_stopped_unexpectedly() -> None:
    progress = Progress(host="web1", target="root@10.0.0.5", phase="converging", passes=3, bytes_sent=5 << 30,
                        dirty_bytes=64 << 20, rate=100e6)  # fmt: skip
    vms = [_vm("running", "running", progress), _vm("shut off", "running", None)]
    html = templates.get_template("_vms.html").render(who=OPERATOR, vms=vms, now=NOW)
    assert "converging, pass 3, sent 5.0 GiB, dirty 64.0 MiB" in html and "downtime ~6 s" in html
    assert "Cut over" in html and "stopped unexpectedly" in html and "42 min" in html
    html = templates.get_template("_vms.html").render(who=VIEWER, vms=vms, now=NOW)
    assert "Cut over" not in html and "Console" not in html


def test_the_overview_with_every_state() -> None:
    boot = BootCheck("20261126T130000Z", NOW.isoformat(), False, "no sign of a boot", None, True)
    hosts = [
        HostStatus(name=name, state=state, interval=900, late_after=960, newest="20261126T130000Z",
                   newest_time=NOW, age_seconds=age, points=3, failures_in_row=fails, last_error=error,
                   last_error_time=NOW, last_backup_seconds=30, last_backup_bytes=1 << 20, verification="ok",
                   boot=boot, booted=None, offsite={"site dr1": "20261126T120000Z", "b2": "20261126T110000Z"})
        for name, state, age, fails, error in (("web1", "protected", 60, 0, ""), ("db1", "late", 4000, 0, ""),
                                              ("mail", "failing", 100, 3, "the connection to mail broke"))
    ]  # fmt: skip
    view = Overview(NOW, hosts, StoreUsage(850 << 30, 1000 << 30, 85.0, 23.4))
    html = templates.get_template("_overview.html").render(who=VIEWER, view=view, incidents=[], now=NOW)
    assert 'id="host-db1" class="state-late"' in html and 'class="state-failing"' in html
    assert "3 failed in a row" in html and "the connection to mail broke" in html
    assert "full in 23 days" in html and 'class="warn"' in html and "site dr1: 20261126T120000Z" in html
    assert "20261126T130000Z FAILED: no sign of a boot" in html
