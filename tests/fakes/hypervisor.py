# SPDX-License-Identifier: GPL-2.0-or-later
"""FakeHypervisor: the Hypervisor port as a small state machine, for unit tests of the use cases.

A domain is defined and running once `start` succeeds; `shutdown` and `destroy_keep` turn it off with
a reason, `remove` forgets it (`state` then says "gone", as libvirt does). Every call is recorded in
`calls`. `refuse_start(message, accel=...)` makes the next start (with that accelerator) fail as libvirt
reports it, leaving nothing defined, e.g. `refuse_start("KVM refused", accel="kvm")`.

Push backups (failback) of a running domain: `backup` writes each target as a FakeImages image of the
domain's disk (its overlay, read through its chain) at that instant, whole or, `since` a checkpoint,
only the clusters whose content differs from what the disk held at that checkpoint (a cluster that now
reads as zeroes becomes a zero cluster), and starts the checkpoint it is given: a copy of each disk,
kept until `drop_checkpoints`. Dirty tracking is by content, not by writes: a cluster rewritten with the
same bytes is not dirty. After each backup `guest_writes(name)` is called if set: the test's guest
writing on while the appliance sends the copy. `copy_dirty(image, bitmaps, target)` is what
qemu-storage-daemon does with the bitmaps a stopped domain saved in its overlay (ImageTool.copy_dirty,
which FakeImages does not model: a test's FakeImages subclass hands it here): the clusters that differ
from the disk at the first of `bitmaps`, into `target`; an unknown bitmap is refused as QEMU refuses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.domain.accel import Machine
from appliance.domain.recovery import DomainSpec, DomainState
from appliance.errors import HypervisorError, ImageToolError
from tests.fakes.images import FakeImages

# The smallest valid PNG (1x1, grey): what a screenshot of the fake's screen holds.
TINY_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108000000003a7e9b55"
    "0000000a49444154789c636800000082008177cd72b60000000049454e44ae426082"
)


@dataclass(slots=True)
class FakeDomain:
    spec: DomainSpec
    state: str = "running"  # running | shutoff
    reason: str = "booted"
    checkpoints: dict[str, list[bytes]] = field(default_factory=dict)  # name -> each disk's content then


class FakeHypervisor:
    """The Hypervisor port. See the module doc."""

    uri = "test:///fake"

    MACHINE = Machine(kernel="6.18.44-test", cpu="Test CPU")

    def __init__(self, *, kvm: bool = False, free_memory_mib: int = 8192, bridges: tuple[str, ...] = (),
                 console: str = "APPLIANCE-GUEST-UP marker=fake") -> None:  # fmt: skip
        """`console`: the line a started guest "prints" on its serial console (its console log file)."""
        self.kvm = kvm
        self.console = console
        self.memory = free_memory_mib
        self.bridges = set(bridges)
        self.domains: dict[str, FakeDomain] = {}
        self.calls: list[tuple[str, str]] = []  # (method, domain name or accelerator)
        self._refusals: list[tuple[str, str | None]] = []
        self.guest_writes: Callable[[str], None] | None = None  # called after each backup (the module doc)
        self._images = FakeImages()  # reads and writes the domains' disks and the backups' targets

    def refuse_start(self, message: str, *, accel: str | None = None) -> None:
        """The next start (of a domain with `accel`, or any) fails with `message`."""
        self._refusals.append((message, accel))

    def _domain(self, name: str) -> FakeDomain:
        if name not in self.domains:
            raise HypervisorError(f"{name} is not running")
        return self.domains[name]

    # -- the port --------------------------------------------------------------------------------------

    def kvm_available(self) -> bool:
        return self.kvm

    def machine(self) -> Machine:
        return self.MACHINE

    def crash(self, name: str) -> None:
        """QEMU killed (SIGKILL, the OOM killer): the domain stays defined, shut off, reason "crashed"."""
        self._turn_off(name, "crashed")

    def exists(self, name: str) -> bool:
        return name in self.domains

    def start(self, spec: DomainSpec) -> None:
        self.calls.append(("start", spec.accel))
        if spec.name in self.domains and self.domains[spec.name].state == "running":
            raise HypervisorError(f"libvirt refused the recovery VM: domain {spec.name} is already running")
        for i, (message, accel) in enumerate(self._refusals):
            if accel in (None, spec.accel):
                del self._refusals[i]
                raise HypervisorError(f"the recovery VM did not start: {message}")
        self.domains[spec.name] = FakeDomain(spec)
        if self.console:
            Path(spec.console_log).write_text(f"{self.console}\n")

    def state(self, name: str) -> DomainState:
        domain = self.domains.get(name)
        if domain is None:
            return DomainState(False, "gone", "")
        return DomainState(domain.state == "running", domain.state, domain.reason)

    def remove(self, name: str) -> None:
        self.calls.append(("remove", name))
        self.domains.pop(name, None)

    def shutdown(self, name: str) -> None:
        self.calls.append(("shutdown", name))
        self._turn_off(name, "shutdown")

    def destroy_keep(self, name: str) -> None:
        self.calls.append(("destroy_keep", name))
        self._turn_off(name, "destroyed")

    def _turn_off(self, name: str, reason: str) -> None:
        domain = self.domains.get(name)
        if domain is not None and domain.state == "running":
            domain.state, domain.reason = "shutoff", reason

    def vnc_display(self, name: str) -> str:
        return "127.0.0.1:5900" if name in self.domains else ""

    def guest_addresses(self, name: str) -> list[str]:
        return []

    def drop_checkpoints(self, name: str, only: list[str] | None = None) -> None:
        self.calls.append(("drop_checkpoints", name))
        domain = self.domains.get(name)
        if domain is not None:
            for checkpoint in list(domain.checkpoints) if only is None else only:
                domain.checkpoints.pop(checkpoint, None)

    def backup(self, name: str, targets: list[tuple[str, Path]], checkpoint: str, since: str | None) -> None:
        """See the module doc."""
        self.calls.append(("backup", name))
        domain = self._domain(name)
        if domain.state != "running":
            raise HypervisorError(f"cannot back up {name}: it is not running")
        if since is not None and since not in domain.checkpoints:
            raise HypervisorError(f"{name} has no checkpoint {since}")
        disks = [self._read(Path(disk)) for disk in domain.spec.disks]
        for index, ((_, target), now) in enumerate(zip(targets, disks, strict=True)):
            before = None if since is None else domain.checkpoints[since][index]
            self._write_changes(target, now, before)
        domain.checkpoints[checkpoint] = disks
        if self.guest_writes is not None:
            self.guest_writes(name)

    def copy_dirty(self, image: Path, bitmaps: list[str], target: Path) -> None:
        """See the module doc."""
        for domain in self.domains.values():
            if str(image) in domain.spec.disks:
                if domain.state == "running" or not bitmaps or bitmaps[0] not in domain.checkpoints:
                    raise ImageToolError(f"{image.name} has no usable dirty bitmap {bitmaps[:1]}")
                before = domain.checkpoints[bitmaps[0]][domain.spec.disks.index(str(image))]
                self._write_changes(target, self._read(image), before)
                return
        raise ImageToolError(f"{image.name} has no dirty bitmaps")

    def _read(self, disk: Path) -> bytes:
        with self._images.export(disk, disk.parent, writable=False) as exported:
            return exported.read(0, self._images.virtual_size(disk))

    def _write_changes(self, target: Path, now: bytes, before: bytes | None) -> None:
        """`target` as QEMU writes a backup: every cluster of `now` that holds data (before is None), or that
        differs from `before`."""
        self._images.create(target, len(now))
        cluster = 65536  # FakeImages' (and qemu-img's) default
        with self._images.export(target, target.parent, writable=True) as out:
            for start in range(0, len(now), cluster):
                data = now[start : start + cluster]
                if before is None and not any(data):
                    continue
                if before is not None and data == before[start : start + cluster]:
                    continue
                if any(data):
                    out.write(start, data)
                else:
                    out.zero(start, len(data))

    def screenshot_ppm(self, name: str, path: Path) -> bytes:
        self._domain(name)
        return b"P6\n1 1\n255\n\x80\x80\x80"

    def screenshot_png(self, name: str, path: Path) -> None:
        self._domain(name)
        path.write_bytes(TINY_PNG)

    def qemu_log_tail(self, name: str, lines: int = 5) -> str:
        return ""

    def free_memory_mib(self) -> int:
        return self.memory

    def bridge_exists(self, name: str) -> bool:
        return name in self.bridges

    def recovery_domains(self) -> list[tuple[str, dict[str, str]]]:
        return [
            (name, {"host": d.spec.host, "point": d.spec.point, "purpose": d.spec.purpose})
            for name, d in self.domains.items()
        ]
