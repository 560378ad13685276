# SPDX-License-Identifier: GPL-2.0-or-later
"""fail_back over the fakes: a host backed up, its recovery VM started on FakeHypervisor (its disk an
overlay in FakeImages), the target a local file written by the real writer (appliance/agent/writer.py)
in a local process through LocalShell. Only the use case's public entry points are driven: fail_back,
status and request_cutover (the real thing, on libvirt, QEMU and sshd: tests/integration/test_failback.py).
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.domain.recovery import BootCheck, RecoveryVm
from appliance.errors import FailoverError
from appliance.services import failback, failover
from appliance.store import recovery
from tests.fakes import FakeHypervisor, FakeImages
from tests.unit.services.helpers import BS, DISK_SIZE, Lab, add_host, armed_fault

UP = BootCheck.parse("console:APPLIANCE-GUEST-UP")  # what FakeHypervisor's guest prints


class _Images(FakeImages):
    """FakeImages with the dirty bitmaps a stopped domain saved in its overlays: FakeHypervisor's checkpoints."""

    def __init__(self, hypervisor: FakeHypervisor) -> None:
        super().__init__()
        self.hypervisor = hypervisor

    def copy_dirty(self, image: Path, bitmaps: list[str], target: Path, run_dir: Path) -> None:
        self.step("copy_dirty")
        self.hypervisor.copy_dirty(image, bitmaps, target)


@pytest.fixture
def hv(lab: Lab) -> FakeHypervisor:
    hypervisor = lab.tools.hypervisor
    assert isinstance(hypervisor, FakeHypervisor)
    lab.tools = replace(lab.tools, images=_Images(hypervisor))
    return hypervisor


def _failed_over(lab: Lab) -> RecoveryVm:
    lab.back_up()
    return failover.fail_over(lab.home, lab.tools, "web1", boot_check=UP, timeout=5)


def _guest_writes(lab: Lab, vm: RecoveryVm, offset: int, data: bytes) -> None:
    """The recovery VM's guest writes to its disk (its overlay)."""
    with lab.images.export(Path(vm.overlays[0]), lab.folder / "guest", writable=True) as disk:
        disk.write(offset, data)


def _vm_disk(lab: Lab, vm: RecoveryVm) -> bytes:
    with lab.images.export(Path(vm.overlays[0]), lab.folder / "guest", writable=False) as disk:
        return disk.read(0, DISK_SIZE)


def _target(lab: Lab, content: bytes | None = None, size: int = DISK_SIZE) -> Path:
    """The repaired server's disk: blank (zeroes), or holding `content`."""
    path = lab.folder / "target.img"
    path.write_bytes(content if content is not None else bytes(size))
    return path


def _fail_back(lab: Lab, target: Path, **options: object) -> failback.Progress:
    return failback.fail_back(lab.home, lab.tools, "web1", to="root@127.0.0.1",
                              mapping=[f"{lab.host.disks[0]}={target}"], trust_first_use=True,
                              **options)  # type: ignore[arg-type]  # fmt: skip


def _assert_recorded(lab: Lab, vm: RecoveryVm, final: bytes, progress: failback.Progress) -> None:
    """The VM's final state is the host's newest point, and the VM is gone."""
    newest = lab.chain().points[-1]
    assert progress.phase == "done" and progress.point == newest.id and newest.id != vm.point
    assert "failback" in str(newest.extra.get("origin"))
    assert lab.content(newest) == final
    assert recovery.load(lab.home, "web1") is None and not lab.tools.hypervisor.exists(vm.name)
    assert not Path(vm.overlays[0]).exists()
    shown = failback.status(lab.home, "web1")
    assert shown is not None and shown.phase == "done" and shown.point == newest.id


def test_a_stopped_vm_fails_back_offline_to_a_blank_disk_and_becomes_a_point(lab: Lab, hv: FakeHypervisor) -> None:
    vm = _failed_over(lab)
    _guest_writes(lab, vm, 7 * BS + 5, random.Random(1).randbytes(3 * BS))
    _guest_writes(lab, vm, 50 * BS, bytes(BS))  # a block of data zeroed by the guest
    failover.stop(lab.home, lab.tools, "web1", keep=True)
    final = _vm_disk(lab, vm)
    target = _target(lab)
    data = sum(BS for i in range(0, DISK_SIZE, BS) if any(final[i : i + BS]))

    progress = _fail_back(lab, target)

    assert target.read_bytes() == final
    assert progress.bytes_sent == data  # a blank disk gets every block of data, and nothing else
    assert progress.downtime_seconds is not None and ("backup", vm.name) not in hv.calls  # copied offline
    _assert_recorded(lab, vm, final, progress)


def test_a_target_that_holds_the_point_gets_little_more_than_the_vms_writes(lab: Lab, hv: FakeHypervisor) -> None:
    vm = _failed_over(lab)
    target = _target(lab, lab.disk.read_bytes())  # the server's old disk: the point the VM started from
    _guest_writes(lab, vm, 20 * BS, random.Random(2).randbytes(2 * BS))
    failover.stop(lab.home, lab.tools, "web1", keep=True)
    final = _vm_disk(lab, vm)

    progress = _fail_back(lab, target)

    assert progress.bytes_sent == 2 * BS
    assert target.read_bytes() == final
    _assert_recorded(lab, vm, final, progress)


def test_a_target_smaller_than_the_vms_disk_is_refused_before_anything_is_written(lab: Lab, hv: FakeHypervisor) -> None:
    _failed_over(lab)
    vm = failover.stop(lab.home, lab.tools, "web1", keep=True)
    old = random.Random(3).randbytes(DISK_SIZE - BS)
    target = _target(lab, old)
    points = lab.chain().ids()

    with pytest.raises(FailoverError, match="less than .* nothing was written") as refused:
        _fail_back(lab, target)

    assert refused.value.exit_code == FailoverError.exit_code
    assert target.read_bytes() == old
    assert recovery.load(lab.home, "web1") == vm and Path(vm.overlays[0]).exists()
    assert lab.chain().ids() == points


def test_a_block_written_wrong_on_the_target_fails_the_proof_and_a_new_run_repairs_it(
    lab: Lab, hv: FakeHypervisor
) -> None:
    vm = _failed_over(lab)
    _guest_writes(lab, vm, 0, random.Random(4).randbytes(BS))
    vm = failover.stop(lab.home, lab.tools, "web1", keep=True)
    final = _vm_disk(lab, vm)
    target = _target(lab)
    points = lab.chain().ids()

    with (
        armed_fault("failback.bad_write"),
        pytest.raises(FailoverError, match="differs from the VM's disk in 1 blocks"),
    ):
        _fail_back(lab, target)

    assert recovery.load(lab.home, "web1") == vm and Path(vm.overlays[0]).exists()  # nothing was removed
    assert lab.chain().ids() == points
    shown = failback.status(lab.home, "web1")
    assert shown is not None and shown.phase.startswith("failed") and "differs" in shown.error
    progress = _fail_back(lab, target)
    assert progress.bytes_sent == BS  # the one block written wrong
    assert target.read_bytes() == final
    _assert_recorded(lab, vm, final, progress)


def test_a_running_vm_is_copied_live_and_what_it_writes_meanwhile_goes_at_the_cutover(
    lab: Lab, hv: FakeHypervisor
) -> None:
    vm = _failed_over(lab)
    rng = random.Random(5)
    writes = {1: (3 * BS, rng.randbytes(BS)), 2: (90 * BS + 10, rng.randbytes(2 * BS))}
    backups = 0

    def guest(name: str) -> None:  # right after each of QEMU's copies, the guest writes on
        nonlocal backups
        backups += 1
        if backups in writes:
            _guest_writes(lab, vm, *writes[backups])

    hv.guest_writes = guest
    target = _target(lab)

    progress = _fail_back(lab, target)

    final = lab.content(lab.chain().points[-1])
    assert final[3 * BS : 4 * BS] == writes[1][1] and final[90 * BS + 10 : 92 * BS + 10] == writes[2][1]
    assert target.read_bytes() == final
    assert backups == 2 and progress.passes == 1  # the bulk copy; one pass, small: left to the cutover
    calls = [call for call, name in hv.calls if name == vm.name]
    assert calls.count("backup") == 2 and calls.index("shutdown") > max(i for i, c in enumerate(calls) if c == "backup")
    assert progress.downtime_seconds is not None
    _assert_recorded(lab, vm, final, progress)


def test_a_manual_cutover_sends_passes_while_the_vm_runs_until_it_is_asked_for(lab: Lab, hv: FakeHypervisor) -> None:
    """A pass is sent while what the guest wrote since the last one is not small (32 MiB here), and the
    cutover waits for `failback --cutover now` (request_cutover)."""
    size = 40 << 20
    lab.host = add_host(lab.home, lab.folder, "big", size=size)
    Path(lab.host.disks[0]).write_bytes(bytes(size - 4 * BS) + random.Random(6).randbytes(4 * BS))
    lab.back_up("big")
    vm = failover.fail_over(lab.home, lab.tools, "big", boot_check=UP, timeout=5)
    rng = random.Random(7)
    big = (BS, rng.randbytes(33 << 20))  # more than is left to a cutover: sent as a pass
    writes = {1: big, 2: (1100 * BS, rng.randbytes(BS)), 3: (1200 * BS + 7, rng.randbytes(BS))}
    backups = 0
    phases: list[str] = []

    def guest(name: str) -> None:
        nonlocal backups
        backups += 1
        shown = failback.status(lab.home, "big")
        assert shown is not None
        phases.append(shown.phase)
        assert hv.state(name).running  # every pass is made while the VM runs
        _guest_writes(lab, vm, *writes[backups])
        if backups == 3:
            failback.request_cutover(lab.home, "big")

    hv.guest_writes = guest
    target = lab.folder / "target.img"
    target.write_bytes(bytes(size))

    mapping = [f"{lab.host.disks[0]}={target}"]
    progress = failback.fail_back(
        lab.home, lab.tools, "big", to="root@127.0.0.1", mapping=mapping, trust_first_use=True, cutover="manual"
    )

    final = lab.content(lab.chain("big").points[-1], name="big")
    assert all(final[offset : offset + len(data)] == data for offset, data in writes.values())
    assert target.read_bytes() == final
    assert backups == 3 and progress.passes == 2  # the bulk copy, a pass sent, a pass left to the cutover
    assert progress.bytes_sent >= len(big[1]) + 4 * BS
    assert phases[-1].startswith("pass 1")
    assert recovery.load(lab.home, "big") is None and progress.phase == "done"
