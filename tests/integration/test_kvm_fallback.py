# SPDX-License-Identifier: GPL-2.0-or-later
"""KVM failing on purpose, through real libvirt: recovery VMs get a wrapper as their `<emulator>`.

libvirt probes the wrapper's capabilities as it would QEMU's, so every probe goes through to the real
qemu-system-x86_64; only a domain start that asks for KVM fails, the way QEMU fails on a kernel whose
KVM cannot run the guest. The same tests hold on a machine where KVM works and on one where it does not.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from appliance.errors import HypervisorError
from tests.conftest import run_cli

UP = "console:APPLIANCE-GUEST-UP"
WRAPPERS = Path("/var/tmp/appliance-test-emulators")  # libvirt probes as its own user: not under pytest's 0700 tmp

_SCAN_ARGS = """real=/usr/bin/qemu-system-x86_64
args=(); kvm=0; domain=0; prev=""
for arg in "$@"; do
  case "$prev" in
    -name) domain=1 ;;
    -accel) [ "$arg" = kvm ] && kvm=1 ;;
  esac
  args+=("$arg"); prev=$arg
done
"""
# QEMU on this project's machine (kernel 6.18, AMD EPYC): the start aborts before the guest runs.
REFUSE_KVM = f"""#!/bin/bash
{_SCAN_ARGS}
if [ $domain = 1 ] && [ $kvm = 1 ]; then
  echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69" >&2
  echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs:" \\
    "Assertion \\`ret == cpu->kvm_msr_buf->nmsrs' failed." >&2
  kill -ABRT $$
fi
exec "$real" "$@"
"""
# The start succeeds, the guest runs, and QEMU dies within its first seconds: once it has used a second
# of CPU time (it is all but idle until libvirt lets the guest run). It runs with TCG inside, so that it
# runs, and dies, on any machine.
DIE_EARLY_WITH_KVM = f"""#!/bin/bash
{_SCAN_ARGS}
if [ $domain = 1 ] && [ $kvm = 1 ]; then
  for i in "${{!args[@]}}"; do
    [ "${{args[$i]}}" = kvm ] && args[$i]=tcg
    case "${{args[$i]}}" in host,*|host) args[$i]=max ;; esac
  done
  (for fd in /proc/$BASHPID/fd/*; do fd=${{fd##*/}}; [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done  # libvirt's pipes
   for _ in $(seq 1200); do
     read -r -a stat < "/proc/$$/stat" || exit 0
     [ $((stat[13] + stat[14])) -ge 100 ] && break
     sleep 0.1
   done; kill -KILL $$) </dev/null >/dev/null 2>&1 &
  exec "$real" "${{args[@]}}"
fi
exec "$real" "$@"
"""


def _wrapper(name: str, text: str) -> str:
    """The wrapper at a stable path, rewritten only when it changed (libvirt re-probes a changed binary)."""
    WRAPPERS.mkdir(mode=0o755, exist_ok=True)
    path = WRAPPERS / name
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def guest(make_host, guest_image: Path, home: Path):  # type: ignore[no-untyped-def]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm: the appliance never tries KVM here")
    host = make_host(image=guest_image)
    assert run_cli(home, "host", "set", host.name, "--boot-check", UP, "--vm-memory", "256").rc == 0
    assert run_cli(home, "backup", host.name).rc == 0
    yield host
    run_cli(home, "failover", "stop", host.name)


def _kvm_failed_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("KVM failed")]


def test_a_refused_kvm_start_falls_back_to_tcg_once_and_is_remembered(guest, home: Path) -> None:
    env = {"APPLIANCE_QEMU_EMULATOR": _wrapper("refuse-kvm", REFUSE_KVM)}
    r = run_cli(home, "failover", guest.name, "--timeout", "180", env=env)
    assert r.rc == 0, r.out + r.err
    assert "with KVM (KVM is available)" in r.err
    [fallback] = _kvm_failed_lines(r.err)
    assert "failed to set MSR 0x10a" in fallback and "TCG" in fallback
    assert "(TCG)" in r.out and "marker=" in r.out
    record = json.loads((home / "accel.json").read_text())
    assert record["kvm"] == "broken" and record["kernel"] == os.uname().release and record["cpu"]
    assert run_cli(home, "failover", "stop", guest.name).rc == 0
    # the next VM starts with TCG at once, saying why; the boot itself is not needed for that
    again = run_cli(home, "failover", guest.name, "--timeout", "1", env=env)
    assert "with TCG (KVM failed here on" in again.err and "failed to set MSR 0x10a" in again.err
    assert not _kvm_failed_lines(again.err)


def test_a_guest_dying_in_its_first_seconds_with_kvm_falls_back_to_tcg(guest, home: Path) -> None:
    env = {"APPLIANCE_QEMU_EMULATOR": _wrapper("die-early-with-kvm", DIE_EARLY_WITH_KVM)}
    r = run_cli(home, "failover", guest.name, "--timeout", "180", env=env)
    assert r.rc == 0, r.out + r.err
    [fallback] = _kvm_failed_lines(r.err)
    assert "QEMU crashed" in fallback  # libvirt's shut-off reason, whatever <on_crash> did with it
    assert "(TCG)" in r.out and "marker=" in r.out


def test_with_accel_kvm_a_kvm_failure_is_reported_as_it_is(guest, home: Path) -> None:
    env = {"APPLIANCE_QEMU_EMULATOR": _wrapper("refuse-kvm", REFUSE_KVM)}
    r = run_cli(home, "failover", guest.name, "--accel", "kvm", env=env)
    assert r.rc == HypervisorError.exit_code and "failed to set MSR 0x10a" in r.err, r.err
    assert not _kvm_failed_lines(r.err) and "TCG" not in r.err
    assert not (home / "accel.json").exists()
    assert not (home / "failover" / guest.name / "vm.json").exists()
    domains = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert f"recovery-{guest.name}" not in domains
