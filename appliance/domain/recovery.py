# SPDX-License-Identifier: GPL-2.0-or-later
"""Recovery VMs: a point booted on disposable overlays, and how the appliance knows it is up."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

from appliance.errors import ConfigError

DISK_BUSES = ("virtio", "sata", "ide")
# The words `appliance failover ...` and `appliance failback ...` take where a host name could stand
# (cli/_output.py HostOrCommand): a host named so could never be failed over or back by its name.
RESERVED_NAMES = frozenset({"boot", "status", "stop", "run"})


@dataclass(frozen=True, slots=True)
class Network:
    """`user` (NAT by QEMU, no setup), `bridge=NAME` (on the LAN, as the server was), or `none`."""

    kind: str
    bridge: str = ""

    @classmethod
    def parse(cls, text: str) -> Network:
        if text in ("user", "none"):
            return cls(text)
        if text.startswith("bridge="):
            name = text.split("=", 1)[1]
            if re.fullmatch(r"[A-Za-z0-9_.:-]{1,15}", name):
                return cls("bridge", name)
        raise ConfigError(f"invalid network {text!r}: use user, none or bridge=NAME")

    def __str__(self) -> str:
        return f"bridge={self.bridge}" if self.kind == "bridge" else self.kind


@dataclass(frozen=True, slots=True)
class BootCheck:
    """How to tell that the guest has booted.

    `console:REGEX`  a line on the serial console matches (Linux with console=ttyS0, the lab's guest);
    `screen`         the screen is not blank and has not changed for a few seconds (any OS);
    `tcp:PORT`       the guest answers on a TCP port (bridged network; the address comes from ARP).
    """

    kind: str
    pattern: str = ""
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> BootCheck:
        kind, _, arg = text.partition(":")
        if kind == "console" and arg:
            try:
                re.compile(arg)
            except re.error as exc:
                raise ConfigError(f"invalid boot check pattern {arg!r}: {exc}") from exc
            return cls("console", pattern=arg)
        if kind == "screen" and not arg:
            return cls("screen")
        if kind == "tcp" and arg.isdigit() and 0 < int(arg) < 65536:
            return cls("tcp", port=int(arg))
        raise ConfigError(f"invalid boot check {text!r}: use console:REGEX, screen or tcp:PORT")

    def __str__(self) -> str:
        return {"console": f"console:{self.pattern}", "tcp": f"tcp:{self.port}"}.get(self.kind, self.kind)


DEFAULT_BOOT_CHECK = "screen"


@dataclass(frozen=True, slots=True)
class VmSettings:
    memory_mib: int = 1024
    cpus: int = 1
    network: Network = field(default_factory=lambda: Network("user"))
    disk_bus: str = "virtio"

    def __post_init__(self) -> None:
        if self.disk_bus not in DISK_BUSES:
            raise ConfigError(f"invalid disk bus {self.disk_bus!r}: use {', '.join(DISK_BUSES)}")
        if not 64 <= self.memory_mib <= 1 << 20:
            raise ConfigError(f"invalid memory {self.memory_mib} MiB")
        if not 1 <= self.cpus <= 256:
            raise ConfigError(f"invalid number of CPUs {self.cpus}")


@dataclass(frozen=True, slots=True)
class RecoveryVm:
    """A recovery VM as the appliance recorded it; its point is pinned while the record exists."""

    host: str
    point: str
    name: str
    purpose: str  # failover | verify
    started: datetime
    accel: str  # kvm | tcg
    overlays: tuple[str, ...]  # absolute paths, one per disk, in the host's disk order
    console_log: str
    settings: VmSettings
    vnc: str = ""
    rto_seconds: float | None = None
    state: str = "running"  # running | stopped (overlays kept for failback)


def vm_name(host: str, purpose: str = "failover") -> str:
    """The libvirt domain name: recognisable in `virsh list`, never clashing with the user's own VMs."""
    return f"recovery-{host}" if purpose == "failover" else f"verify-{host}"


def target_dev(bus: str, index: int) -> str:
    prefix = {"virtio": "vd", "sata": "sd", "ide": "hd"}[bus]
    return prefix + "abcdefghijklmnopqrstuvwxyz"[index]


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """Everything a hypervisor needs to run a recovery VM."""

    name: str
    accel: str  # kvm | tcg
    memory_mib: int
    cpus: int
    disks: tuple[str, ...]  # qcow2 overlays, bootable disk first
    disk_bus: str
    network: Network
    console_log: str
    host: str
    point: str
    purpose: str


@dataclass(frozen=True, slots=True)
class DomainState:
    running: bool
    state: str  # running, paused, shutoff, crashed, gone, ...
    reason: str  # libvirt's reason for the state: crashed, failed, shutdown, destroyed, ioerror, ...

    @property
    def stopped(self) -> bool:
        """No QEMU runs for the domain: shut off, or not defined at all (a paused VM is not stopped)."""
        return self.state in ("shutoff", "gone")

    def __str__(self) -> str:
        return f"{self.state}, {self.reason}" if self.reason else self.state
