# SPDX-License-Identifier: GPL-2.0-or-later
"""The KVM-or-TCG decision and what counts as KVM failing (pure rules; the real thing is
tests/integration/test_kvm_fallback.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from appliance.domain.accel import EARLY_SECONDS, KvmFailure, Machine, choose, start_failure_reason, stop_failure_reason
from appliance.domain.recovery import DomainState
from appliance.store import accel as accel_store
from appliance.store.layout import Home

HERE = Machine(kernel="6.18.44", cpu="AMD EPYC")
FAILED_HERE = KvmFailure(machine=HERE, reason="failed to set MSR 0x10a", since=datetime(2026, 11, 26, tzinfo=UTC))


def test_a_kvm_failure_remembered_for_this_kernel_and_cpu_chooses_tcg_and_says_why() -> None:
    choice = choose("auto", True, HERE, FAILED_HERE)
    assert (choice.accel, choice.may_fall_back) == ("tcg", False)
    assert "2026-11-26" in choice.why and "failed to set MSR 0x10a" in choice.why and "6.18.44" in choice.why


def test_a_kvm_failure_on_another_kernel_or_cpu_is_ignored() -> None:
    for other in (Machine("6.19.0", HERE.cpu), Machine(HERE.kernel, "Intel Xeon")):
        remembered = KvmFailure(machine=other, reason="emulation failure", since=FAILED_HERE.since)
        choice = choose("auto", True, HERE, remembered)
        assert (choice.accel, choice.may_fall_back) == ("kvm", True)


def test_asked_accelerators_are_obeyed_and_never_fall_back() -> None:
    assert choose("kvm", True, HERE, FAILED_HERE).accel == "kvm"
    assert not choose("kvm", True, HERE, None).may_fall_back
    assert choose("tcg", True, HERE, None).accel == "tcg"
    assert choose("auto", False, HERE, None).accel == "tcg"


def test_known_kvm_texts_name_a_refused_start() -> None:
    error = (
        "the recovery VM did not start: internal error: process exited while connecting to monitor: "
        "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
        "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == n' failed."
    )
    assert start_failure_reason(error) == "failed to set MSR 0x10a"
    assert "kvm_buf_set_msrs: Assertion" in start_failure_reason("kvm.c:1: kvm_buf_set_msrs: Assertion `x' failed.")
    assert start_failure_reason("line one\nCannot allocate memory") == "Cannot allocate memory"


def test_a_stop_counts_as_kvm_failing_by_its_text_its_reason_or_its_time() -> None:
    late = EARLY_SECONDS + 60
    assert stop_failure_reason(DomainState(False, "paused", "unknown"), "KVM internal error. Suberror: 1", late)
    assert stop_failure_reason(DomainState(False, "shutoff", "crashed"), "", late)  # <on_crash>destroy hid it
    assert stop_failure_reason(DomainState(False, "shutoff", "shutdown"), "", 2.0)  # within its first seconds
    assert stop_failure_reason(DomainState(False, "shutoff", "shutdown"), "", late) is None  # the guest's own
    assert stop_failure_reason(DomainState(False, "paused", "ioerror"), "", late) is None  # a full disk
    assert stop_failure_reason(DomainState(False, "gone", ""), "", 1.0) is None  # removed by someone


def test_the_accel_record_round_trips_and_an_old_record_without_cpu_counts_as_none(tmp_path: Path) -> None:
    home = Home(tmp_path)
    assert accel_store.load(home) is None
    accel_store.remember(home, FAILED_HERE)
    assert accel_store.load(home) == FAILED_HERE
    old = {"kvm": "broken", "kernel": HERE.kernel, "reason": "x", "since": "2026-01-01T00:00:00+00:00"}
    home.accel_file.write_text(json.dumps(old))
    assert accel_store.load(home) is None
