# SPDX-License-Identifier: GPL-2.0-or-later
"""The appliance's accel record (`accel.json`): the last KVM failure, with the kernel and CPU it
happened on. Only `domain.accel.choose` decides whether it still holds."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from appliance.domain.accel import KvmFailure, Machine
from appliance.store.files import read_json, write_json
from appliance.store.layout import Home


def load(home: Home) -> KvmFailure | None:
    """The remembered KVM failure; a record that is unreadable or from an older format counts as none."""
    try:
        doc: dict[str, Any] = read_json(home.accel_file)
        if doc.get("kvm") != "broken":
            return None
        machine = Machine(kernel=str(doc["kernel"]), cpu=str(doc["cpu"]))
        return KvmFailure(machine=machine, reason=str(doc["reason"]), since=datetime.fromisoformat(doc["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
