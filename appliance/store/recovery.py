# SPDX-License-Identifier: GPL-2.0-or-later
"""Records of recovery VMs (`vm.json` next to their overlays). A record pins its point: while it exists,
consolidation and deletion must leave that point alone."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

from appliance.domain.models import HOST_NAME
from appliance.domain.recovery import RecoveryVm
from appliance.errors import DamagedFileError
from appliance.store.files import damaged, private_dir, read_as, write_json
from appliance.store.layout import Home

RECORD = "vm.json"
CLOUD_SOURCE = "cloud.json"  # a VM booted from a cloud store: which store and manifest its NBD servers serve
PURPOSES = ("failover", "verify")


def save(home: Home, vm: RecoveryVm) -> None:
    folder = private_dir(home.failover_dir(vm.host, vm.purpose))
    write_json(folder / RECORD, _doc(vm))


def save_cloud_source(home: Home, host: str, source: dict[str, str]) -> None:
    write_json(private_dir(home.failover_dir(host)) / CLOUD_SOURCE, source)


def cloud_source(home: Home, host: str) -> dict[str, str] | None:
    """What the NBD servers of `host`'s recovery VM serve, when it was booted from a cloud store."""
    path = home.failover_dir(host) / CLOUD_SOURCE
    if not path.exists():
        return None
    doc = read_as(path, dict)
    if not all(isinstance(v, str) for v in doc.values()):
        raise damaged(path, "it is not a cloud store's point")
    return {str(k): str(v) for k, v in doc.items()}


def load(home: Home, host: str, purpose: str = "failover") -> RecoveryVm | None:
    """:raises DamagedFileError: the record is damaged (its point can then not be known to be free)."""
    path = home.failover_dir(host, purpose) / RECORD
    if not path.exists():
        return None
    vm = read_as(path, RecoveryVm)
    if (vm.host, vm.purpose) != (host, purpose):
        raise damaged(path, f"it is the record of {vm.host}'s {vm.purpose} VM")
    return vm


def remove(home: Home, host: str, purpose: str = "failover") -> None:
    """Delete the record and the overlays: the VM's writes are gone."""
    folder = home.failover_dir(host, purpose)
    if purpose == "failover":
        (folder / RECORD).unlink(missing_ok=True)
        (folder / CLOUD_SOURCE).unlink(missing_ok=True)
        for pattern in ("disk*.qcow2", "disk*.cache", "disk*.map", "disk*.nbd.*"):  # a cloud point's NBD cache too
            for f in folder.glob(pattern):
                f.unlink()
        (folder / "console.log").unlink(missing_ok=True)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def all_vms(home: Home) -> list[RecoveryVm]:
    """Every recovery VM whose record reads (`unreadable` names the others)."""
    return [vm for vm in _records(home) if isinstance(vm, RecoveryVm)]


def unreadable(home: Home) -> dict[str, DamagedFileError]:
    """Host -> what is wrong with its recovery-VM record, for every record that does not read."""
    return dict(found for found in _records(home) if isinstance(found, tuple))


def _records(home: Home) -> Iterator[RecoveryVm | tuple[str, DamagedFileError]]:
    root = home.failovers_dir
    for host_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        if not HOST_NAME.match(host_dir.name):
            yield host_dir.name, DamagedFileError(f"{host_dir} is not the appliance's: not a host name")
            continue
        for purpose in PURPOSES:
            try:
                vm = load(home, host_dir.name, purpose)
            except DamagedFileError as exc:
                yield host_dir.name, exc
                continue
            if vm is not None:
                yield vm


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
