# SPDX-License-Identifier: GPL-2.0-or-later
"""FakeHypervisor: the Hypervisor port as a small state machine, for unit tests of the use cases.

A domain is defined and running once `start` succeeds; `shutdown` and `destroy_keep` turn it off with
a reason, `remove` forgets it (`state` then says "gone", as libvirt does). Every call is recorded in
`calls`. `refuse_start(message, accel=...)` makes the next start (with that accelerator) fail as libvirt
reports it, leaving nothing defined, e.g. `refuse_start("KVM refused", accel="kvm")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.domain.accel import Machine
from appliance.domain.recovery import DomainSpec, DomainState
from appliance.errors import HypervisorError

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

    def backup(self, name: str, targets: list[tuple[str, Path]], checkpoint: str, since: str | None) -> None:
        raise NotImplementedError("push backups (failback) are not modelled by FakeHypervisor")

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
