# SPDX-License-Identifier: GPL-2.0-or-later
"""libvirt: recovery VMs defined, started, watched, photographed and removed through libvirt-python."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from appliance.adapters import libvirt_xml
from appliance.domain.accel import Machine, known_failure
from appliance.domain.recovery import DomainSpec, DomainState
from appliance.errors import HypervisorError
from appliance.log import get_logger

log = get_logger(__name__)


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; the appliance reports them itself."""


libvirt.registerErrorHandler(_silence, None)

_START_HINT = (
    "start libvirt: `systemctl start libvirtd`, or without systemd `setsid -f tools/run-libvirt` from the "
    "appliance's source folder (./install does this)"
)


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
# Why a domain is shut off or paused, in libvirt's words (`virsh domstate --reason`): a VM whose QEMU
# died reads `shutoff, crashed` even when `<on_crash>` turned the crash into an ordinary shut-off.
_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF: {
        libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
        libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
        libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
        libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
        libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
        libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed",
        libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from snapshot",
        libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
    },
    libvirt.VIR_DOMAIN_PAUSED: {
        libvirt.VIR_DOMAIN_PAUSED_UNKNOWN: "unknown",
        libvirt.VIR_DOMAIN_PAUSED_USER: "user",
        libvirt.VIR_DOMAIN_PAUSED_MIGRATION: "migration",
        libvirt.VIR_DOMAIN_PAUSED_SAVE: "save",
        libvirt.VIR_DOMAIN_PAUSED_DUMP: "dump",
        libvirt.VIR_DOMAIN_PAUSED_IOERROR: "ioerror",
        libvirt.VIR_DOMAIN_PAUSED_WATCHDOG: "watchdog",
        libvirt.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT: "from snapshot",
        libvirt.VIR_DOMAIN_PAUSED_SHUTTING_DOWN: "shutting down",
        libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT: "snapshot",
        libvirt.VIR_DOMAIN_PAUSED_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_PAUSED_STARTING_UP: "starting up",
    },
    libvirt.VIR_DOMAIN_CRASHED: {libvirt.VIR_DOMAIN_CRASHED_PANICKED: "panicked"},
}
_LOG_START = ": starting up libvirt version"  # the line libvirt writes to a domain's log at each start


_T = TypeVar("_T")


def _one_line_errors(cls: type[_T]) -> type[_T]:
    """Every public method of the adapter turns a libvirt error it did not handle itself (libvirtd gone
    mid-call, a domain removed under it) into a HypervisorError: the user reads one line, never a trace."""
    for name, method in list(vars(cls).items()):
        if callable(method) and not name.startswith("_"):
            setattr(cls, name, _wrapped(name, method))
    return cls


def _wrapped(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except libvirt.libvirtError as exc:
            subject = f" {args[0]}" if args and isinstance(args[0], str) else ""
            raise HypervisorError(f"libvirt failed at {name}{subject}: {exc.get_error_message() or exc}") from exc

    return call


def _arp_table() -> list[tuple[str, str]]:
    """(IPv4 address, MAC) of every complete entry of the kernel's ARP table."""
    try:
        with open("/proc/net/arp", encoding="ascii") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return []
    return [(row[0], row[3].lower()) for row in rows if len(row) >= 4 and row[2] != "0x0"]


@_one_line_errors
class LibvirtHypervisor:
    """The Hypervisor port over one libvirt connection (qemu:///system by default), shared by the
    scheduler's job threads (libvirt connections are thread-safe; opening one is done once, under a lock)."""

    def __init__(self, uri: str, emulator: str | None = None) -> None:
        """`emulator`: a QEMU binary for recovery VMs other than libvirt's default (a wrapper, a build)."""
        self.uri = uri
        self.emulator = emulator
        self._connection: libvirt.virConnect | None = None
        self._opening = threading.Lock()

    @property
    def _conn(self) -> libvirt.virConnect:
        with self._opening:
            if self._connection is None:
                try:
                    self._connection = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise HypervisorError(
                        f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}", hint=_START_HINT
                    ) from exc
            return self._connection

    def _domain(self, name: str) -> libvirt.virDomain | None:
        try:
            return self._conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from exc

    def kvm_available(self) -> bool:
        """KVM as libvirt sees it: /dev/kvm usable and a kvm domain type offered."""
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return False
        try:
            self._conn.getDomainCapabilities(None, "x86_64", None, "kvm")
        except libvirt.libvirtError:
            return False
        return True

    def machine(self) -> Machine:
        """The kernel release and CPU model this appliance runs on (what KVM's behaviour depends on)."""
        cpu = ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        except OSError:
            pass
        return Machine(kernel=os.uname().release, cpu=cpu or os.uname().machine)

    def exists(self, name: str) -> bool:
        return self._domain(name) is not None

    def start(self, spec: DomainSpec) -> None:
        """Define the domain and start it. A shut-off domain of that name is redefined in place (its
        UUID and checkpoints stay); a domain defined here is undefined again if it does not start."""
        existing = self._domain(spec.name)
        if existing is not None and existing.isActive():
            raise HypervisorError(f"{spec.name} is already running")
        uuid = existing.UUIDString() if existing is not None else None
        xml = libvirt_xml.render(spec, emulator=self.emulator, uuid=uuid)
        try:
            dom = self._conn.defineXML(xml)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt refused the recovery VM: {exc.get_error_message()}") from exc
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            if existing is None:
                dom.undefine()
            raise HypervisorError(f"the recovery VM did not start: {self._start_error(spec.name, exc)}") from exc

    def state(self, name: str) -> DomainState:
        dom = self._domain(name)
        if dom is None:
            return DomainState(False, "gone", "")
        try:
            state, reason = dom.state()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:  # removed between the lookup and now
                return DomainState(False, "gone", "")
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from exc
        named = _REASONS.get(state, {}).get(reason, str(reason))
        return DomainState(state == libvirt.VIR_DOMAIN_RUNNING, _STATES.get(state, str(state)), named)

    def remove(self, name: str) -> None:
        """Stop the domain at once (power off) and forget its definition."""
        dom = self._domain(name)
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
            # checkpoints (failback's dirty bitmaps) and snapshots are libvirt metadata of this VM only
            dom.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            )
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot remove {name}: {exc.get_error_message()}") from exc

    def destroy_keep(self, name: str) -> None:
        """Power the domain off at once, keeping its definition and checkpoints."""
        dom = self._domain(name)
        if dom is not None and dom.isActive():
            try:
                dom.destroy()
            except libvirt.libvirtError as exc:
                if not dom.isActive():  # it stopped by itself in between (a guest that finished shutting down)
                    return
                raise HypervisorError(f"cannot stop {name}: {exc.get_error_message()}") from exc

    def drop_checkpoints(self, name: str, only: list[str] | None = None) -> None:
        """Delete the domain's checkpoints (all, or `only` these) and their dirty bitmaps."""
        dom = self._domain(name)
        if dom is None:
            return
        try:
            for checkpoint in dom.listAllCheckpoints(0):
                if only is None or checkpoint.getName() in only:
                    checkpoint.delete(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot delete the checkpoints of {name}: {exc.get_error_message()}") from exc

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI); the caller waits and forces it if needed."""
        dom = self._domain(name)
        if dom is not None and dom.isActive():
            try:
                dom.shutdown()
            except libvirt.libvirtError as exc:
                log.warning("libvirt.shutdown_failed", domain=name, error=exc.get_error_message())

    def vnc_display(self, name: str) -> str:
        dom = self._domain(name)
        if dom is None:
            return ""
        port = libvirt_xml.vnc_port(dom.XMLDesc(0))
        return f"127.0.0.1:{port}" if port else ""

    def guest_addresses(self, name: str) -> list[str]:
        """IPv4 addresses the guest was seen with on the network, for a TCP boot check: the kernel's ARP
        table (/proc/net/arp) for the domain's MAC addresses. libvirt's own ARP source is not used: libvirt
        9.0 fails to parse newer kernels' neighbour messages ("wrong nlmsg len", seen on 6.18)."""
        dom = self._domain(name)
        if dom is None or not dom.isActive():
            return []
        macs = libvirt_xml.mac_addresses(dom.XMLDesc(0))
        return [address for address, mac in _arp_table() if mac in macs]

    def backup(self, name: str, targets: list[tuple[str, Path]], checkpoint: str, since: str | None) -> None:
        """A point-in-time copy of the disks into local qcow2 files, made by QEMU (libvirt push backup).

        With `since`, only the clusters written after that checkpoint; either way a new checkpoint (a
        persistent dirty bitmap) starts now. Waits for the job to finish."""
        dom = self._domain(name)
        if dom is None:
            raise HypervisorError(f"{name} is not running")
        disks = "".join(
            f"<disk name='{dev}' backup='yes' type='file'><target file='{path}'/><driver type='qcow2'/></disk>"
            for dev, path in targets
        )
        incremental = f"<incremental>{since}</incremental>" if since else ""
        backup_xml = f"<domainbackup mode='push'>{incremental}<disks>{disks}</disks></domainbackup>"
        checkpoint_disks = "".join(f"<disk name='{dev}' checkpoint='bitmap'/>" for dev, _ in targets)
        checkpoint_xml = (
            f"<domaincheckpoint><name>{checkpoint}</name><disks>{checkpoint_disks}</disks></domaincheckpoint>"
        )
        try:
            dom.backupBegin(backup_xml, checkpoint_xml, 0)
            while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                time.sleep(0.05)
            stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"backup of {name} failed: {exc.get_error_message()}") from exc
        if stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
            raise HypervisorError(f"backup of {name} failed: {stats.get('errmsg', 'job did not complete')}")

    def screenshot_ppm(self, name: str, path: Path) -> bytes:
        """The guest's screen as raw PPM (QMP screendump into `path`): cheap to compare pixel by pixel."""
        self.monitor(name, {"execute": "screendump", "arguments": {"filename": str(path), "format": "ppm"}})
        try:
            return path.read_bytes()
        finally:
            path.unlink(missing_ok=True)

    def screenshot_png(self, name: str, path: Path) -> None:
        """Save the guest's screen as PNG, encoded by QEMU itself (QMP screendump)."""
        self.monitor(name, {"execute": "screendump", "arguments": {"filename": str(path), "format": "png"}})

    def _start_error(self, name: str, exc: libvirt.libvirtError) -> str:
        """libvirt's reason, with QEMU's own last words from the domain's log when libvirt's do not hold them:
        QEMU that dies at once leaves libvirt saying only "failed to connect to monitor socket" when the
        machine is busy, and the user needs QEMU's line ("failed to set MSR 0x10a")."""
        message = exc.get_error_message() or str(exc)
        tail = self.qemu_log_tail(name, 5)
        said = known_failure(tail) or next((line for line in reversed(tail.splitlines()) if line.strip()), "")
        return message if not said or said.strip() in message else f"{message}; QEMU: {said.strip()[-200:]}"

    def qemu_log_tail(self, name: str, lines: int = 5) -> str:
        """The last lines QEMU (and libvirt) wrote to the domain's log since its latest start."""
        path = Path("/var/log/libvirt/qemu") / f"{name}.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        start = text.rfind(_LOG_START)
        if start >= 0:
            text = text[text.find("\n", start) + 1 :]
        return "\n".join(text.strip().splitlines()[-lines:])

    def monitor(self, name: str, command: dict[str, Any]) -> Any:
        """A QMP command to the domain's QEMU, through libvirt (which owns the monitor socket)."""
        dom = self._domain(name)
        if dom is None:
            raise HypervisorError(f"{name} is not running")
        try:
            reply = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"QMP {command.get('execute')} on {name} failed: {exc.get_error_message()}") from exc
        return json.loads(reply).get("return")

    def free_memory_mib(self) -> int:
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) // 1024
        except OSError:
            pass
        return int(self._conn.getFreeMemory()) >> 20

    def bridge_exists(self, name: str) -> bool:
        return Path("/sys/class/net", name, "bridge").is_dir()

    def recovery_domains(self) -> list[tuple[str, dict[str, str]]]:
        """(name, metadata) of every domain this appliance created, running or not."""
        try:
            domains = self._conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt: {exc.get_error_message()}") from exc
        found = []
        for dom in domains:
            meta = libvirt_xml.recovery_metadata(dom.XMLDesc(0))
            if meta is not None:
                found.append((dom.name(), meta))
        return found
