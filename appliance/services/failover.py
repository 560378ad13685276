# SPDX-License-Identifier: GPL-2.0-or-later
"""Failover boot: any recovery point running as a libvirt VM in seconds, and boot verification.

Nothing of the chain is copied or converted: each disk of the point gets a disposable qcow2 overlay
whose backing file is the point's own file, so the time to boot does not depend on the disk's size and
the chain is never written (QEMU opens backing files read-only). The VM's writes land in the overlays,
which `failover stop --keep` keeps for failback.

A recovery VM's record (store/recovery.py) is written before the VM starts and pins its point:
consolidation must not merge a point that a running VM reads through.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from appliance.domain.chain import Chain
from appliance.domain.models import Host, Point
from appliance.domain.recovery import BootCheck, DomainSpec, Network, RecoveryVm, VmSettings, vm_name
from appliance.errors import ApplianceError, FailoverError
from appliance.log import get_logger
from appliance.ports import Tools
from appliance.store import catalog, hosts, recovery
from appliance.store.files import private_dir, read_as, write_json
from appliance.store.layout import Home
from appliance.store.lock import HostLock

log = get_logger(__name__)

Say = Callable[[str], None]
_KVM_FAILURE = re.compile(r"emulation failure|KVM internal error|kvm run failed", re.IGNORECASE)
SCREEN_SETTLE_SECONDS = 3.0


def settings_for(host: Host, *, memory: int | None, cpus: int | None, network: str | None,
                 disk_bus: str | None) -> VmSettings:  # fmt: skip
    return VmSettings(
        memory_mib=memory or host.vm_memory_mib,
        cpus=cpus or host.vm_cpus,
        network=Network.parse(network or host.vm_network),
        disk_bus=disk_bus or host.vm_disk_bus,
    )


def fail_over(
    home: Home, tools: Tools, name: str, *, point_ref: str = "latest", settings: VmSettings | None = None,
    boot_check: BootCheck | None = None, timeout: float = 300.0, accel: str = "auto", force: bool = False,
    say: Say = lambda _: None,
) -> RecoveryVm:  # fmt: skip
    """Boot a point of `name` as its recovery VM and wait until the guest is up; return its record.

    :raises PointNotFoundError, FailoverError, HypervisorError:
    """
    started = time.monotonic()
    host = hosts.load(home, name)
    vm = _start_vm(home, tools, host, point_ref, settings or settings_for(host, memory=None, cpus=None,
                   network=None, disk_bus=None), "failover", accel, force, say)  # fmt: skip
    check = boot_check or BootCheck.parse(host.boot_check)
    vm = _await_boot(home, tools, vm, check, started, timeout, say)
    return vm


def _start_vm(home: Home, tools: Tools, host: Host, point_ref: str, settings: VmSettings, purpose: str,
              accel: str, force: bool, say: Say) -> RecoveryVm:  # fmt: skip
    """Pin the point, create the overlays, start the domain. The record exists before the VM does."""
    hv = tools.hypervisor
    name = vm_name(host.name, purpose)
    with HostLock(home.chain_dir(host.name) / "lock", host.name, purpose, wait=30.0):
        chain = catalog.load(home.chain_dir(host.name), host.name)
        point = chain.find(point_ref)
        _refuse_unfit(home, tools, host, chain, point, settings, purpose, force)
        folder = private_dir(home.failover_dir(host.name, purpose))
        overlays = _make_overlays(home, tools, host.name, point, folder)
        chosen, why = _choose_accel(home, tools, accel)
        vm = RecoveryVm(
            host=host.name, point=point.id, name=name, purpose=purpose, started=datetime.now(UTC), accel=chosen,
            overlays=tuple(str(o) for o in overlays), console_log=str(folder / "console.log"), settings=settings,
        )  # fmt: skip
        recovery.save(home, vm)
    say(f"booting {host.name} point {point.id} ({point.time_iso}) as VM {name} with {chosen.upper()} ({why})")
    try:
        hv.start(_spec(vm))
    except BaseException:
        recovery.remove(home, host.name, purpose)
        raise
    vm = replace(vm, vnc=hv.vnc_display(name))
    recovery.save(home, vm)
    log.info("failover.started", host=host.name, point=point.id, vm=name, accel=chosen, purpose=purpose)
    return vm


def _spec(vm: RecoveryVm) -> DomainSpec:
    s = vm.settings
    return DomainSpec(
        name=vm.name, accel=vm.accel, memory_mib=s.memory_mib, cpus=s.cpus, disks=vm.overlays, disk_bus=s.disk_bus,
        network=s.network, console_log=vm.console_log, host=vm.host, point=vm.point, purpose=vm.purpose,
    )  # fmt: skip


def _refuse_unfit(home: Home, tools: Tools, host: Host, chain: Chain, point: Point, settings: VmSettings,
                  purpose: str, force: bool) -> None:  # fmt: skip
    hv = tools.hypervisor
    existing = recovery.load(home, host.name, purpose)
    if existing is not None and (existing.state == "running" or purpose == "verify"):
        if hv.exists(existing.name) and hv.state(existing.name).running:
            raise FailoverError(
                f"a recovery VM for {host.name} is already running ({existing.name}, point {existing.point}, "
                f"since {existing.started:%Y-%m-%d %H:%M})",
                hint=f"`appliance failover stop {host.name}` stops it",
            )
        recovery.remove(home, host.name, purpose)  # a record whose VM is gone (appliance restarted)
    elif existing is not None:
        raise FailoverError(
            f"{host.name} has a stopped recovery VM whose writes were kept (point {existing.point})",
            hint=f"fail back first, or discard them with `appliance failover stop {host.name}`",
        )
    if hv.exists(vm_name(host.name, purpose)):
        raise FailoverError(f"a libvirt domain named {vm_name(host.name, purpose)} already exists",
                            hint="remove it with virsh (undefine) if it is a leftover")  # fmt: skip
    if point.dropping:
        raise FailoverError(f"point {point.id} is being merged away by consolidation", hint="choose another point")
    v = point.verification
    if v is not None and not v.ok and not force:
        raise FailoverError(
            f"point {point.id} failed verification on {v.time:%Y-%m-%d %H:%M}: {v.detail}",
            hint="choose another point with --point, or boot it anyway with --force",
        )
    boot = point.extra.get("boot")
    if isinstance(boot, dict) and boot.get("ok") is False and not force and purpose == "failover":
        raise FailoverError(
            f"point {point.id} did not boot when it was verified ({boot.get('detail', '')})",
            hint="choose another point with --point, or boot it anyway with --force",
        )
    available = hv.free_memory_mib()
    if settings.memory_mib > available:
        raise FailoverError(f"not enough memory: the VM asks {settings.memory_mib} MiB, {available} MiB are free",
                            hint="give less with --memory")  # fmt: skip
    if settings.network.kind == "bridge" and not hv.bridge_exists(settings.network.bridge):
        raise FailoverError(f"there is no bridge {settings.network.bridge!r} on this appliance",
                            hint="`ip link show type bridge` lists the bridges; or use --network user")  # fmt: skip
    if settings.disk_bus == "ide" and len(point.disks) > 4:
        raise FailoverError("IDE takes at most 4 disks; use --disk-bus sata or virtio")


def _make_overlays(home: Home, tools: Tools, host: str, point: Point, folder: Path) -> list[Path]:
    """One disposable overlay per disk, backed by the point's file (absolute path, read-only for QEMU)."""
    chain_dir = home.chain_dir(host)
    overlays = []
    for disk in point.disks:
        overlay = folder / f"{disk.slot}.qcow2"
        overlay.unlink(missing_ok=True)
        tools.images.create(overlay, disk.size, str((chain_dir / disk.file).resolve()))
        overlays.append(overlay)
    return overlays


def _choose_accel(home: Home, tools: Tools, wanted: str) -> tuple[str, str]:
    if wanted in ("kvm", "tcg"):
        return wanted, "as asked"
    if not tools.hypervisor.kvm_available():
        return "tcg", "no usable /dev/kvm"
    known = _accel_record(home)
    if known.get("kvm") == "broken" and known.get("kernel") == os.uname().release:
        return "tcg", f"KVM failed here on {known.get('since', '?')[:10]}: {known.get('reason', '')}"
    return "kvm", "KVM is available"


def _accel_record(home: Home) -> dict[str, str]:
    return read_as(home.accel_file, dict[str, str]) if home.accel_file.exists() else {}


def _remember_kvm_broken(home: Home, reason: str) -> None:
    write_json(home.accel_file, {"kvm": "broken", "kernel": os.uname().release, "reason": reason,
                                 "since": datetime.now(UTC).isoformat()})  # fmt: skip


def _await_boot(home: Home, tools: Tools, vm: RecoveryVm, check: BootCheck, started: float, timeout: float,
                say: Say) -> RecoveryVm:  # fmt: skip
    """Poll the boot check; if KVM turns out broken (nested KVM here), restart the VM under TCG once."""
    hv = tools.hypervisor
    watcher = _BootWatcher(tools, vm, check)
    deadline = started + timeout
    while time.monotonic() < deadline:
        state = hv.state(vm.name)
        if not state.running:
            failure = hv.qemu_log_tail(vm.name, 20)
            kvm_broke = _KVM_FAILURE.search(failure)
            if vm.accel == "kvm" and (kvm_broke or state.state in ("paused", "crashed")):
                reason = kvm_broke.group(0) if kvm_broke else f"the VM {state.state}"
                vm = _restart_with_tcg(home, tools, vm, reason, say)
                watcher = _BootWatcher(tools, vm, check)
                continue
            last = (failure.splitlines() or ["no log"])[-1]
            raise FailoverError(f"the recovery VM {vm.name} stopped ({state.state}): {last}")
        if watcher.booted():
            vm = replace(vm, rto_seconds=round(time.monotonic() - started, 2))
            recovery.save(home, vm)
            log.info("failover.booted", host=vm.host, point=vm.point, vm=vm.name, rto=vm.rto_seconds, check=str(check))
            return vm
        time.sleep(0.1)
    log.warning("failover.boot_not_seen", host=vm.host, vm=vm.name, timeout=timeout, check=str(check))
    return vm


def _restart_with_tcg(home: Home, tools: Tools, vm: RecoveryVm, reason: str, say: Say) -> RecoveryVm:
    """KVM is there but cannot run the guest (nested KVM): remember that, and run it under TCG."""
    say(f"KVM failed on this machine ({reason}); restarting the VM with TCG (software emulation)")
    log.warning("failover.kvm_fallback", host=vm.host, vm=vm.name, reason=reason)
    _remember_kvm_broken(home, reason)
    tools.hypervisor.remove(vm.name)
    vm = replace(vm, accel="tcg")
    recovery.save(home, vm)
    tools.hypervisor.start(_spec(vm))
    vm = replace(vm, vnc=tools.hypervisor.vnc_display(vm.name))
    recovery.save(home, vm)
    return vm


class _BootWatcher:
    def __init__(self, tools: Tools, vm: RecoveryVm, check: BootCheck) -> None:
        self.hv = tools.hypervisor
        self.vm = vm
        self.check = check
        self._last_screen = b""
        self._stable_since = 0.0
        self._next_look = 0.0
        self.console_line = ""

    def booted(self) -> bool:
        if self.check.kind == "console":
            return self._console()
        if time.monotonic() < self._next_look:
            return False
        self._next_look = time.monotonic() + 0.5
        return self._screen() if self.check.kind == "screen" else self._tcp()

    def _console(self) -> bool:
        self.console_line = find_console_line(self.vm.console_log, self.check.pattern)
        return bool(self.console_line)

    def _screen(self) -> bool:
        """Not blank, and settled for a few seconds (a blinking cursor aside): booted to a login screen,
        or stuck, which the screenshot then shows."""
        shot = self.hv.screenshot_ppm(self.vm.name, Path(self.vm.console_log).with_name("screen.ppm"))
        now = time.monotonic()
        blank = len(set(shot[-(len(shot) // 2) :: 31])) <= 1  # sampled: one colour across the screen
        if blank or not _alike(shot, self._last_screen):
            self._last_screen, self._stable_since = shot, now
            return False
        return now - self._stable_since >= SCREEN_SETTLE_SECONDS

    def _tcp(self) -> bool:
        for address in self.hv.guest_addresses(self.vm.name):
            try:
                with socket.create_connection((address, self.check.port), timeout=0.5):
                    return True
            except OSError:
                continue
        return False


def _alike(a: bytes, b: bytes) -> bool:
    """Two screenshots that differ by no more than a cursor's worth of pixels."""
    if len(a) != len(b):
        return False
    differing_bits = (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()
    return differing_bits <= 8 * 16 * 3 * 8  # one 8x16 character cell, every bit flipped


def find_console_line(console_log: str, pattern: str) -> str:
    """The first console line matching `pattern`, or ''."""
    try:
        text = Path(console_log).read_text(errors="replace")
    except OSError:
        return ""
    text = text[: text.rfind("\n") + 1]  # complete lines only: the guest may be in the middle of one
    match = re.search(pattern, text)
    if match is None:
        return ""
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    return text[start : end if end >= 0 else len(text)].strip()


def stop(home: Home, tools: Tools, name: str, *, keep: bool = False, purpose: str = "failover") -> RecoveryVm:
    """Power the recovery VM off; without `keep`, its overlays (its writes) are deleted too."""
    hosts.load(home, name)
    vm = recovery.load(home, name, purpose)
    if vm is None:
        raise FailoverError(f"{name} has no recovery VM", hint="`appliance failover status` lists them")
    tools.hypervisor.remove(vm.name)
    if keep:
        vm = replace(vm, state="stopped")
        recovery.save(home, vm)
    else:
        recovery.remove(home, name, purpose)
    log.info("failover.stopped", host=name, vm=vm.name, kept=keep)
    return vm


def status(home: Home, tools: Tools) -> list[tuple[RecoveryVm, str]]:
    """Every recorded recovery VM with what libvirt says of it now."""
    found = []
    for vm in recovery.all_vms(home):
        live = tools.hypervisor.state(vm.name) if vm.state == "running" else None
        found.append((vm, live.state if live else vm.state))
    return found


def verify_boot(home: Home, tools: Tools, name: str, *, point_ref: str = "latest", timeout: float = 300.0,
                accel: str = "auto", say: Say = lambda _: None) -> dict[str, object]:  # fmt: skip
    """Boot a point in isolation (no network), screenshot it, record the verdict in the point, clean up."""
    started = time.monotonic()
    host = hosts.load(home, name)
    settings = replace(settings_for(host, memory=None, cpus=None, network=None, disk_bus=None), network=Network("none"))
    vm = _start_vm(home, tools, host, point_ref, settings, "verify", accel, True, say)
    check = BootCheck.parse(host.boot_check)
    shot = home.screenshot(name, vm.point)
    try:
        vm = _await_boot(home, tools, vm, check, started, timeout, say)
        private_dir(shot.parent)
        tools.hypervisor.screenshot_png(vm.name, shot)
        line = find_console_line(vm.console_log, check.pattern) if check.kind == "console" else ""
    except ApplianceError as exc:
        vm, line = replace(vm, rto_seconds=None), f"failed: {exc.message}"
    finally:
        tools.hypervisor.remove(vm.name)
        recovery.remove(home, name, "verify")
    verdict = {
        "ok": vm.rto_seconds is not None, "time": datetime.now(UTC).isoformat(), "rto_seconds": vm.rto_seconds,
        "screenshot": str(shot) if shot.exists() else "", "check": str(check), "accel": vm.accel,
        "detail": line or ("booted" if vm.rto_seconds is not None else f"no sign of a boot within {timeout:.0f} s"),
    }  # fmt: skip
    with HostLock(home.chain_dir(name) / "lock", name, "verify", wait=60.0):
        chain = catalog.load(home.chain_dir(name), name)
        point = chain.find(vm.point)
        catalog.save(home.chain_dir(name), chain.with_point(replace(point, extra={**point.extra, "boot": verdict})))
    log.info("point.boot_verified", host=name, point=vm.point, ok=verdict["ok"], rto=vm.rto_seconds)
    return verdict
