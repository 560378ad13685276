# SPDX-License-Identifier: GPL-2.0-or-later
"""KVM or TCG for a recovery VM: the one decision, and what counts as KVM failing.

KVM runs a guest at the CPU's own speed, but a kernel, a CPU or a nesting it does not fully support
makes it fail in ways that look like anything but "KVM does not work": libvirt refuses the start (QEMU
aborts: "failed to set MSR 0x10a"), QEMU exits at once, or the guest stops in its first seconds ("KVM
internal error", "emulation failure"). TCG, QEMU's own emulation, runs wherever QEMU runs. With `auto`
the appliance tries KVM, starts the same VM with TCG once when KVM fails, and remembers the failure for
this kernel and CPU, so the next VM starts with TCG at once; another kernel or CPU gets KVM tried again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from appliance.domain.recovery import DomainState
from appliance.errors import ConfigError

ACCELS = ("auto", "kvm", "tcg")
# A guest that stops this soon after a KVM start failed with KVM, whatever libvirt calls the stop: a
# working guest boots for longer than that, and a KVM that cannot run it fails within a second or two.
EARLY_SECONDS = 10.0
_KNOWN_KVM_FAILURES = (
    re.compile(r"emulation failure"),
    re.compile(r"KVM internal error"),
    re.compile(r"failed to set MSR 0x[0-9a-fA-F]+"),
    re.compile(r"kvm run failed[^\n]*"),
    re.compile(r"\bkvm\w*: Assertion `[^`']*' failed"),
)
# Shut-off and pause reasons (libvirt's names) that say the VM did not stop of its own will. An
# `<on_crash>destroy</on_crash>` turns a crash into a shut-off: its reason still says `crashed`.
_CRASH_REASONS = frozenset({"crashed", "failed"})
_HARMLESS_PAUSES = frozenset({"user", "ioerror", "migration", "save", "dump", "snapshot", "starting up"})


@dataclass(frozen=True, slots=True)
class Machine:
    """What a KVM failure depends on: the appliance's kernel and CPU."""

    kernel: str
    cpu: str

    def __str__(self) -> str:
        return f"kernel {self.kernel}, CPU {self.cpu}"


@dataclass(frozen=True, slots=True)
class KvmFailure:
    """A remembered KVM failure: it holds for its machine only."""

    machine: Machine
    reason: str
    since: datetime


@dataclass(frozen=True, slots=True)
class AccelChoice:
    accel: str  # kvm | tcg
    why: str  # shown in the "booting ... with TCG (why)" line
    may_fall_back: bool  # `auto` chose KVM: a KVM failure starts the VM again with TCG


def choose(wanted: str, kvm_usable: bool, machine: Machine, remembered: KvmFailure | None) -> AccelChoice:
    """The accelerator for the next VM. `kvm` and `tcg` are obeyed as they are (a failure is reported,
    never hidden by a fallback); `auto` takes KVM unless it is missing or failed on this very machine."""
    if wanted not in ACCELS:
        raise ConfigError(f"invalid accelerator {wanted!r}: use {', '.join(ACCELS)}")
    if wanted != "auto":
        return AccelChoice(wanted, "as asked", may_fall_back=False)
    if not kvm_usable:
        return AccelChoice("tcg", "no usable /dev/kvm", may_fall_back=False)
    if remembered is not None and remembered.machine == machine:
        why = f"KVM failed here on {remembered.since:%Y-%m-%d} with {machine}: {remembered.reason}"
        return AccelChoice("tcg", why, may_fall_back=False)
    return AccelChoice("kvm", "KVM is available", may_fall_back=True)


def known_failure(text: str) -> str | None:
    """The first known KVM failure text in QEMU's output, as QEMU wrote it."""
    for pattern in _KNOWN_KVM_FAILURES:
        match = pattern.search(text)
        if match:
            return match.group(0)
    return None


def start_failure_reason(text: str) -> str:
    """Why a KVM start failed, in a few words: a known KVM text, else the error's last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return known_failure(text) or (lines[-1][-200:] if lines else "the VM did not start")


def stop_failure_reason(state: DomainState, qemu_output: str, seconds_running: float) -> str | None:
    """Why a KVM VM that stopped before its guest booted counts as KVM failing, or None when it stopped
    for a reason of its own (the guest powered off after its first seconds, someone removed it)."""
    if state.running or state.state == "gone":
        return None
    known = known_failure(qemu_output)
    if known:
        return known
    if state.state == "shutoff" and state.reason in _CRASH_REASONS:
        return f"QEMU {state.reason} {seconds_running:.0f} s after the start"
    if state.state == "crashed" or (state.state == "paused" and state.reason not in _HARMLESS_PAUSES):
        return f"the VM {state.state} ({state.reason}) {seconds_running:.0f} s after the start"
    if seconds_running < EARLY_SECONDS:
        return f"the guest stopped {seconds_running:.0f} s after the start ({state.state}, {state.reason})"
    return None
