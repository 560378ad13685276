# SPDX-License-Identifier: GPL-2.0-or-later
"""Records of recovery VMs (`vm.json` next to their overlays). A record pins its point: while it exists,
consolidation and deletion must leave that point alone."""

from __future__ import annotations

import shutil
from datetime import datetime
from typing import Any

from appliance.domain.recovery import Network, RecoveryVm, VmSettings
from appliance.store.files import private_dir, read_json, write_json
from appliance.store.layout import Home

RECORD = "vm.json"
PURPOSES = ("failover", "verify")


def save(home: Home, vm: RecoveryVm) -> None:
    folder = private_dir(home.failover_dir(vm.host, vm.purpose))
    write_json(folder / RECORD, _doc(vm))


def load(home: Home, host: str, purpose: str = "failover") -> RecoveryVm | None:
    path = home.failover_dir(host, purpose) / RECORD
    return _vm(read_json(path)) if path.exists() else None


def remove(home: Home, host: str, purpose: str = "failover") -> None:
    """Delete the record and the overlays: the VM's writes are gone."""
    folder = home.failover_dir(host, purpose)
    if purpose == "failover":
        (folder / RECORD).unlink(missing_ok=True)
        for f in folder.glob("disk*.qcow2"):
            f.unlink()
        (folder / "console.log").unlink(missing_ok=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def all_vms(home: Home) -> list[RecoveryVm]:
    root = home.root / "failover"
    if not root.exists():
        return []
    found = []
    for host_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for purpose in PURPOSES:
            vm = load(home, host_dir.name, purpose)
            if vm is not None:
                found.append(vm)
    return found


def pinned_points(home: Home, host: str) -> dict[str, str]:
    """Point id -> why it is pinned (a running or kept recovery VM, a verification)."""
    pins = {}
    for purpose in PURPOSES:
        vm = load(home, host, purpose)
        if vm is not None:
            pins[vm.point] = f"{purpose} VM {vm.name} ({vm.state})"
    return pins


def _doc(vm: RecoveryVm) -> dict[str, Any]:
    return {
        "host": vm.host, "point": vm.point, "name": vm.name, "purpose": vm.purpose,
        "started": vm.started.isoformat(), "accel": vm.accel, "overlays": list(vm.overlays),
        "console_log": vm.console_log, "vnc": vm.vnc, "rto_seconds": vm.rto_seconds, "state": vm.state,
        "settings": {
            "memory_mib": vm.settings.memory_mib, "cpus": vm.settings.cpus,
            "network": str(vm.settings.network), "disk_bus": vm.settings.disk_bus,
        },
    }  # fmt: skip


def _vm(doc: dict[str, Any]) -> RecoveryVm:
    s = doc["settings"]
    return RecoveryVm(
        host=doc["host"], point=doc["point"], name=doc["name"], purpose=doc["purpose"],
        started=datetime.fromisoformat(doc["started"]), accel=doc["accel"], overlays=tuple(doc["overlays"]),
        console_log=doc["console_log"], vnc=doc.get("vnc", ""), rto_seconds=doc.get("rto_seconds"),
        state=doc.get("state", "running"),
        settings=VmSettings(int(s["memory_mib"]), int(s["cpus"]), Network.parse(s["network"]), s["disk_bus"]),
    )  # fmt: skip
