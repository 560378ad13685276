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

import hashlib
import re
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from appliance.domain.accel import (
    EARLY_SECONDS,
    AccelChoice,
    KvmFailure,
    choose,
    start_failure_reason,
    stop_failure_reason,
)
from appliance.domain.chain import Chain
from appliance.domain.models import Host, Point
from appliance.domain.recovery import BootCheck, DomainSpec, DomainState, Network, RecoveryVm, VmSettings, vm_name
from appliance.errors import ApplianceError, DamagedFileError, FailoverError, HypervisorError
from appliance.log import get_logger
from appliance.ports import BlockServer, Tools
from appliance.services.cloud.bucket import Located, cloud_host, locate
from appliance.store import accel as accel_store
from appliance.store import chains, hosts, recovery
from appliance.store.files import private_dir
from appliance.store.layout import Home
from appliance.store.lock import HostLock

log = get_logger(__name__)

Say = Callable[[str], None]
SCREEN_SETTLE_SECONDS = 3.0
STOP_LOCK_WAIT = 10.0  # seconds `failover stop` waits for the host's lock (a backup's few seconds of setup)


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

    A recovery VM that is shut off but was never stopped by `failover stop` (the appliance rebooted, the
    guest powered off, QEMU was killed) or was kept by `failover stop --keep` is started again on its
    own overlays instead: what the business wrote since the failover is never thrown away here.

    :raises PointNotFoundError, FailoverError, HypervisorError:
    """
    started = time.monotonic()
    host = hosts.load(home, name)
    settings = settings or settings_for(host, memory=None, cpus=None, network=None, disk_bus=None)
    source = recovery.cloud_source(home, name)
    if source is not None:
        vm, may_fall_back = _resume_cloud_vm(home, tools, host, source, accel, say)
    else:
        vm, may_fall_back = _start_vm(home, tools, host, point_ref, settings, "failover", accel, force, say)
    check = boot_check or BootCheck.parse(host.boot_check)
    return _await_boot(home, tools, vm, check, started, timeout, may_fall_back, say)


def fail_over_from_cloud(
    home: Home, tools: Tools, name: str, store: str, *, point_id: str | None = None,
    settings: VmSettings | None = None, boot_check: BootCheck | None = None, timeout: float = 300.0,
    accel: str = "auto", say: Say = lambda _: None,
) -> RecoveryVm:  # fmt: skip
    """Boot a point of `name` from cloud store `store`, without downloading its disks first.

    Each disk is served by an NBD server (nbdkit with appliance/nbdkit_plugin.py) that fetches a block
    from the bucket the first time the guest reads it and streams the rest in behind, into a local
    cache; the VM's overlay is backed by that server. The host's record is created from the point's own
    settings when this appliance does not know the host (a new machine after a disaster).
    """
    started = time.monotonic()
    located = locate(home, tools, store, name, point_id)
    point = located.point
    host = cloud_host(home, name, store, point.settings)
    settings = settings or settings_for(host, memory=None, cpus=None, network=None, disk_bus=None)
    if recovery.load(home, name, "failover") is not None:
        raise FailoverError(f"{name} already has a recovery VM",
                            hint=f"`appliance failover {name}` starts it again on its writes; "
                            f"`appliance failover stop {name}` removes it")  # fmt: skip
    _refuse_leftover_domain(tools, name, "failover")
    _refuse_short_of(tools, settings, len(point.disks))
    folder = private_dir(home.failover_dir(name))
    private_dir(home.chain_dir(name))
    with HostLock(home.chain_dir(name) / "lock", name, "failover from cloud", wait=30.0):
        overlays = _serve_cloud_disks(home, tools, name, located, folder)
        choice = _choose_accel(home, tools, accel, say)
        vm = RecoveryVm(
            host=name, point=point.point, name=vm_name(name), purpose="failover", started=datetime.now(UTC),
            accel=choice.accel, settings=settings, console_log=str(folder / "console.log"),
            overlays=tuple(str(o) for o in overlays),
        )  # fmt: skip
        recovery.save(home, vm)
    say(f"booting {name} point {point.point} from cloud store {store} as VM {vm.name} with "
        f"{choice.accel.upper()} ({choice.why}); blocks come from the bucket as the guest reads them")  # fmt: skip
    try:
        vm = _start_domain(home, tools, vm, choice.may_fall_back, say)
    except BaseException:
        stop_block_servers(tools, folder)
        recovery.remove(home, name, "failover")
        raise
    log.info("failover.started", host=name, point=point.point, vm=vm.name, accel=vm.accel, purpose="failover",
             cloud=store)  # fmt: skip
    check = boot_check or BootCheck.parse(host.boot_check)
    return _await_boot(home, tools, vm, check, started, timeout, choice.may_fall_back and vm.accel == "kvm", say)


def _serve_cloud_disks(home: Home, tools: Tools, host: str, located: Located, folder: Path) -> list[Path]:
    """An NBD server per disk, and a disposable overlay backed by it; what they serve is recorded, so that
    the VM can be started again on its overlays (and its cache) after `failover stop --keep` or a reboot."""
    source = {"store": located.opened.store.name, "manifest": located.manifest, "version": located.version or "",
              "point": located.point.point, "sizes": " ".join(str(d.size) for d in located.point.disks)}  # fmt: skip
    recovery.save_cloud_source(home, host, source)
    overlays = []
    for disk in located.point.disks:
        socket_path = _serve_cloud_disk(home, tools, folder, source, disk.slot)
        overlay = folder / f"{disk.slot}.qcow2"
        overlay.unlink(missing_ok=True)
        tools.images.create(overlay, disk.size, f"nbd+unix:///?socket={socket_path}", backing_format="raw")
        overlays.append(overlay)
    return overlays


def _serve_cloud_disk(home: Home, tools: Tools, folder: Path, source: dict[str, str], slot: str) -> Path:
    """Start the NBD server of one disk unless it runs; its socket (in a short folder: a Unix socket's path
    has at most 107 bytes) is named after the failover's folder, so the overlay's backing stays valid."""
    server = _block_server(tools)
    socket_path = _nbd_socket(folder, slot)
    pidfile = folder / f"{slot}.nbd.pid"
    if not server.running(pidfile):
        params = {"home": str(home.root), "store": source["store"], "manifest": source["manifest"],
                  "version": source["version"], "slot": slot, "cache": str(folder / f"{slot}.cache")}  # fmt: skip
        server.start(socket_path, pidfile, folder / f"{slot}.nbd.log", params)
    return socket_path


def _resume_cloud_vm(home: Home, tools: Tools, host: Host, source: dict[str, str], accel: str,
                     say: Say) -> tuple[RecoveryVm, bool]:  # fmt: skip
    """A recovery VM booted from a cloud store, started again on its own overlays: its NBD servers first
    (their caches kept what was fetched)."""
    with HostLock(home.chain_dir(host.name) / "lock", host.name, "failover from cloud", wait=30.0):
        kept = _kept_vm(home, tools, host.name, "failover")
        if kept is None:
            boot = f"appliance failover {host.name} --from {source['store']}"
            raise FailoverError(f"{host.name} has no recovery VM to start again", hint=f"`{boot}` boots one")
        folder = home.failover_dir(host.name)
        for overlay in kept.overlays:
            _serve_cloud_disk(home, tools, folder, source, Path(overlay).stem)
        choice = _choose_accel(home, tools, accel, say)
        vm = replace(kept, accel=choice.accel, state="running", vnc="")
        recovery.save(home, vm)
    say(f"resuming {vm.name} on its kept writes: point {vm.point} from cloud store {source['store']}, first "
        f"started {_ago(vm.started)} ago; with {choice.accel.upper()} ({choice.why})")  # fmt: skip
    try:
        vm = _start_domain(home, tools, vm, choice.may_fall_back, say)
    except BaseException:
        recovery.save(home, kept)
        raise
    return vm, choice.may_fall_back and vm.accel == "kvm"


def _block_server(tools: Tools) -> BlockServer:
    if tools.block_server is None:
        raise FailoverError("no NBD server is wired on this appliance")
    return tools.block_server


def stop_block_servers(tools: Tools, folder: Path) -> None:
    """The NBD servers of a failover from a cloud store (none for a local point), and their sockets."""
    for pidfile in folder.glob("disk*.nbd.pid"):
        _block_server(tools).stop(pidfile)
        _nbd_socket(folder, pidfile.name.split(".")[0]).unlink(missing_ok=True)


def _nbd_socket(folder: Path, slot: str) -> Path:
    """In a short folder of its own (a Unix socket's path has at most 107 bytes), named after the failover's."""
    return (
        private_dir(Path("/run/appliance-nbd")) / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}-{slot}.sock"
    )


def restart_interrupted(home: Home, tools: Tools, say: Say = lambda _: None) -> list[RecoveryVm]:
    """Start again every recovery VM whose record says it runs but whose domain does not (a power cut
    or reboot of the appliance, QEMU killed), on its own overlays, for hosts with `vm_restart`.

    Each VM that cannot start is logged and left as it was (its writes kept); the others still start.
    """
    restarted = []
    for vm in recovery.all_vms(home):
        if vm.purpose != "failover" or vm.state != "running":
            continue
        try:
            host = hosts.load(home, vm.host)
            if not tools.hypervisor.state(vm.name).stopped:
                continue
            if not host.vm_restart:
                log.info("failover.restart_skipped", host=vm.host, vm=vm.name, why="the host's vm_restart is off")
                continue
            restarted.append(_restart(home, tools, host, say))
        except Exception as exc:  # noqa: BLE001 - one VM that cannot start must not keep the others down
            error = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
            log.error("failover.restart_failed", host=vm.host, vm=vm.name, error=error)
    log.info("failover.restarts_done", restarted=[vm.host for vm in restarted])
    return restarted


def _restart(home: Home, tools: Tools, host: Host, say: Say) -> RecoveryVm:
    settings = settings_for(host, memory=None, cpus=None, network=None, disk_bus=None)  # the VM keeps its own
    source = recovery.cloud_source(home, host.name)
    if source is not None:
        vm, may_fall_back = _resume_cloud_vm(home, tools, host, source, "auto", say)
    else:
        vm, may_fall_back = _start_vm(home, tools, host, "latest", settings, "failover", "auto", False, say)
    if may_fall_back:
        vm = _watch_first_seconds(home, tools, vm, say)
    log.info("failover.restarted", host=vm.host, vm=vm.name, point=vm.point, accel=vm.accel)
    return vm


def _start_vm(home: Home, tools: Tools, host: Host, point_ref: str, settings: VmSettings, purpose: str,
              accel: str, force: bool, say: Say) -> tuple[RecoveryVm, bool]:  # fmt: skip
    """Pin the point, create the overlays (or take the kept ones), start the domain; return the VM and
    whether a KVM failure may still fall back to TCG. The record exists before the VM does."""
    with chains.open(home, tools.images, host.name, purpose, wait=30.0) as tx:
        chain = tx.chain
        kept = _kept_vm(home, tools, host.name, purpose)
        if kept is None:
            point = chain.find(point_ref)
            _refuse_unfit(home, tools, host, point, settings, purpose, force)
            folder = private_dir(home.failover_dir(host.name, purpose))
            vm = RecoveryVm(
                host=host.name, point=point.id, name=vm_name(host.name, purpose), purpose=purpose,
                started=datetime.now(UTC), accel="tcg", settings=settings, console_log=str(folder / "console.log"),
                overlays=tuple(str(o) for o in _make_overlays(home, tools, host.name, point, folder)),
            )  # fmt: skip
        else:
            point = chain.find(kept.point)
            _refuse_other_point(chain, kept, point_ref)
            _refuse_short_of(tools, kept.settings, len(kept.overlays))
            vm = kept
        choice = _choose_accel(home, tools, accel, say)
        vm = replace(vm, accel=choice.accel, state="running", vnc="")
        recovery.save(home, vm)
    if kept is None:
        say(f"booting {host.name} point {point.id} ({point.time_iso}) as VM {vm.name} with {choice.accel.upper()} "
            f"({choice.why})")  # fmt: skip
    else:
        say(f"resuming {vm.name} on its kept writes: point {point.id} ({point.time_iso}), first started "
            f"{_ago(vm.started)} ago; with {choice.accel.upper()} ({choice.why})")  # fmt: skip
    try:
        vm = _start_domain(home, tools, vm, choice.may_fall_back, say)
    except BaseException:
        if kept is None:
            recovery.remove(home, host.name, purpose)  # a VM that never ran wrote nothing
        else:
            recovery.save(home, kept)  # as it was, writes and all
        raise
    log.info("failover.started", host=host.name, point=point.id, vm=vm.name, accel=vm.accel, purpose=purpose,
             resumed=kept is not None)  # fmt: skip
    return vm, choice.may_fall_back and vm.accel == "kvm"


def _spec(vm: RecoveryVm) -> DomainSpec:
    s = vm.settings
    return DomainSpec(
        name=vm.name, accel=vm.accel, memory_mib=s.memory_mib, cpus=s.cpus, disks=vm.overlays, disk_bus=s.disk_bus,
        network=s.network, console_log=vm.console_log, host=vm.host, point=vm.point, purpose=vm.purpose,
    )  # fmt: skip


def _kept_vm(home: Home, tools: Tools, host: str, purpose: str) -> RecoveryVm | None:
    """The recovery VM of `host` to start again on its own overlays: recorded, and its domain stopped.

    A verification's leftover (its VM was killed mid-check) is removed instead: its writes are worth nothing.
    """
    existing = recovery.load(home, host, purpose)
    if existing is None:
        return None
    live = tools.hypervisor.state(existing.name)
    if not live.stopped:
        now = "already running" if live.running else f"there, {live}"
        raise FailoverError(
            f"a recovery VM for {host} is {now} ({existing.name}, point {existing.point}, "
            f"since {existing.started.astimezone():%Y-%m-%d %H:%M})",
            hint=f"`appliance failover stop {host}` stops it",
        )
    if purpose == "verify":
        tools.hypervisor.remove(existing.name)
        recovery.remove(home, host, purpose)
        return None
    return existing


def _refuse_other_point(chain: Chain, kept: RecoveryVm, point_ref: str) -> None:
    """Another point while a recovery VM's writes are kept would mean choosing which to lose: the user does."""
    if point_ref == "latest":
        return
    asked = chain.find(point_ref)
    if asked.id != kept.point:
        raise FailoverError(
            f"{kept.host}'s recovery VM on point {kept.point} holds the writes made since its failover; "
            f"not booting point {asked.id} (discard them first with `appliance failover stop {kept.host}`)"
        )


def _refuse_unfit(home: Home, tools: Tools, host: Host, point: Point, settings: VmSettings, purpose: str,
                  force: bool) -> None:  # fmt: skip
    _refuse_leftover_domain(tools, host.name, purpose)
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
    _refuse_short_of(tools, settings, len(point.disks))


def _refuse_leftover_domain(tools: Tools, host: str, purpose: str) -> None:
    if tools.hypervisor.exists(vm_name(host, purpose)):
        raise FailoverError(f"a libvirt domain named {vm_name(host, purpose)} already exists",
                            hint="remove it with virsh (undefine) if it is a leftover")  # fmt: skip


def _refuse_short_of(tools: Tools, settings: VmSettings, disks: int) -> None:
    """What the VM needs from this appliance: memory, its bridge, a bus for all its disks."""
    hv = tools.hypervisor
    available = hv.free_memory_mib()
    if settings.memory_mib > available:
        raise FailoverError(f"not enough memory: the VM asks {settings.memory_mib} MiB, {available} MiB are free",
                            hint="give less with --memory")  # fmt: skip
    if settings.network.kind == "bridge" and not hv.bridge_exists(settings.network.bridge):
        raise FailoverError(f"there is no bridge {settings.network.bridge!r} on this appliance",
                            hint="`ip link show type bridge` lists the bridges; or use --network user")  # fmt: skip
    if settings.disk_bus == "ide" and disks > 4:
        raise FailoverError("IDE takes at most 4 disks; use --disk-bus sata or virtio")


def _make_overlays(home: Home, tools: Tools, host: str, point: Point, folder: Path) -> list[Path]:
    """One disposable overlay per disk, backed by the point's file (absolute path, read-only for QEMU).
    Called only when the host has no recovery VM record: any file found there holds no VM's writes."""
    chain_dir = home.chain_dir(host)
    overlays = []
    for disk in point.disks:
        overlay = folder / f"{disk.slot}.qcow2"
        overlay.unlink(missing_ok=True)
        tools.images.create(overlay, disk.size, str((chain_dir / disk.file).resolve()))
        overlays.append(overlay)
    return overlays


def _ago(when: datetime) -> str:
    seconds = max(0, int((datetime.now(UTC) - when).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days} d"] * bool(days) + [f"{hours} h"] * bool(hours) + [f"{minutes} min"] * bool(minutes)
    return " ".join(parts[:2]) if parts else f"{seconds} s"


def _choose_accel(home: Home, tools: Tools, wanted: str, say: Say) -> AccelChoice:
    """The one KVM-or-TCG decision of every recovery VM (failover, boot verification, the daemon's restarts)."""
    hv = tools.hypervisor
    kvm_usable = wanted == "auto" and hv.kvm_available()
    return choose(wanted, kvm_usable, hv.machine(), _remembered_failure(home, say))


def _remembered_failure(home: Home, say: Say) -> KvmFailure | None:
    """The accel record; a damaged one is said, logged and removed, never a reason not to fail over (it
    only saves a KVM attempt that would fail and fall back again)."""
    try:
        return accel_store.load(home)
    except DamagedFileError as exc:
        say(f"warning: {exc.message}; removed, KVM is tried again")
        log.warning("failover.accel_record_damaged", file=str(home.accel_file), error=exc.message)
        accel_store.forget(home)
        return None


def _start_domain(home: Home, tools: Tools, vm: RecoveryVm, may_fall_back: bool, say: Say) -> RecoveryVm:
    """Start the VM's domain; a refused KVM start (QEMU aborting: "failed to set MSR") falls back to TCG."""
    try:
        tools.hypervisor.start(_spec(vm))
    except HypervisorError as exc:
        if not (may_fall_back and vm.accel == "kvm"):
            raise
        return _fall_back_to_tcg(home, tools, vm, start_failure_reason(exc.message), say)
    return _running(home, tools, vm)


def _running(home: Home, tools: Tools, vm: RecoveryVm) -> RecoveryVm:
    vm = replace(vm, vnc=tools.hypervisor.vnc_display(vm.name))
    recovery.save(home, vm)
    return vm


def _fall_back_to_tcg(home: Home, tools: Tools, vm: RecoveryVm, reason: str, say: Say) -> RecoveryVm:
    """KVM cannot run this VM here: start the same VM (its overlays as they are) with TCG once, and
    remember the failure for this kernel and CPU when TCG has started it (a VM that TCG cannot start
    either did not fail because of KVM)."""
    hv = tools.hypervisor
    machine = hv.machine()
    say(f"KVM failed ({reason}): starting {vm.name} again with TCG (software emulation), as every VM on {machine} "
        "from now on")  # fmt: skip
    log.info("failover.kvm_fallback", host=vm.host, vm=vm.name, reason=reason, kernel=machine.kernel,
             cpu=machine.cpu)  # fmt: skip
    hv.destroy_keep(vm.name)
    vm = replace(vm, accel="tcg", vnc="")
    recovery.save(home, vm)
    hv.start(_spec(vm))
    accel_store.remember(home, KvmFailure(machine=machine, reason=reason, since=datetime.now(UTC)))
    return _running(home, tools, vm)


def _after_stop(home: Home, tools: Tools, vm: RecoveryVm, state: DomainState, seconds_running: float,
                may_fall_back: bool, say: Say) -> RecoveryVm:  # fmt: skip
    """The VM stopped before its guest booted: if that is KVM failing and `auto` chose KVM, start it again
    with TCG; otherwise say why it stopped (its overlays stay: `failover HOST` starts it again)."""
    output = tools.hypervisor.qemu_log_tail(vm.name, 20)
    reason = stop_failure_reason(state, output, seconds_running) if vm.accel == "kvm" else None
    if reason is not None and may_fall_back:
        return _fall_back_to_tcg(home, tools, vm, reason, say)
    last = (output.splitlines() or ["no log"])[-1]
    raise FailoverError(f"the recovery VM {vm.name} stopped ({state}): {reason or last}")


def _watch_first_seconds(home: Home, tools: Tools, vm: RecoveryVm, say: Say) -> RecoveryVm:
    """KVM may fail only once the guest runs: watch a VM started with KVM through its first seconds."""
    since = time.monotonic()
    while (elapsed := time.monotonic() - since) < EARLY_SECONDS:
        state = tools.hypervisor.state(vm.name)
        if not state.running:
            return _after_stop(home, tools, vm, state, elapsed, True, say)
        time.sleep(0.2)
    return vm


def _await_boot(home: Home, tools: Tools, vm: RecoveryVm, check: BootCheck, started: float, timeout: float,
                may_fall_back: bool, say: Say) -> RecoveryVm:  # fmt: skip
    """Poll the boot check; a VM that stops first because KVM failed is started again with TCG, once."""
    hv = tools.hypervisor
    watcher = _BootWatcher(tools, vm, check)
    deadline = started + timeout
    running_since = time.monotonic()
    while time.monotonic() < deadline:
        state = hv.state(vm.name)
        if not state.running:
            vm = _after_stop(home, tools, vm, state, time.monotonic() - running_since, may_fall_back, say)
            may_fall_back, running_since = False, time.monotonic()
            watcher = _BootWatcher(tools, vm, check)
            continue
        if watcher.booted():
            vm = replace(vm, rto_seconds=round(time.monotonic() - started, 2))
            recovery.save(home, vm)
            log.info("failover.booted", host=vm.host, point=vm.point, vm=vm.name, rto=vm.rto_seconds, check=str(check))
            return vm
        time.sleep(0.1)
    log.warning("failover.boot_not_seen", host=vm.host, vm=vm.name, timeout=timeout, check=str(check))
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
    """Power the recovery VM off; without `keep`, its overlays (its writes) are deleted too.

    The one place besides a verified failback where a recovery VM's writes are removed. It takes the
    host's lock, so it never deletes overlays under a failback that is copying them.
    """
    hosts.load(home, name)
    with HostLock(home.chain_dir(name) / "lock", name, "failover stop", wait=STOP_LOCK_WAIT):
        vm = recovery.load(home, name, purpose)
        if vm is None:
            raise FailoverError(f"{name} has no recovery VM", hint="`appliance failover status` lists them")
        tools.hypervisor.remove(vm.name)
        stop_block_servers(tools, home.failover_dir(name, purpose))
        if keep:
            vm = replace(vm, state="stopped")
            recovery.save(home, vm)
        else:
            recovery.remove(home, name, purpose)
    log.info("failover.stopped", host=name, vm=vm.name, kept=keep)
    return vm


def status(home: Home, tools: Tools) -> list[tuple[RecoveryVm, str]]:
    """Every recorded recovery VM with what libvirt says of it now; a failover VM whose domain is not
    running (shut off, kept, the appliance restarted) still has its writes: `failover HOST` resumes it."""
    found = []
    for vm in recovery.all_vms(home):
        live = tools.hypervisor.state(vm.name)
        if live.running:
            shown = "running"
        elif live.stopped and vm.purpose == "failover":
            shown = "stopped (writes kept)"
        else:
            shown = str(live)
        found.append((vm, shown))
    return found


def verify_boot(home: Home, tools: Tools, name: str, *, point_ref: str = "latest", timeout: float = 300.0,
                accel: str = "auto", say: Say = lambda _: None) -> dict[str, object]:  # fmt: skip
    """Boot a point in isolation (no network), screenshot it, record the verdict in the point, clean up."""
    started = time.monotonic()
    host = hosts.load(home, name)
    settings = replace(settings_for(host, memory=None, cpus=None, network=None, disk_bus=None), network=Network("none"))
    vm, may_fall_back = _start_vm(home, tools, host, point_ref, settings, "verify", accel, True, say)
    check = BootCheck.parse(host.boot_check)
    shot = home.screenshot(name, vm.point)
    try:
        vm = _await_boot(home, tools, vm, check, started, timeout, may_fall_back, say)
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
    with chains.open(home, tools.images, name, "verify", wait=60.0) as tx:
        point = tx.chain.find(vm.point)
        tx.record(replace(point, extra={**point.extra, "boot": verdict}))
    log.info("point.boot_verified", host=name, point=vm.point, ok=verdict["ok"], rto=vm.rto_seconds)
    return verdict
