# SPDX-License-Identifier: GPL-2.0-or-later
"""fail_over, stop and the daemon's restarts against the FakeHypervisor: which accelerator, and that a
recovery VM's writes are never thrown away (the real thing: tests/integration/test_failover.py and
test_kvm_fallback.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.domain.recovery import BootCheck
from appliance.errors import ChainLockedError, FailoverError
from appliance.services import failover
from appliance.store import accel as accel_store
from appliance.store import recovery
from appliance.store.lock import HostLock
from tests.fakes import FakeHypervisor
from tests.unit.services.helpers import Lab

UP = BootCheck.parse("console:APPLIANCE-GUEST-UP")


@pytest.fixture
def hv(lab: Lab) -> FakeHypervisor:
    assert isinstance(lab.tools.hypervisor, FakeHypervisor)
    return lab.tools.hypervisor


def _fail_over(lab: Lab, said: list[str] | None = None, **kwargs: object) -> failover.RecoveryVm:
    out = said if said is not None else []
    return failover.fail_over(lab.home, lab.tools, "web1", boot_check=UP, timeout=5, say=out.append, **kwargs)  # type: ignore[arg-type]


def test_a_refused_kvm_start_falls_back_to_tcg_once_and_is_remembered(lab: Lab, hv: FakeHypervisor) -> None:
    lab.back_up()
    hv.kvm = True
    hv.refuse_start("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69", accel="kvm")
    said: list[str] = []
    vm = _fail_over(lab, said)
    assert vm.accel == "tcg" and vm.rto_seconds is not None
    assert [accel for call, accel in hv.calls if call == "start"] == ["kvm", "tcg"]
    assert sum("failed to set MSR 0x10a" in line and "TCG" in line for line in said) == 1, said
    remembered = accel_store.load(lab.home)
    assert remembered is not None and remembered.machine == hv.machine()
    failover.stop(lab.home, lab.tools, "web1")
    hv.calls.clear()
    said.clear()
    assert _fail_over(lab, said).accel == "tcg"  # straight to TCG, saying why
    assert [accel for call, accel in hv.calls if call == "start"] == ["tcg"]
    assert "failed to set MSR 0x10a" in said[0]


def test_kvm_asked_for_is_not_replaced(lab: Lab, hv: FakeHypervisor) -> None:
    lab.back_up()
    hv.kvm = True
    hv.refuse_start("KVM internal error", accel="kvm")
    with pytest.raises(Exception, match="KVM internal error"):
        _fail_over(lab, accel="kvm")
    assert recovery.load(lab.home, "web1") is None and accel_store.load(lab.home) is None


def test_a_killed_recovery_vm_is_resumed_on_its_own_overlays(lab: Lab, hv: FakeHypervisor) -> None:
    lab.back_up()
    vm = _fail_over(lab)
    overlay = Path(vm.overlays[0])
    written = b"written by the business since the failover"
    with lab.images.export(overlay, lab.folder / "run", writable=True) as disk:  # the guest writes
        disk.write(0, written)
    hv.crash(vm.name)
    assert [shown for _, shown in failover.status(lab.home, lab.tools)] == ["stopped (writes kept)"]
    lab.back_up()  # a newer point meanwhile: `failover web1` still means this VM, not the newest point
    said: list[str] = []
    resumed = _fail_over(lab, said)
    assert resumed.point == vm.point and resumed.overlays == vm.overlays and "resuming" in said[0]
    with lab.images.export(overlay, lab.folder / "run", writable=False) as disk:
        assert disk.read(0, len(written)) == written
    hv.crash(vm.name)
    with pytest.raises(FailoverError, match="holds the writes made since its failover"):
        _fail_over(lab, point_ref=lab.chain().points[-1].id)
    assert overlay.exists()


def test_stop_keeps_or_discards_the_writes_and_waits_for_the_hosts_lock(
    lab: Lab, hv: FakeHypervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(failover, "STOP_LOCK_WAIT", 0.2)
    lab.back_up()
    vm = _fail_over(lab)
    failover.stop(lab.home, lab.tools, "web1", keep=True)
    assert Path(vm.overlays[0]).exists() and _fail_over(lab).overlays == vm.overlays  # kept: resumed
    with HostLock(lab.home.chain_dir("web1") / "lock", "web1", "failback"), pytest.raises(ChainLockedError):
        failover.stop(lab.home, lab.tools, "web1")  # a failback holds the host: its overlays stay
    assert Path(vm.overlays[0]).exists()
    failover.stop(lab.home, lab.tools, "web1")
    assert not Path(vm.overlays[0]).exists() and recovery.load(lab.home, "web1") is None


def test_the_daemons_restart_brings_back_running_vms_of_hosts_that_want_it(lab: Lab, hv: FakeHypervisor) -> None:
    lab.back_up()
    vm = _fail_over(lab)
    hv.crash(vm.name)  # the appliance lost power
    lab.set_host(vm_restart=False)
    assert failover.restart_interrupted(lab.home, lab.tools) == []
    assert not hv.state(vm.name).running
    lab.set_host(vm_restart=True)
    restarted = failover.restart_interrupted(lab.home, lab.tools)
    assert [r.name for r in restarted] == [vm.name] and hv.state(vm.name).running
    assert restarted[0].overlays == vm.overlays
