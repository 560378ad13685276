# SPDX-License-Identifier: GPL-2.0-or-later
"""The appliance's accel record (`accel.json`): the last KVM failure, with the kernel and CPU it
happened on. Only `domain.accel.choose` decides whether it still holds.

It is a cache of one observation: losing it costs one KVM attempt that fails and falls back again, so a
damaged record is reported (DamagedFileError naming it) and then removed by `forget`, never allowed to
stop a failover."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from appliance.domain.accel import KvmFailure, Machine
from appliance.store.files import read_as, write_json
from appliance.store.layout import Home


@dataclass(frozen=True, slots=True)
class _Record:
    kvm: str
    kernel: str
    reason: str
    since: datetime
    cpu: str = ""  # absent in the first format: such a record never matches a machine


def load(home: Home) -> KvmFailure | None:
    """The remembered KVM failure, if any.

    :raises DamagedFileError: the record does not read as one.
    """
    path = home.accel_file
    if not path.exists():
        return None
    record = read_as(path, _Record)
    if record.kvm != "broken" or not record.cpu:
        return None
    return KvmFailure(machine=Machine(kernel=record.kernel, cpu=record.cpu), reason=record.reason, since=record.since)


def forget(home: Home) -> None:
    home.accel_file.unlink(missing_ok=True)


def remember(home: Home, failure: KvmFailure) -> None:
    write_json(
        home.accel_file,
        {
            "kvm": "broken",
            "kernel": failure.machine.kernel,
            "cpu": failure.machine.cpu,
            "reason": failure.reason,
            "since": failure.since.isoformat(),
        },
    )
